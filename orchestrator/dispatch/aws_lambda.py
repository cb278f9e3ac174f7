"""The `lambda` transport: an asynchronous invoke of the worker function per dispatch."""

from __future__ import annotations

import json
import threading
from typing import Any

from orchestrator.dispatch.base import DispatchError, DispatchThrottled, aws_throttle

# Lambda keeps an asynchronous event this long (at most) while the function is throttled, then
# drops it to the on-failure destination. Set the worker function's EventInvokeConfig
# MaximumEventAgeInSeconds to the same value (TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S; docs/deploy.md).
DEFAULT_MAX_EVENT_AGE_S = 900


class LambdaTransport:
    """Dispatch by asynchronous Lambda invoke (`InvocationType=Event`) of the worker function.

    Lambda queues the event and answers 202 at once; a dispatch that Lambda refuses (throttled
    beyond its retries, payload too large, no such function, no permission) raises, and the
    dispatcher puts the task back to `ready`. A throttled invoke (TooManyRequestsException, 429)
    raises DispatchThrottled: no attempt is spent and the dispatcher sends less for a while.
    What happens after acceptance is the lease's business: Lambda may hold the event up to the
    function's maximum event age (`start_window_s`), so the lease of an accepted task covers
    that; a worker that never starts lets the lease expire and the tick retries.
    """

    name = "lambda"

    def __init__(
        self, function_name: str, *, region: str, client: Any | None = None,
        max_event_age_s: int = DEFAULT_MAX_EVENT_AGE_S,
    ) -> None:
        self.function_name = function_name
        self.target = f"lambda:{function_name}"
        self.start_window_s = max_event_age_s
        self._region = region
        self._client = client
        self._lock = threading.Lock()

    def _lambda(self) -> Any:
        with self._lock:
            if self._client is None:
                # boto3 on first dispatch, not at import.
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session(region_name=self._region).client(
                    "lambda",
                    config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=3, read_timeout=10),
                )
            return self._client

    def send(self, message: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        payload = json.dumps(message, separators=(",", ":"), default=str).encode()
        try:
            response = self._lambda().invoke(FunctionName=self.function_name, InvocationType="Event", Payload=payload)
        except ClientError as exc:
            if aws_throttle(exc):
                raise DispatchThrottled(f"invoking {self.function_name} was throttled: {exc}") from exc
            raise DispatchError(f"invoking {self.function_name} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise DispatchError(f"invoking {self.function_name} failed: {exc}") from exc
        status = response.get("StatusCode")
        if status != 202:
            raise DispatchError(f"invoking {self.function_name} answered {status}, not 202")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            client.close()
