"""HTTP plumbing of the worker: posting to the orchestrator and fetching presigned URLs.

Kept apart from the SDK so the SDK can be driven with any `send` (in-process, tests) and this
module is the only one that knows about httpx.

What the worker posts to the orchestrator (callbacks, single or batched, heartbeats, read-URL
requests) is safe to repeat: the server fences each by attempt and token, and a callback that
already committed answers `duplicate`. So `HttpSender` retries a POST that met a throttle
(429), a server error (500, 502, 503, 504) or a connection failure or timeout, with jittered
exponential backoff ("full jitter": a delay drawn uniformly between 0 and min(cap, base x 2^n),
so that workers throttled together do not come back together), honouring a Retry-After the
server sends, until a deadline: its own (5 minutes by default) or an earlier one set around the
call with `retry_limits` (the SDK does: a heartbeat is not retried past its next interval, a
Lambda worker stops before its invocation's deadline). Other 4xx answers are never retried.
"""

from __future__ import annotations

import contextvars
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "CALLBACK_DEADLINE_S",
    "RETRY_STATUSES",
    "Backoff",
    "HttpSender",
    "StorageHTTPError",
    "TransientHTTPError",
    "get_bytes",
    "put_bytes",
    "redact_url",
    "retry_after_s",
    "retry_limits",
    "shared_client",
    "with_retries",
]

log = logging.getLogger("tickweave.worker.http")

T = TypeVar("T")

# Answers of the orchestrator (or of the API Gateway, load balancer or proxy in front of it)
# that mean "not now": throttled, or failed before anything was decided or committed. Any other
# answer is the server's verdict and is handed to the caller.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Presigned GETs and PUTs to the object store keep their own, shorter rule (see with_retries).
_STORAGE_RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_TIMEOUT_S = 30.0
# Full-jitter backoff: the n-th retry waits uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n)).
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0
# How long a POST to the orchestrator is retried unless the caller sets an earlier deadline:
# long enough to ride out a throttled minute or a deployment, short of a task's usual lease.
CALLBACK_DEADLINE_S = 300.0
# A request near its deadline still gets this long to be answered (a shorter timeout would
# turn a slow answer into a retry that cannot happen).
_MIN_REQUEST_TIMEOUT_S = 1.0

_client_lock = threading.Lock()
_client: httpx.Client | None = None


