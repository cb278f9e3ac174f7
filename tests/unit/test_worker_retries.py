"""The worker's retries of what is safe to repeat (issue 15, part 7): HttpSender retries a POST to
the orchestrator answered 429, 500, 502, 503 or 504, or that met a connection failure or a
timeout, with full-jitter exponential backoff and Retry-After, up to a deadline; other 4xx are
the server's verdict and are not retried. The SDK bounds a heartbeat's retries by its interval
and a Lambda worker's by its invocation's remaining time.

httpx.MockTransport stands in for the network, a fake clock for time (its sleeps advance it):
nothing here waits. The real API behind a throttling middleware is in
tests/integration/test_worker_retries.py.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from infra.s3 import MotoServer
from orchestrator.worker import TaskContext, Worker
from orchestrator.worker import sdk as sdk_module
from orchestrator.worker.http import (
    BACKOFF_CAP_S,
    CALLBACK_DEADLINE_S,
    Backoff,
    HttpSender,
    TransientHTTPError,
    retry_after_s,
    retry_limits,
)

from .test_worker_sdk import Harness

URL = "http://o.test/api/callback/1"


class FakeClock:
    """Monotonic seconds that move only when the sender sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


class Server:
    """A mock orchestrator answering with `answer(n)` for its n-th request (from 1)."""

    def __init__(self, answer: Callable[[int, httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            n = len(self.requests)
        return self.answer(n, request)

    def paths(self) -> list[str]:
        with self._lock:
            return [r.url.path for r in self.requests]


def sender(server: Server, clock: FakeClock, *, seed: int = 15, **kwargs: Any) -> HttpSender:
    return HttpSender(client=httpx.Client(transport=httpx.MockTransport(server)), sleep=clock.sleep, clock=clock,
                      rng=random.Random(seed), **kwargs)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"accepted": True, "outcome": "succeeded"})


def first(count: int, status: int, headers: dict[str, str] | None = None) -> Callable[[int, httpx.Request], httpx.Response]:
    """`status` for the first `count` requests, then 200."""

    def answer(n: int, request: httpx.Request) -> httpx.Response:
        if n <= count:
            return httpx.Response(status, headers=headers, json={"error": {"code": "x", "message": "not now"}})
        return ok(request)

    return answer


# --- backoff ------------------------------------------------------------------------------------


def test_full_jitter_stays_within_its_bounds_and_spreads_over_them() -> None:
    backoff = Backoff(base_s=0.5, cap_s=10.0)
    assert [backoff.bound(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.bound(5000) == 10.0  # no overflow far past the cap
    rng = random.Random(20261203)
    for retry in range(8):
        delays = [backoff.delay(retry, rng) for _ in range(400)]
        bound = backoff.bound(retry)
        assert all(0.0 <= d <= bound for d in delays), retry
        # Spread over the whole range (full jitter), not bunched at the bound (equal jitter)
        # or fixed: workers throttled together come back at different times.
        assert min(delays) < 0.05 * bound and max(delays) > 0.95 * bound, retry
        assert len(set(delays)) == len(delays)
    # Seeded, the same draws: the sender's rng is injectable for tests.
    assert [backoff.delay(3, random.Random(1)) for _ in range(3)] == [backoff.delay(3, random.Random(1))] * 3


def test_the_sender_waits_full_jitter_delays_growing_to_the_cap() -> None:
    clock = FakeClock()
    server = Server(first(9, 503))
    answer = sender(server, clock, seed=42)(URL, {"token": "t"})

    assert answer == {"accepted": True, "outcome": "succeeded"}
    assert len(server.requests) == 10 and len(clock.sleeps) == 9
    expected_rng = random.Random(42)
    backoff = Backoff()
    assert clock.sleeps == [expected_rng.uniform(0.0, backoff.bound(n)) for n in range(9)]
    assert all(s <= min(BACKOFF_CAP_S, 0.5 * 2**n) for n, s in enumerate(clock.sleeps))


# --- what is retried, what is not -------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_throttles_and_server_errors_are_retried(status: int) -> None:
    clock = FakeClock()
    server = Server(first(2, status))
    assert sender(server, clock)(URL, {"token": "t"})["accepted"] is True
    assert len(server.requests) == 3
    assert all(json.loads(r.content) == {"token": "t"} for r in server.requests)  # the same body each time


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError])
def test_connection_failures_and_timeouts_are_retried(failure: type[httpx.TransportError]) -> None:
    def answer(n: int, request: httpx.Request) -> httpx.Response:
        if n == 1:
            raise failure("lost", request=request)
        return ok(request)

    server = Server(answer)
    assert sender(server, FakeClock())(URL, {})["accepted"] is True
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_other_4xx_are_the_servers_verdict_and_not_retried(status: int) -> None:
    clock = FakeClock()
    server = Server(lambda n, r: httpx.Response(status, json={"accepted": False, "reason": "no"}))
    answer = sender(server, clock)(URL, {})
    assert answer == {"accepted": False, "reason": "no", "http_status": status}
    assert len(server.requests) == 1 and clock.sleeps == []


def test_retry_after_in_seconds_or_as_a_date_is_honoured() -> None:
    clock = FakeClock()
    server = Server(first(2, 429, {"Retry-After": "7"}))
    sender(server, clock)(URL, {})
    assert clock.sleeps == [7.0, 7.0]

    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    clock = FakeClock()
    sender(Server(first(1, 503, {"Retry-After": later})), clock)(URL, {})
    (slept,) = clock.sleeps
    assert 27.0 <= slept <= 30.0


def test_retry_after_is_read_as_delay_seconds_or_http_date() -> None:
    now = datetime(2026, 12, 3, 6, 0, tzinfo=UTC)

    def header(value: str) -> float | None:
        return retry_after_s(httpx.Response(429, headers={"Retry-After": value}), now=now)

    assert header("120") == 120.0
    assert header("Thu, 03 Dec 2026 06:01:30 GMT") == 90.0
    assert header("Thu, 03 Dec 2026 05:00:00 GMT") == 0.0  # in the past: at once
    assert header("-5") == 0.0
    assert header("soon") is None and header("inf") is None
    assert retry_after_s(httpx.Response(429)) is None


def test_a_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    clock = FakeClock()
    server = Server(first(5, 429, {"Retry-After": "3600"}))
    with pytest.raises(TransientHTTPError) as raised:
        sender(server, clock)(URL, {})
    assert raised.value.status == 429
    assert len(server.requests) == 1 and clock.sleeps == []


# --- deadlines ---------------------------------------------------------------------------------------


def test_a_server_that_always_answers_503_is_given_up_at_the_deadline() -> None:
    clock = FakeClock()
    start = clock.now
    server = Server(lambda n, r: httpx.Response(503, text="unavailable"))
    with pytest.raises(TransientHTTPError) as raised:
        sender(server, clock)(URL, {})

    assert raised.value.status == 503
    # Retried until the 5-minute deadline and not past it: the last wait is cut to end there,
    # the last try is made at the deadline.
    assert clock.now - start == pytest.approx(CALLBACK_DEADLINE_S)
    assert sum(clock.sleeps) == pytest.approx(CALLBACK_DEADLINE_S)
    assert max(clock.sleeps) <= BACKOFF_CAP_S
    assert len(server.requests) == len(clock.sleeps) + 1
    # Full jitter averages half the cap once there: about 60 tries in 5 minutes, not thousands.
    assert 30 < len(server.requests) < 120


def test_attempts_and_a_short_deadline_cap_the_retries() -> None:
    clock = FakeClock()
    server = Server(lambda n, r: httpx.Response(500, text="oops"))
    with pytest.raises(TransientHTTPError):
        sender(server, clock, attempts=3)(URL, {})
    assert len(server.requests) == 3

    clock = FakeClock()
    start = clock.now
    with pytest.raises(TransientHTTPError):
        sender(Server(lambda n, r: httpx.Response(502)), clock, deadline_s=4.0)(URL, {})
    assert clock.now - start == pytest.approx(4.0)


def test_retry_limits_only_shorten_and_bound_500s() -> None:
    clock = FakeClock()
    server = Server(lambda n, r: httpx.Response(503))
    with retry_limits(within_s=0), pytest.raises(TransientHTTPError):
        sender(server, clock)(URL, {})
    assert len(server.requests) == 1 and clock.sleeps == []  # the first try is always made

    clock = FakeClock()
    start = clock.now
    with (retry_limits(within_s=3600), retry_limits(within_s=20), retry_limits(within_s=600),
          pytest.raises(TransientHTTPError)):
        sender(Server(lambda n, r: httpx.Response(503)), clock)(URL, {})
    assert clock.now - start == pytest.approx(20.0, abs=0.5)  # the innermost cannot lengthen the outer

    server = Server(lambda n, r: httpx.Response(500))
    with retry_limits(tries_on_500=2), pytest.raises(TransientHTTPError):
        sender(server, FakeClock())(URL, {})
    assert len(server.requests) == 2
    # ... and only 500s: a 503 under the same limit is retried as usual.
    server = Server(first(4, 503))
    with retry_limits(tries_on_500=2):
        assert sender(server, FakeClock())(URL, {})["accepted"] is True
    assert len(server.requests) == 5


# --- the SDK's bounds ----------------------------------------------------------------------------


@pytest.fixture
def harness(moto_server: MotoServer) -> Harness:
    return Harness(moto_server, role=False)


def echo_worker(harness: Harness, send: Any) -> Worker:
    worker = Worker(settings=harness.settings, send=send)

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node}

    return worker


