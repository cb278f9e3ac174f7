"""Workers retry what is safe to retry (issue 15, part 7), against the real API: the Tickweave
app behind an ASGI middleware that throttles (429), fails (500) or is unavailable (503) for the
first requests of a route, with and without Retry-After, or that loses the answer of a request
the app committed. The worker's callback still lands exactly once (the task succeeded, one
attempt), heartbeats go on, a refusal (409, 422) is not retried, a batch throttled is retried
as a batch, and a Lambda worker gives up before its invocation's deadline.

Real Postgres and the moto S3 server (the output is written with the task's presigned grant);
the invariant checker runs after each test. The worker's backoff sleeps are injected (recorded,
not waited) and its clock is fake where a deadline is measured.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.responses import JSONResponse
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.service import Engine
from orchestrator.storage.s3 import ensure_bucket
from orchestrator.worker import TaskContext, Worker
from orchestrator.worker.http import Backoff, HttpSender, TransientHTTPError
from tests.capturing import CapturingTransport

from .conftest import WORKSPACE

API = "http://testserver"  # the TestClient's base URL: dispatches call back there


def kind(path: str) -> str:
    return "callback" if path.startswith("/api/callback/") else path.removeprefix("/api/")


class Throttle:
    """The API behind a middleware: the first requests of each kind named in `plan` are answered
    with the statuses listed (a JSON error, with `Retry-After` when given; None lets one through
    to the app); with `lost=True` they
    reach the app first and only its answer is replaced (committed, answer lost). `seen` records
    each request's kind and the status the worker got."""

    def __init__(self, app: ASGIApp, plan: dict[str, list[int | None]], *, retry_after: str | None = None,
                 lost: bool = False) -> None:
        self.app = app
        self.plan = {k: list(v) for k, v in plan.items()}
        self.retry_after = retry_after
        self.lost = lost
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        what = kind(str(scope["path"]))
        with self._lock:
            queue = self.plan.get(what)
            status = queue.pop(0) if queue else None
        if status is None:
            answered: list[int] = []

            async def recording(message: Message) -> None:
                if message["type"] == "http.response.start":
                    answered.append(int(message["status"]))
                await send(message)

            await self.app(scope, receive, recording)
            self._record(what, answered[0])
            return
        if self.lost:
            async def swallow(message: Message) -> None:
                return None

            await self.app(scope, receive, swallow)
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        await JSONResponse({"error": {"code": "throttled", "message": f"HTTP {status}", "details": None}},
                           status_code=status, headers=headers)(scope, receive, send)
        self._record(what, status)

    def _record(self, what: str, status: int) -> None:
        with self._lock:
            self.seen.append((what, status))

    def statuses(self, what: str) -> list[int]:
        with self._lock:
            return [status for k, status in self.seen if k == what]