class TransientHTTPError(Exception):
    """A status worth retrying: raised by HttpSender when its retries ran out (and inside
    with_retries's loop for presigned GETs and PUTs)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code} from {redact_url(response.request.url)}")
        self.response = response
        self.status = response.status_code


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (delays in seconds)."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S

    def bound(self, retry: int) -> float:
        """The longest delay before retry number `retry` (0 for the first retry)."""
        # The exponent is clamped: 2**1100 overflows a float long after the cap took over.
        return min(self.cap_s, self.base_s * 2.0 ** min(retry, 64))

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.bound(retry))


@dataclass(frozen=True)
class _Limits:
    deadline: float | None = None  # time.monotonic()
    tries_on_500: int | None = None

    def remaining_s(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


_NO_LIMITS = _Limits()
_limits: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("tickweave_retry_limits", default=None)


def _current_limits() -> _Limits:
    return _limits.get() or _NO_LIMITS


@contextmanager
def retry_limits(*, within_s: float | None = None, tries_on_500: int | None = None) -> Iterator[None]:
    """Calls of an HttpSender made inside (in this thread or context) stop retrying within
    `within_s` seconds from now (or at an enclosing scope's earlier deadline: scopes only
    shorten), and give up on an answer of 500 after `tries_on_500` tries. A call always makes
    its first try, whatever the time left."""
    outer = _current_limits()
    deadline = outer.deadline
    if within_s is not None:
        mine = time.monotonic() + max(0.0, within_s)
        deadline = mine if deadline is None else min(deadline, mine)
    tries = outer.tries_on_500 if tries_on_500 is None else tries_on_500
    token = _limits.set(_Limits(deadline, tries))
    try:
        yield
    finally:
        _limits.reset(token)


def retry_after_s(response: httpx.Response, *, now: datetime | None = None) -> float | None:
    """The wait a Retry-After header asks for, in seconds (delay-seconds or an HTTP-date);
    None when there is none or it cannot be read."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


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
    """Run `call`, retrying connection-level failures with exponential backoff: the presigned
    GETs and PUTs of a task's objects (a PUT of the same body to the same key is idempotent).
    Posts to the orchestrator use HttpSender's deadline-bounded retries instead."""
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
    """The default `send(url, body) -> dict` of a Worker: JSON POST, retried as the module
    docstring says.

    `attempts` caps the tries (None: only the deadline does); `deadline_s` is how long a call
    may keep retrying, shortened by an enclosing `retry_limits`. `sleep`, `clock` (monotonic
    seconds) and `rng` are injectable so that tests need not wait.

    A 4xx other than 429 (a fencing refusal, a validation error) comes back as the JSON body
    with `http_status` added, for the caller to judge; when the retries run out, the last
    failure is raised (TransientHTTPError, or the httpx transport error)."""

    def __init__(
        self,
        *,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int | None = None,
        backoff_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        deadline_s: float = CALLBACK_DEADLINE_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError("attempts must be at least 1 (or None: until the deadline)")
        self._client = client
        self._timeout_s = timeout_s
        self._attempts = attempts
        self.backoff = Backoff(backoff_s, backoff_cap_s)
        self._deadline_s = deadline_s
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._client or shared_client()
        limits = _current_limits()
        # The scope's deadline is in real monotonic time; measured once, it is carried over to
        # this sender's clock (which tests may fake).
        deadline = self._clock() + min(self._deadline_s, limits.remaining_s())
        tries = 0
        while True:
            tries += 1
            failure: Exception
            wait: float | None = None
            try:
                response = client.post(url, json=body, timeout=self._request_timeout(deadline))
            except httpx.TransportError as exc:
                # Refused, reset or timed out: whether the server saw it is unknown, and a
                # repeat is fenced, so it is retried like a 503.
                failure = exc
            else:
                if response.status_code not in RETRY_STATUSES:
                    return _answer(url, response)
                failure = TransientHTTPError(response)
                wait = retry_after_s(response)
                if response.status_code == 500 and limits.tries_on_500 is not None and tries >= limits.tries_on_500:
                    raise failure
            delay = self._delay(tries, wait, deadline)
            if delay is None:
                log.warning("POST %s failed (%s) after %d tries; giving up", redact_url(url), failure, tries)
                raise failure
            log.warning("POST %s failed (%s); retry %d in %.2fs", redact_url(url), failure, tries, delay)
            self._sleep(delay)

    def _delay(self, tries: int, retry_after: float | None, deadline: float) -> float | None:
        """How long to wait before the next try, or None to give up."""
        if self._attempts is not None and tries >= self._attempts:
            return None
        remaining = deadline - self._clock()
        if remaining <= 0:
            return None
        if retry_after is not None:
            # The server said when it can take the request; if not before the deadline, a try
            # sooner would only be throttled again.
            return retry_after if retry_after <= remaining else None
        return min(self.backoff.delay(tries - 1, self._rng), remaining)

    def _request_timeout(self, deadline: float) -> float:
        return min(self._timeout_s, max(_MIN_REQUEST_TIMEOUT_S, deadline - self._clock()))


def _answer(url: str, response: httpx.Response) -> dict[str, Any]:
    # Fencing refusals and validation errors come back as 4xx with a JSON body; hand that body
    # to the caller (it decides what a refusal means) and only raise without one.
    try:
        answer = response.json()
    except ValueError:
        response.raise_for_status()
        raise ValueError(f"POST {redact_url(url)}: response is not JSON") from None
    if not isinstance(answer, dict):
        response.raise_for_status()
        raise ValueError(f"POST {redact_url(url)}: response is not a JSON object")
    if response.is_error:
        answer.setdefault("http_status", response.status_code)
    return answer


def get_bytes(url: str, *, timeout_s: float = 60.0) -> bytes:
    """GET a (presigned) URL and return the body; raises on a non-2xx answer."""

    def get() -> bytes:
        response = shared_client().get(url, timeout=timeout_s)
        if response.status_code in _STORAGE_RETRY_STATUSES:
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
        if response.status_code in _STORAGE_RETRY_STATUSES:
            raise TransientHTTPError(response)
        if response.is_error:
            raise StorageHTTPError("PUT", url, response.status_code, response.content)

    with_retries(put, what="PUT presigned URL")