def test_a_heartbeat_is_retried_only_until_the_next_one_is_due(harness: Harness) -> None:
    clock = FakeClock()
    start = clock.now
    server = Server(lambda n, r: httpx.Response(503))
    worker = echo_worker(harness, sender(server, clock))

    with pytest.raises(TransientHTTPError):
        worker.execute(harness.dispatch("echo", heartbeat_interval_s=5))

    # The first heartbeat (which would mark the task running) gave up after its 5 s interval,
    # not the 5 minutes of a callback; no callback followed (the task did not run).
    assert clock.now - start == pytest.approx(5.0, abs=0.5)
    assert set(server.paths()) == {"/api/heartbeat"}


class LambdaContext(SimpleNamespace):
    def get_remaining_time_in_millis(self) -> int:
        return int(self.millis)


def test_a_lambda_worker_stops_retrying_before_its_deadline(harness: Harness) -> None:
    def answer(n: int, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/heartbeat":
            return httpx.Response(200, json={"accepted": True})
        return httpx.Response(503)

    server = Server(answer)
    worker = echo_worker(harness, sender(server, FakeClock()))
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(2)]
    event = {"Records": [{"messageId": f"m{i}", "body": json.dumps(d)} for i, d in enumerate(dispatches)]}

    # 1.5 s left, less the 2 s margin: no time to retry; the batch is tried once, and its
    # records go back to the queue while the invocation can still answer.
    outcome = worker.lambda_handler(event, LambdaContext(millis=1500))

    assert outcome == {"batchItemFailures": [{"itemIdentifier": "m0"}, {"itemIdentifier": "m1"}]}
    assert server.paths().count("/api/callbacks") == 1
    assert "/api/callback/" not in "".join(server.paths())


