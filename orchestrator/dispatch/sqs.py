"""The `sqs` transport: one SQS message per dispatch, for workers that poll a queue
(`Worker.run_sqs`) or a worker Lambda fed by an SQS event source mapping."""

from __future__ import annotations

import json
import threading
from typing import Any

from orchestrator.dispatch.base import DispatchError, DispatchThrottled, aws_throttle


class SqsTransport:
    """Dispatch by `SendMessage` to the worker queue.

    Accepted by SQS means accepted: the queue holds the message until a worker takes it. A send
    SQS refuses (no such queue, throttled beyond the client's retries, message too large) raises
    DispatchError and the dispatcher puts the task back to `ready`; a throttled send
    (ThrottlingException, RequestThrottled, KMS throttling of an encrypted queue) raises
    DispatchThrottled: no attempt spent, and less is sent for a while. A message no worker picks up
    in time is the lease's business, as with every transport: the tick retries the attempt.
    """

    name = "sqs"

    def __init__(
        self, queue_url: str, *, region: str, endpoint_url: str | None = None, client: Any | None = None,
    ) -> None:
        self.queue_url = queue_url
        self.target = f"sqs:{queue_url}"
        self._region = region
        self._endpoint_url = endpoint_url
        self._client = client
        self._lock = threading.Lock()

    def _sqs(self) -> Any:
        with self._lock:
            if self._client is None:
                # boto3 on first dispatch, not at import: an API cold start that dispatches
                # nothing does not pay for it.
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session(region_name=self._region).client(
                    "sqs", endpoint_url=self._endpoint_url,
                    config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=3, read_timeout=10),
                )
            return self._client

    def send(self, message: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = json.dumps(message, separators=(",", ":"), default=str)
        try:
            self._sqs().send_message(QueueUrl=self.queue_url, MessageBody=body)
        except ClientError as exc:
            if aws_throttle(exc):
                raise DispatchThrottled(f"sending to {self.queue_url} was throttled: {exc}") from exc
            raise DispatchError(f"sending to {self.queue_url} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise DispatchError(f"sending to {self.queue_url} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            client.close()
