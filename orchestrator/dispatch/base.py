"""The transport interface: deliver one dispatch message to a worker, or raise DispatchError."""

from __future__ import annotations

from typing import Any, Protocol


class DispatchError(Exception):
    """The message did not reach a worker (transport error, throttle, no such worker)."""


class DispatchThrottled(DispatchError):
    """The worker target pushed back (Lambda TooManyRequestsException, SQS throttling, HTTP 429
    or 503): not a failure of the task. The dispatcher gives the claim back without spending an
    attempt or counting a dispatch failure, and sends less to that target for a while.
    `retry_after_s`: how long the target asked to be left alone, when it said."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# AWS error codes that mean "slow down" rather than "this request is wrong" (botocore's own list
# of throttling codes, plus SQS's and the KMS key behind an encrypted queue).
THROTTLING_CODES = frozenset({
    "TooManyRequestsException", "ThrottlingException", "Throttling", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "RequestLimitExceeded", "SlowDown",
    "ProvisionedThroughputExceededException", "EC2ThrottledException", "BandwidthLimitExceeded",
    "AWS.SimpleQueueService.RequestThrottled", "KMS.ThrottlingException", "KmsThrottled",
})


def aws_throttle(exc: BaseException) -> bool:
    """Whether a botocore ClientError is AWS saying "slow down" (by code, or an HTTP 429)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in THROTTLING_CODES or status == 429


class Transport(Protocol):
    name: str

    def send(self, message: dict[str, Any]) -> None:
        """Deliver `message`; return once the worker has accepted it (not when the task ends)."""
        ...

    def close(self) -> None: ...


# A transport may also define `target: str`, the worker target it delivers to ("lambda:<function>",
# "sqs:<queue url>", "http:<url>"): the key its capacity is remembered under while it throttles
# (dispatch_targets, migration 0024); and `start_window_s: int`, how long it may hold an accepted
# dispatch before a worker starts it (Lambda's maximum event age): the lease of a task it accepted
# covers that window, so a queued delivery is not taken for a lost one and sent again.
#
# A transport may also define `capacity() -> int | None`: how many more tasks it can start now
# (None: it queues without bound, as a remote service that scales out does). When every
# configured transport defines it, a claim takes no more than their sum, so a task is never
# claimed only to wait in a local queue while its lease runs out.
#
# A transport may also define `sends_in_memory = True`: its `send` hands the message over within
# this process (a queue) and never waits on a network. The dispatcher then sends to it from the
# dispatching thread; the others are sent to from its pool of threads, in parallel.