class Sleeps:
    """The sender's sleep: recorded, not waited."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
def stored(database_url: str, moto_server: MotoServer) -> Iterator[Engine]:
    """An engine on the moto bucket (presigned grants) whose dispatches are captured."""
    settings = Settings(database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url,
                        bucket=f"retry-{uuid.uuid4().hex[:10]}", public_url=API)
    ensure_bucket(settings)
    eng = Engine(settings, Database(database_url, max_size=8), transports={"local": CapturingTransport()})
    eng.create_api_key(WORKSPACE, "admin")  # the workspace
    yield eng
    eng.close()


def captured(engine: Engine) -> CapturingTransport:
    sent = engine.transports["local"]
    assert isinstance(sent, CapturingTransport)
    return sent


def dispatched(engine: Engine, pipeline_id: str, count: int = 1) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    engine.create_pipeline(WORKSPACE, {"id": pipeline_id, "nodes": [{"id": f"t{i}", "task": "echo"}
                                                                    for i in range(count)]})
    run = engine.trigger_run(WORKSPACE, pipeline_id)
    return run.id, [captured(engine).take_node(f"t{i}") for i in range(count)]


def echo_worker(engine: Engine, api: ASGIApp, sleeps: Sleeps, sender: HttpSender | None = None) -> Worker:
    send = sender or HttpSender(client=TestClient(api), sleep=sleeps, rng=random.Random(15))
    worker = Worker(settings=engine.settings, send=send)

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node}

    return worker


def finished_once(engine: Engine, run_id: uuid.UUID) -> dict[str, tuple[str, int, int]]:
    """Per node: its status, its attempt number and how many attempts were recorded succeeded."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT t.node_id, t.status, t.attempt, count(a.*) FILTER (WHERE a.status = 'succeeded') AS n
               FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id WHERE t.run_id = %s
               GROUP BY t.node_id, t.status, t.attempt""", (run_id,)).fetchall()
    return {r["node_id"]: (r["status"], int(r["attempt"]), int(r["n"])) for r in rows}


def run_status(engine: Engine, run_id: uuid.UUID) -> str:
    return str(engine.get_run(WORKSPACE, run_id)[0]["status"])


@pytest.mark.parametrize("retry_after", [None, "2"])
def test_a_throttled_and_failing_callback_lands_exactly_once(stored: Engine, retry_after: str | None) -> None:
    api = Throttle(create_app(stored.settings, stored), {"heartbeat": [429], "callback": [429, 500, 503]},
                   retry_after=retry_after)
    sleeps = Sleeps()
    run_id, (message,) = dispatched(stored, "throttled")

    answer = echo_worker(stored, api, sleeps).execute(message)

    assert (answer["accepted"], answer["outcome"]) == (True, "succeeded")
    assert api.statuses("heartbeat") == [429, 200]
    assert api.statuses("callback") == [429, 500, 503, 200]
    if retry_after is None:
        # Full jitter from base 0.5 s: the n-th retry of a call waits at most 0.5 * 2**n.
        bounds = [Backoff().bound(0), Backoff().bound(0), Backoff().bound(1), Backoff().bound(2)]
        assert len(sleeps.slept) == 4 and all(0 <= s <= b for s, b in zip(sleeps.slept, bounds, strict=True))
    else:
        assert sleeps.slept == [2.0] * 4  # the server's word, each time
    assert finished_once(stored, run_id) == {"t0": ("succeeded", 1, 1)}
    assert run_status(stored, run_id) == "succeeded"


def test_a_callback_whose_answer_was_lost_after_it_committed_is_answered_duplicate(stored: Engine) -> None:
    # The app records the callback, then the answer is lost (a 503 from a proxy, a reset): the
    # retry is fenced by the attempt's token, and the server answers that it already has it.
    api = Throttle(create_app(stored.settings, stored), {"callback": [503]}, lost=True)
    run_id, (message,) = dispatched(stored, "lost")

    answer = echo_worker(stored, api, Sleeps()).execute(message)

    assert api.statuses("callback") == [503, 200]
    assert answer["outcome"] == "duplicate" and answer["task_status"] == "succeeded"
    assert finished_once(stored, run_id) == {"t0": ("succeeded", 1, 1)}
    assert run_status(stored, run_id) == "succeeded"


def lambda_worker_event(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Records": [{"messageId": f"m{i}", "body": json.dumps(m), "eventSource": "aws:sqs"}
                        for i, m in enumerate(messages)]}


def test_a_batch_throttled_is_retried_as_a_batch_and_lands_once(stored: Engine) -> None:
    api = Throttle(create_app(stored.settings, stored), {"callbacks": [429, 429, 503]}, retry_after="1")
    sleeps = Sleeps()
    run_id, messages = dispatched(stored, "batch", 4)

    answer = echo_worker(stored, api, sleeps).lambda_handler(lambda_worker_event(messages))

    assert answer == {"batchItemFailures": []}
    assert api.statuses("callbacks") == [429, 429, 503, 200]
    assert api.statuses("callback") == []  # never split into single callbacks
    assert sleeps.slept == [1.0, 1.0, 1.0]
    assert finished_once(stored, run_id) == {f"t{i}": ("succeeded", 1, 1) for i in range(4)}
    assert run_status(stored, run_id) == "succeeded"


def test_a_batch_that_keeps_answering_500_is_sent_one_by_one(stored: Engine) -> None:
    api = Throttle(create_app(stored.settings, stored), {"callbacks": [500] * 10})
    run_id, messages = dispatched(stored, "poisoned", 3)

    answer = echo_worker(stored, api, Sleeps()).lambda_handler(lambda_worker_event(messages))

    assert answer == {"batchItemFailures": []}
    assert api.statuses("callbacks") == [500, 500, 500]
    assert api.statuses("callback") == [200, 200, 200]
    assert finished_once(stored, run_id) == {f"t{i}": ("succeeded", 1, 1) for i in range(3)}


def test_heartbeats_go_on_through_throttling(stored: Engine) -> None:
    # Every other heartbeat after the first is throttled or fails; each is retried within its
    # interval, the lease keeps being extended, and the task ends as usual.
    api = Throttle(create_app(stored.settings, stored), {"heartbeat": [429, None, 503, None, 500]})
    run_id, (message,) = dispatched(stored, "beating")
    message["heartbeat_interval_s"] = 0.05
    worker = Worker(settings=stored.settings, send=HttpSender(client=TestClient(api), sleep=Sleeps()))
    leases: list[Any] = []

    def lease(task_id: str) -> Any:
        with stored.db.connection() as conn:
            row = conn.execute("SELECT lease_expires_at FROM tasks WHERE id = %s", (task_id,)).fetchone()
        assert row is not None
        return row["lease_expires_at"]

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        leases.append(lease(ctx.task_id))  # as the first beat left it
        deadline = time.monotonic() + 20
        while api.statuses("heartbeat").count(200) < 4:  # the first beat and three from the thread
            assert time.monotonic() < deadline, api.seen
            threading.Event().wait(0.01)
        leases.append(lease(ctx.task_id))
        return {"node": ctx.node}

    answer = worker.execute(message)

    assert answer["outcome"] == "succeeded"
    # The first beat (before the task runs), then the heartbeat thread's: each retried at once.
    assert api.statuses("heartbeat")[:6] == [429, 200, 503, 200, 500, 200]
    assert leases[1] > leases[0]  # the heartbeats that got through extended the lease
    assert finished_once(stored, run_id) == {"t0": ("succeeded", 1, 1)}


def test_a_refusal_is_not_retried(stored: Engine) -> None:
    api = Throttle(create_app(stored.settings, stored), {})
    sleeps = Sleeps()
    run_id, (message,) = dispatched(stored, "refused")
    worker = echo_worker(stored, api, sleeps)
    assert worker.execute(message)["outcome"] == "succeeded"
    sender = HttpSender(client=TestClient(api), sleep=sleeps)

    # 422: a malformed callback, answered once with its reason.
    bad = sender(message["callback_url"], {"token": message["token"], "status": "done"})
    # 409: the task finished, so this attempt's heartbeat is refused (the SDK then stops beating).
    stale = sender(message["heartbeat_url"], {"token": message["token"]})
    # And the dispatch delivered again: its first heartbeat is refused, nothing runs or calls back.
    again = worker.execute(message)

    assert bad["http_status"] == 422 and "status" in json.dumps(bad["error"])
    assert (stale["http_status"], stale["accepted"]) == (409, False)
    assert again["accepted"] is False and again["http_status"] == 409
    assert api.statuses("callback") == [200, 422]
    assert api.statuses("heartbeat") == [200, 409, 409]
    assert sleeps.slept == []
    assert finished_once(stored, run_id) == {"t0": ("succeeded", 1, 1)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_lambda_worker_gives_up_at_its_deadline_and_hands_the_record_back(stored: Engine) -> None:
    # The API is unavailable for callbacks for as long as the worker tries. The Lambda has 32 s
    # left: the worker retries for 30 s of (fake) time and answers with the record failed, so
    # SQS delivers it again; nothing was recorded, the task is still running on its lease.
    api = Throttle(create_app(stored.settings, stored), {"callbacks": [503] * 1000, "callback": [503] * 1000})
    clock = FakeClock()
    run_id, messages = dispatched(stored, "deadline", 2)
    worker = echo_worker(stored, api, Sleeps(), HttpSender(client=TestClient(api), sleep=clock.sleep, clock=clock,
                                                           rng=random.Random(3)))
    context = SimpleNamespace(get_remaining_time_in_millis=lambda: 32_000)

    answer = worker.lambda_handler(lambda_worker_event(messages), context)

    assert answer == {"batchItemFailures": [{"itemIdentifier": "m0"}, {"itemIdentifier": "m1"}]}
    assert 20.0 <= clock.now <= 30.0  # stopped at the deadline (less the real time the tasks took)
    tries = api.statuses("callbacks")
    assert len(tries) > 3 and set(tries) == {503}
    assert api.statuses("callback") == []
    assert finished_once(stored, run_id) == {f"t{i}": ("running", 1, 0) for i in range(2)}
    with pytest.raises(TransientHTTPError):  # and a direct invoke raises (async invokes retry it)
        worker.lambda_handler(messages[0], SimpleNamespace(get_remaining_time_in_millis=lambda: 2_500))
