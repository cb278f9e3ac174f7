"""The `http` transport: POST each dispatch message to a worker service (`Worker.asgi_app`)."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from orchestrator.dispatch.addresses import endpoint_problem
from orchestrator.dispatch.base import DispatchError, DispatchThrottled

# Answers that mean "full, come back later": not the task's failure.
THROTTLE_STATUSES = frozenset({429, 503})

# Short on purpose: the worker service answers 202 before running anything, so a slow answer
# means an unhealthy service, and the dispatcher would rather put the task back to `ready`
# than hold a tick (which has a Lambda deadline) waiting on it.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0


class HttpTransport:
    """Dispatch by `POST {worker_url}` with the message as JSON.

    A 2xx answer means the service accepted the task (it then heartbeats and calls back); any
    other answer, or no answer, raises DispatchError and the dispatcher puts the task back to
    `ready` without spending an attempt. A 429 or 503 is how a full service asks to be sent less
    (DispatchThrottled, honouring a Retry-After in seconds): not counted as a dispatch failure.

    Two kinds of service: the platform's own (TICKWEAVE_WORKER_URL, `auth_token` sent as a
    bearer secret, its short answer kept in errors) and a tenant-registered one
    (`registered()`: each body signed with the registration's own secret, the address checked
    before each send, and nothing of its answer but the status kept, since the task error is
    shown to the tenant and the endpoint could be anything the tenant points it at).
    """

    name = "http"

    def __init__(
        self, url: str, *, auth_token: str | None = None, client: httpx.Client | None = None,
        timeout: httpx.Timeout | None = None, signing_secret: str | None = None,
        check_address: bool = False, allow_private: bool = False, answer_in_errors: bool = True,
    ) -> None:
        self.url = url
        self.target = f"http:{_redact(url)}"
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._signing_secret = signing_secret
        self._check_address = check_address
        self._allow_private = allow_private
        self._answer_in_errors = answer_in_errors
        self._timeout = timeout or httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = client
        # A client passed in is shared (e.g. by every registered endpoint): not ours to close.
        self._owns_client = client is None
        self._lock = threading.Lock()

    @classmethod
    def registered(
        cls, url: str, *, signing_secret: str, allow_private: bool, client: httpx.Client | None = None,
    ) -> HttpTransport:
        """The transport of a tenant-registered endpoint: signed, address-checked, no platform secret."""
        return cls(url, client=client, signing_secret=signing_secret, check_address=True,
                   allow_private=allow_private, answer_in_errors=False)

    def _http(self) -> httpx.Client:
        # One pooled client for all dispatch threads (httpx.Client is thread-safe); created on
        # the first dispatch so that a process that never dispatches opens no pool.
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self._timeout)
            return self._client

    def send(self, message: dict[str, Any]) -> None:
        target = _redact(self.url)
        if self._check_address:
            # Again at each dispatch, not only at registration: the name may resolve elsewhere now.
            problem = endpoint_problem(self.url, allow_private=self._allow_private)
            if problem is not None:
                raise DispatchError(f"POST {target} refused: {problem}")
        # Serialized here so that the signature covers the exact bytes sent.
        body = json.dumps(message, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self._headers}
        if self._signing_secret is not None:
            from orchestrator.storage.signatures import sign_dispatch

            headers.update(sign_dispatch(self._signing_secret, body))
        try:
            # Redirects are not followed (httpx's default, stated here because it matters): a
            # registered endpoint must not bounce a dispatch to an address it could not register.
            response = self._http().post(self.url, content=body, headers=headers, follow_redirects=False)
        except httpx.HTTPError as exc:
            if not self._answer_in_errors:
                # The class only: the text can describe the remote end (a port scan's oracle).
                raise DispatchError(f"POST {target} failed: {type(exc).__name__}") from exc
            # The exception text names the URL and the error, never the headers (the secret).
            raise DispatchError(f"POST {target} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code in THROTTLE_STATUSES:
            said = f": {response.text[:200]}" if self._answer_in_errors else ""
            raise DispatchThrottled(f"POST {target} answered {response.status_code}{said}",
                                    retry_after_s=_retry_after(response.headers.get("retry-after")))
        if not response.is_success:
            if not self._answer_in_errors:
                raise DispatchError(f"POST {target} answered {response.status_code}")
            # The body is the worker's short JSON reason; cap it in case a proxy sent a page.
            raise DispatchError(f"POST {target} answered {response.status_code}: {response.text[:200]}")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()


def _retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is rare from a worker and ignored), bounded."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), 3600.0)


def _redact(url: str) -> str:
    """Scheme, host, port and path: credentials in the URL's userinfo or query stay out of errors."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
