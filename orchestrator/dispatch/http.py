"""The `http` transport: POST each dispatch message to a worker service (`Worker.asgi_app`)."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from orchestrator.dispatch.base import DispatchError

# Short on purpose: the worker service answers 202 before running anything, so a slow answer
# means an unhealthy service, and the dispatcher would rather put the task back to `ready`
# than hold a tick (which has a Lambda deadline) waiting on it.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0


class HttpTransport:
    """Dispatch by `POST {worker_url}` with the message as JSON.

    A 2xx answer means the service accepted the task (it then heartbeats and calls back); any
    other answer, or no answer, raises DispatchError and the dispatcher puts the task back to
    `ready` without spending an attempt. A 503 is how a full service asks for that.
    """

    name = "http"

    def __init__(
        self, url: str, *, auth_token: str | None = None, client: httpx.Client | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._timeout = timeout or httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = client
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        # One pooled client for all dispatch threads (httpx.Client is thread-safe); created on
        # the first dispatch so that a process that never dispatches opens no pool.
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self._timeout)
            return self._client

    def send(self, message: dict[str, Any]) -> None:
        target = _redact(self.url)
        try:
            response = self._http().post(self.url, json=message, headers=self._headers)
        except httpx.HTTPError as exc:
            # The exception text names the URL and the error, never the headers (the secret).
            raise DispatchError(f"POST {target} failed: {type(exc).__name__}: {exc}") from exc
        if not response.is_success:
            # The body is the worker's short JSON reason; cap it in case a proxy sent a page.
            raise DispatchError(f"POST {target} answered {response.status_code}: {response.text[:200]}")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _redact(url: str) -> str:
    """Scheme, host, port and path: credentials in the URL's userinfo or query stay out of errors."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
