"""HTTP plumbing of the worker: posting to the orchestrator and fetching presigned URLs.

Kept apart from the SDK so the SDK can be driven with any `send` (in-process, tests) and this
module is the only one that knows about httpx.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

__all__ = [
    "HttpSender",
    "StorageHTTPError",
    "TransientHTTPError",
    "get_bytes",
    "put_bytes",
    "redact_url",
    "shared_client",
    "with_retries",
]

log = logging.getLogger("tickweave.worker.http")

T = TypeVar("T")

# Statuses that mean "the server (or a proxy in front of it) could not take this right now".
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_TIMEOUT_S = 30.0

_client_lock = threading.Lock()
_client: httpx.Client | None = None


class TransientHTTPError(Exception):
    """A retryable status; raised inside the retry loop only."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} from {redact_url(response.request.url)}")
        self.response = response


class StorageHTTPError(Exception):
    """A presigned GET/PUT that the store refused; the message never contains the signature."""

    def __init__(self, method: str, url: httpx.URL | str, status: int, body: bytes = b"") -> None:
        # Only the S3 error code: the rest of an S3 error document can echo the signed request.
        match = re.search(rb"<Code>([^<]{1,64})</Code>", body[:4096])
        detail = f" ({match.group(1).decode('ascii', 'replace')})" if match else ""
        super().__init__(f"{method} {redact_url(url)}: HTTP {status}{detail}")
        self.status = status


def redact_url(url: httpx.URL | str) -> str:
    """Scheme, host and path only: a presigned URL's query string is a bearer credential."""
    parsed = httpx.URL(str(url))
    return str(parsed.copy_with(query=None, fragment=None))


def shared_client() -> httpx.Client:
    """One pooled client per process: a warm Lambda or a worker service reuses connections."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=DEFAULT_TIMEOUT_S)
        return _client


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 4,
    backoff_s: float = 0.2,
    what: str = "request",
) -> T:
    """Run `call`, retrying connection-level failures with exponential backoff.

    Callbacks and heartbeats are fenced server-side (a duplicate changes nothing), so repeating
    a POST whose response was lost is safe.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (httpx.TransportError, TransientHTTPError) as exc:
            if attempt == attempts:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class HttpSender:
    """The default `send(url, body) -> dict` of a Worker: JSON POST with retries."""

    def __init__(
        self,
        *,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = 4,
        backoff_s: float = 0.2,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._client or shared_client()

        def post() -> httpx.Response:
            response = client.post(url, json=body, timeout=self._timeout_s)
            if response.status_code in RETRY_STATUSES:
                raise TransientHTTPError(response)
            return response

        response = with_retries(post, attempts=self._attempts, backoff_s=self._backoff_s, what=f"POST {url}")
        # Fencing refusals and validation errors come back as 4xx with a JSON body; hand that
        # body to the caller (it decides what a refusal means) and only raise without one.
        try:
            answer = response.json()
        except ValueError:
            response.raise_for_status()
            raise ValueError(f"POST {url}: response is not JSON") from None
        if not isinstance(answer, dict):
            response.raise_for_status()
            raise ValueError(f"POST {url}: response is not a JSON object")
        if response.is_error:
            answer.setdefault("http_status", response.status_code)
        return answer


def get_bytes(url: str, *, timeout_s: float = 60.0) -> bytes:
    """GET a (presigned) URL and return the body; raises on a non-2xx answer."""

    def get() -> bytes:
        response = shared_client().get(url, timeout=timeout_s)
        if response.status_code in RETRY_STATUSES:
            raise TransientHTTPError(response)
        if response.is_error:
            raise StorageHTTPError("GET", url, response.status_code, response.content)
        return response.content

    return with_retries(get, what="GET presigned URL")


def put_bytes(url: str, body: bytes, *, content_type: str, timeout_s: float = 60.0) -> None:
    """PUT a body to a presigned URL (the Content-Type must match the one it was signed with)."""

    def put() -> None:
        response = shared_client().put(
            url, content=body, headers={"Content-Type": content_type}, timeout=timeout_s
        )
        if response.status_code in RETRY_STATUSES:
            raise TransientHTTPError(response)
        if response.is_error:
            raise StorageHTTPError("PUT", url, response.status_code, response.content)

    with_retries(put, what="PUT presigned URL")