def test_the_lambda_deadline_comes_from_the_context_less_the_margin() -> None:
    assert sdk_module._lambda_time_left_s(LambdaContext(millis=62_000)) == 62.0 - sdk_module.LAMBDA_DEADLINE_MARGIN_S
    assert sdk_module._lambda_time_left_s(LambdaContext(millis=500)) == 0.0
    assert sdk_module._lambda_time_left_s(None) is None
    assert sdk_module._lambda_time_left_s(object()) is None


def test_a_batch_answered_429_is_retried_as_a_batch_not_split(harness: Harness) -> None:
    def answer(n: int, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/heartbeat":
            return httpx.Response(200, json={"accepted": True})
        if request.url.path == "/api/callbacks":
            if sum(p == "/api/callbacks" for p in server.paths()) <= 3:
                return httpx.Response(429, headers={"Retry-After": "1"})
            items = json.loads(request.content)["callbacks"]
            return httpx.Response(200, json={"results": [
                {"task_id": i["task_id"], "status": 200, "accepted": True, "outcome": "succeeded",
                 "task_status": "succeeded", "run_status": None} for i in items]})
        return httpx.Response(500)

    server = Server(answer)
    clock = FakeClock()
    worker = echo_worker(harness, sender(server, clock))
    answers = worker.execute_many([harness.dispatch("echo", node=f"n{i}") for i in range(3)])

    assert [a["outcome"] for a in answers] == ["succeeded"] * 3  # type: ignore[index]
    assert server.paths().count("/api/callbacks") == 4
    assert not any(p.startswith("/api/callback/") for p in server.paths())
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_a_batch_that_keeps_answering_503_fails_its_dispatches_without_single_callbacks(harness: Harness) -> None:
    def answer(n: int, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/heartbeat":
            return httpx.Response(200, json={"accepted": True})
        return httpx.Response(503)

    server = Server(answer)
    worker = echo_worker(harness, sender(server, FakeClock(), deadline_s=30))
    answers = worker.execute_many([harness.dispatch("echo", node=f"n{i}") for i in range(2)])

    assert all(isinstance(a, TransientHTTPError) for a in answers)
    assert server.paths().count("/api/callbacks") > 2
    assert not any(p.startswith("/api/callback/") for p in server.paths())
