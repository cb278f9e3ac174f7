"""The `lambda` transport: an asynchronous invoke of the worker function per dispatch."""

from __future__ import annotations

import json
import threading
from typing import Any

from orchestrator.dispatch.base import DispatchError


class LambdaTransport:
    """Dispatch by asynchronous Lambda invoke (`InvocationType=Event`) of the worker function.

    Lambda queues the event and answers 202 at once; a dispatch that Lambda refuses (throttled
    beyond its retries, payload too large, no such function, no permission) raises, and the
    dispatcher puts the task back to `ready`. What happens after acceptance is the lease's
    business: a worker that never calls back lets the lease expire and the tick retries.
    """

    name = "lambda"

    def __init__(self, function_name: str, *, region: str, client: Any | None = None) -> None:
        self.function_name = function_name
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
        except (BotoCoreError, ClientError) as exc:
            raise DispatchError(f"invoking {self.function_name} failed: {exc}") from exc
        status = response.get("StatusCode")
        if status != 202:
            raise DispatchError(f"invoking {self.function_name} answered {status}, not 202")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            client.close()
