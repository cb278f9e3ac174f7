"""Backpressure instead of death (issue 15, part 5): a worker target that throttles (Lambda's
TooManyRequestsException, SQS's RequestThrottled, an HTTP worker's 429) slows dispatch down and
never spends a task's attempts; a task no worker starts is retried with a growing delay and
fails (`not_started`, dead-lettered) only after the give-up time.

AWS is played by the real boto3 clients with a `before-send` hook answering as AWS does when it
throttles (moto never throttles); SQS is moto's, the HTTP worker is the real worker service
under uvicorn behind a middleware that answers 429. The tests drive the tick themselves and move
database time through tw_clock."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

import examples.tasks
from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Row
from orchestrator.dispatch.aws_lambda import LambdaTransport
from orchestrator.dispatch.base import DispatchThrottled
from orchestrator.dispatch.http import HttpTransport
from orchestrator.dispatch.sqs import SqsTransport
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.dispatcher import Dispatcher
from orchestrator.engine.service import Engine
from tests.e2e.conftest import WORKSPACE as STACK_WORKSPACE
from tests.e2e.conftest import running_stack, wait_until

from .conftest import WORKSPACE
from .test_reliability import no_grant
from .test_scheduling import set_clock
from .test_transports import serve

SECRET = "shared-worker-secret"


class _Body:
    """The raw body botocore reads a response from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Any:
        yield self._data


class FakeAws:
    """AWS as a boto3 client sees it when it throttles: the first `throttle_first` calls of
    `operation` get AWS's throttling answer, later ones go through (`passthrough`: on to the
    real endpoint, moto's; otherwise Lambda's 202 for an asynchronous invoke). Every call's
    request body is kept."""

    def __init__(self, service: str, operation: str, *, throttle_first: int, passthrough: bool = False,
                 endpoint_url: str | None = None) -> None:
        self.remaining = throttle_first
        self.passthrough = passthrough
        self.accepted: list[bytes] = []
        self.throttled = 0
        self._lock = threading.Lock()
        # One try per call: what the transport sees is what AWS answered, not botocore's retries.
        self.client = boto3.client(service, region_name="us-east-1", endpoint_url=endpoint_url,
                                   aws_access_key_id="testing", aws_secret_access_key="testing",
                                   config=Config(retries={"total_max_attempts": 1}))
        self.client.meta.events.register(f"before-send.{service}.{operation}", self._answer)

    def _answer(self, request: Any, **_: Any) -> AWSResponse | None:
        with self._lock:
            if self.remaining > 0:
                self.remaining -= 1
                self.throttled += 1
                return self._throttle(request)
            body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
            self.accepted.append(body)
        if self.passthrough:
            return None
        return AWSResponse(request.url, 202, {}, _Body(b""))

    def _throttle(self, request: Any) -> AWSResponse:
        if "lambda" in request.url:
            return AWSResponse(request.url, 429, {"x-amzn-ErrorType": "TooManyRequestsException",
                                                  "Content-Type": "application/json"},
                               _Body(b'{"Type":"User","message":"Rate Exceeded.","Reason":"CallerRateLimitExceeded"}'))
        return AWSResponse(request.url, 400, {"x-amzn-query-error": "RequestThrottled;Sender",
                                              "Content-Type": "application/x-amz-json-1.0"},
                           _Body(b'{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Request is throttled."}'))


def use_settings(engine: Engine, **overrides: Any) -> Settings:
    settings = engine.settings.with_overrides(**overrides)
    engine.settings = engine.dispatcher.settings = settings
    return settings


def fan_out(engine: Engine, pipeline_id: str, width: int, **node: Any) -> Any:
    engine.create_pipeline(WORKSPACE, {"id": pipeline_id, "versions": [f"v{i:02d}" for i in range(width)],
                                       "nodes": [{"id": "x", "task": "echo", **node}]})
    return engine.trigger_run(WORKSPACE, pipeline_id, dispatch_now=False)


def finish_ids(engine: Engine, task_ids: list[str]) -> None:
    """What a worker does with each delivered task: run it, call back success (the current attempt)."""
    for task_id in task_ids:
        def work(conn: Connection, task_id: str = task_id) -> None:
            row = conn.execute("SELECT id, attempt, claim_token FROM tasks WHERE id = %s AND status = 'dispatched'",
                               (task_id,)).fetchone()
            assert row is not None, f"task {task_id} was delivered but is not out with a worker"
            finish_attempt(conn, row["id"], row["attempt"], row["claim_token"], succeeded=True,
                           output={"key": f"k/{task_id}"}, error=None, retryable=True)
        engine.db.run_in_transaction(work)


def rows(engine: Engine, sql: str, *params: Any) -> list[Row]:
    with engine.db.connection() as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[call-overload, no-any-return]


def target_row(engine: Engine, target: str) -> Row | None:
    found = rows(engine, "SELECT * FROM dispatch_targets WHERE target = %s", target)
    return found[0] if found else None


def assert_nothing_spent(engine: Engine, run_id: Any, max_attempts: dict[Any, int]) -> None:
    """Every task of the run succeeded on its first attempt, with one attempt row, no dispatch
    failure counted, and the attempt budget it started with."""
    tasks = rows(engine, "SELECT id, status, attempt, max_attempts, dispatch_failures FROM tasks "
                         "WHERE run_id = %s", run_id)
    assert {t["status"] for t in tasks} == {"succeeded"}
    assert {(t["attempt"], t["dispatch_failures"]) for t in tasks} == {(1, 0)}
    assert {t["id"]: t["max_attempts"] for t in tasks} == max_attempts
    attempts = rows(engine, "SELECT a.task_id, a.status FROM task_attempts a JOIN tasks t ON t.id = a.task_id "
                            "WHERE t.run_id = %s", run_id)
    assert sorted(a["status"] for a in attempts) == ["succeeded"] * len(tasks)


def budgets(engine: Engine, run_id: Any) -> dict[Any, int]:
    return {t["id"]: t["max_attempts"] for t in rows(engine, "SELECT id, max_attempts FROM tasks WHERE run_id = %s",
                                                      run_id)}


def drive(engine: Engine, step: timedelta, until: Callable[[], bool], *, after_tick: Callable[[], None],
          ticks: int = 80) -> list[Any]:
    """Tick, let the workers act, move database time on by `step`; until `until()` holds."""
    clock = datetime.now(UTC)
    summaries = []
    for _ in range(ticks):
        set_clock(engine, clock)
        summaries.append(engine.tick())
        after_tick()
        if until():
            return summaries
        clock += step
    raise AssertionError(f"not done after {ticks} ticks: {[s.to_dict() for s in summaries[-3:]]}")


def run_done(engine: Engine, run_id: Any, workspace: str = WORKSPACE) -> Callable[[], bool]:
    return lambda: engine.get_run(workspace, run_id)[0]["status"] in ("succeeded", "failed")


# --- lambda --------------------------------------------------------------------------------------


def test_a_throttled_lambda_slows_dispatch_spends_nothing_and_every_task_finishes(engine: Engine) -> None:
    use_settings(engine, throttle_capacity_ceiling=16)
    aws = FakeAws("lambda", "Invoke", throttle_first=30)
    transport = LambdaTransport("tickweave-worker", region="us-east-1", client=aws.client)
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = no_grant
    run = fan_out(engine, "fan", 20)
    budget = budgets(engine, run.id)
    seen = [0]
    capacities: list[int | None] = []

    def worker() -> None:
        delivered = [json.loads(body)["task_id"] for body in aws.accepted[seen[0]:]]
        seen[0] = len(aws.accepted)
        finish_ids(engine, delivered)
        row = target_row(engine, transport.target)
        capacities.append(None if row is None else int(row["capacity"]))

    first = engine.tick()
    # Every invoke of the first tick was throttled: nothing sent, nothing spent, all ready again.
    assert (first.claimed, first.dispatched, first.dispatch_failed) == (20, 0, 0) and aws.throttled == 20
    waiting = rows(engine, "SELECT status, attempt, error, dispatch_deferrals, available_at > tw_now() AS later "
                           "FROM tasks WHERE run_id = %s", run.id)
    assert {(w["status"], w["attempt"], w["error"]["code"], w["dispatch_deferrals"], w["later"])
            for w in waiting} == {("ready", 0, "throttled", 1, True)}
    assert rows(engine, "SELECT count(*) AS n FROM task_attempts a JOIN tasks t ON t.id = a.task_id "
                        "WHERE t.run_id = %s", run.id)[0]["n"] == 0
    throttled = target_row(engine, transport.target)
    assert throttled is not None and throttled["capacity"] == 10
    # The capacity is in the database: another API environment (a fresh dispatcher, as after a
    # cold start) holds back from the resting target too.
    other = Dispatcher(engine.settings, engine.db, engine.keyring, {"lambda": LambdaTransport(
        "tickweave-worker", region="us-east-1", client=aws.client)})
    assert other.claim_limit(100) == 0

    later = drive(engine, timedelta(seconds=15), run_done(engine, run.id), after_tick=worker)
    assert engine.get_run(WORKSPACE, run.id)[0]["status"] == "succeeded"
    assert_nothing_spent(engine, run.id, budget)
    assert len(aws.accepted) == 20  # each task delivered exactly once: no throttled invoke counted as sent
    # Dispatch slowed: never more than the halved capacity per tick while throttled, a tick that
    # sent nothing while the target rested, and the capacity grew back as invokes went through.
    tried = [s.claimed for s in later]
    assert max(tried) <= 10 and 0 in tried[:3], tried
    # resting at 10, throttled again: halved to 5; then grown by half each clean window until
    # it reached the ceiling and the target was healthy again (no row)
    low = capacities.index(5)
    assert set(capacities[:low]) == {10}, capacities
    grown = capacities[low:-1]
    assert grown == sorted(grown) and len(set(grown)) >= 3 and capacities[-1] is None, capacities


def test_a_task_handed_to_lambda_has_a_lease_covering_the_maximum_event_age(engine: Engine) -> None:
    aws = FakeAws("lambda", "Invoke", throttle_first=0)
    engine.transports["local"] = LambdaTransport("tickweave-worker", region="us-east-1", client=aws.client,
                                                 max_event_age_s=900)
    engine.dispatcher._issue_grant = no_grant
    run = fan_out(engine, "leased", 1, heartbeat_s=30)
    assert engine.tick().dispatched == 1
    (task,) = rows(engine, "SELECT status, EXTRACT(EPOCH FROM lease_expires_at - dispatched_at) AS lease_s "
                           "FROM tasks WHERE run_id = %s", run.id)
    # Lambda may keep the event 900 s before a worker starts it; then its first heartbeat.
    assert task["status"] == "dispatched" and 900 + 60 <= float(task["lease_s"]) < 900 + 60 + 5


# --- a task nobody starts ------------------------------------------------------------------------


def test_a_task_never_started_is_retried_with_growing_delays_and_fails_only_after_the_give_up_time(
    engine: Engine,
) -> None:
    give_up = 1800
    use_settings(engine, not_started_give_up_s=give_up, not_started_retry_delay_s=30.0,
                 not_started_retry_max_delay_s=600.0)
    aws = FakeAws("lambda", "Invoke", throttle_first=0)  # accepts every invoke; no worker ever starts one
    engine.transports["local"] = LambdaTransport("tickweave-worker", region="us-east-1", client=aws.client,
                                                 max_event_age_s=60)
    engine.dispatcher._issue_grant = no_grant
    run = fan_out(engine, "lost", 1, heartbeat_s=5)
    clock = datetime.now(UTC)
    set_clock(engine, clock)
    statuses: list[str] = []
    for _ in range(30):
        engine.tick()
        (task,) = rows(engine, "SELECT status, lease_expires_at, available_at FROM tasks WHERE run_id = %s", run.id)
        statuses.append(task["status"])
        if task["status"] == "failed":
            break
        # past the lease of the delivery nobody starts, or past the delay before the next one
        clock = (task["lease_expires_at"] if task["status"] == "dispatched" else task["available_at"])
        set_clock(engine, clock + timedelta(seconds=1))
    assert statuses[-1] == "failed"
    (task,) = rows(engine, "SELECT id, error, finished_at, attempt, max_attempts FROM tasks WHERE run_id = %s",
                   run.id)
    attempts = rows(engine, "SELECT status, error, dispatched_at FROM task_attempts WHERE task_id = %s "
                            "ORDER BY attempt", task["id"])
    # Far more than the old five quick cycles, every one a delivery nobody started.
    assert len(attempts) > 5 and len(aws.accepted) == len(attempts)
    assert {(a["status"], a["error"]["code"]) for a in attempts} == {("dispatch_failed", "not_started")}
    # Each delivery covered Lambda's event age (60 s) plus two heartbeats, then waited longer
    # before the next: no delay the first time, then 30 s doubling, capped at 600 s.
    gaps = [(b["dispatched_at"] - a["dispatched_at"]).total_seconds() for a, b in pairwise(attempts)]
    # (the test moves the clock 1 s past each lease and 1 s past each delay)
    waits = [round(gaps[0] - 71)] + [round(g - 72) for g in gaps[1:]]
    assert waits[:5] == [0, 30, 60, 120, 240], gaps
    assert all(w <= 600 for w in waits)
    # Failed only at the first expiry past the give-up time, counted from the first expiry
    # (when it was first found not started), saying why.
    first_found = rows(engine, "SELECT finished_at FROM task_attempts WHERE task_id = %s AND attempt = 1",
                       task["id"])[0]["finished_at"]
    age = (task["finished_at"] - first_found).total_seconds()
    assert give_up <= age < give_up + 600 + 72 + 5
    assert task["error"]["code"] == "not_started" and f"{give_up} s" in task["error"]["message"]
    assert task["attempt"] < task["max_attempts"]  # its own attempts were never spent
    dead = rows(engine, "SELECT id FROM dead_letters WHERE task_id = %s AND retried_at IS NULL", task["id"])
    assert len(dead) == 1
    assert engine.get_run(WORKSPACE, run.id)[0]["status"] == "failed"
    # Retried from the dead-letter queue, it starts a new streak with the whole give-up time.
    engine.retry_dead_letter(WORKSPACE, dead[0]["id"])
    (again,) = rows(engine, "SELECT status, not_started_count, not_started_since FROM tasks WHERE id = %s",
                    task["id"])
    assert again["status"] in ("ready", "dispatched")  # (the retry dispatches it at once)
    assert (again["not_started_count"], again["not_started_since"]) == (0, None)


def test_a_heartbeat_ends_the_not_started_streak(engine: Engine) -> None:
    from orchestrator.store import tasks as task_store

    use_settings(engine, not_started_give_up_s=100)
    aws = FakeAws("lambda", "Invoke", throttle_first=0)
    engine.transports["local"] = LambdaTransport("tickweave-worker", region="us-east-1", client=aws.client,
                                                 max_event_age_s=60)
    engine.dispatcher._issue_grant = no_grant
    run = fan_out(engine, "late", 1, heartbeat_s=5)
    start = datetime.now(UTC)
    set_clock(engine, start)
    engine.tick()
    set_clock(engine, start + timedelta(seconds=72))
    engine.tick()  # not started: dispatched again at once
    (task,) = rows(engine, "SELECT id, attempt, claim_token, not_started_count FROM tasks WHERE run_id = %s", run.id)
    assert task["not_started_count"] == 1
    with engine.db.transaction() as conn:  # this delivery reaches a worker
        assert task_store.mark_running(conn, task["id"], task["attempt"], task["claim_token"], None, None)
    (task,) = rows(engine, "SELECT not_started_count, not_started_since FROM tasks WHERE run_id = %s", run.id)
    assert (task["not_started_count"], task["not_started_since"]) == (0, None)


# --- sqs -----------------------------------------------------------------------------------------


def test_sqs_throttling_slows_dispatch_and_every_message_arrives_once(engine: Engine, moto_server: MotoServer) -> None:
    aws = FakeAws("sqs", "SendMessage", throttle_first=6, passthrough=True, endpoint_url=moto_server.endpoint_url)
    queue_url = aws.client.create_queue(QueueName=f"tw-backpressure-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    transport = SqsTransport(queue_url, region="us-east-1", client=aws.client)
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = no_grant
    run = fan_out(engine, "queued", 8)
    budget = budgets(engine, run.id)
    received: list[str] = []

    def worker() -> None:
        while True:
            batch = aws.client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                return
            for message in batch:
                received.append(json.loads(message["Body"])["task_id"])
                aws.client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            finish_ids(engine, [json.loads(m["Body"])["task_id"] for m in batch])

    summaries = drive(engine, timedelta(seconds=15), run_done(engine, run.id), after_tick=worker)
    assert engine.get_run(WORKSPACE, run.id)[0]["status"] == "succeeded"
    assert_nothing_spent(engine, run.id, budget)
    assert aws.throttled == 6 and sorted(received) == sorted(str(t) for t in budget)  # each exactly once
    assert summaries[0].dispatched < 8 and max(s.claimed for s in summaries[1:]) < 8


# --- http ----------------------------------------------------------------------------------------


class Busy:
    """A proxy in front of the worker service answering the first `refuse` dispatches as a full
    service or a rate-limiting gateway does: 429 with a Retry-After."""

    def __init__(self, app: Any, refuse: int) -> None:
        self.app = app
        self.refuse = refuse
        self.refused = 0
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/dispatch" and self.refuse > 0:
            self.refuse -= 1
            self.refused += 1
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"retry-after", b"1"), (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "busy"}'})
            return
        await self.app(scope, receive, send)


def test_an_http_worker_answering_429_slows_dispatch_and_the_run_finishes(
    database_url: str, moto_server: MotoServer,
) -> None:
    proxy = Busy(examples.tasks.worker.asgi_app(auth_token=SECRET), refuse=3)
    with serve(proxy) as worker_url, running_stack(  # type: ignore[arg-type]
        database_url, moto_server, transports={"*": "http"}, worker_url=f"{worker_url}/dispatch",
        worker_auth_token=SECRET, local_worker=None,
    ) as stack:
        engine = stack.engine
        engine.create_pipeline(STACK_WORKSPACE, {"id": "busy", "versions": ["a", "b", "c", "d"],
                                           "nodes": [{"id": "x", "task": "echo"}]})
        run = engine.trigger_run(STACK_WORKSPACE, "busy", dispatch_now=False)
        budget = budgets(engine, run.id)

        def settled() -> None:
            wait_until(lambda: not rows(engine, "SELECT 1 FROM tasks WHERE run_id = %s AND status IN "
                                                "('dispatched', 'running')", run.id), 20, "a worker did not finish")

        summaries = drive(engine, timedelta(seconds=20), run_done(engine, run.id, STACK_WORKSPACE),
                          after_tick=settled)
        assert engine.get_run(STACK_WORKSPACE, run.id)[0]["status"] == "succeeded"
        assert_nothing_spent(engine, run.id, budget)
        assert proxy.refused == 3
        # after the first refusals, fewer dispatches per tick than the four that were ready
        assert summaries[0].dispatch_failed == 0 and max(s.claimed for s in summaries[1:]) < 4


def test_http_429_and_503_are_throttling_with_the_retry_after(database_url: str) -> None:
    import httpx

    answers = iter([httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(503),
                    httpx.Response(500, text="boom")])
    client = httpx.Client(transport=httpx.MockTransport(lambda request: next(answers)))
    transport = HttpTransport("http://worker.example/dispatch", client=client)
    with pytest.raises(DispatchThrottled) as first:
        transport.send({"task_id": "t"})
    assert first.value.retry_after_s == 7.0
    with pytest.raises(DispatchThrottled) as second:
        transport.send({"task_id": "t"})
    assert second.value.retry_after_s is None
    with pytest.raises(Exception) as third:  # any other refusal stays a dispatch failure
        transport.send({"task_id": "t"})
    assert not isinstance(third.value, DispatchThrottled) and "500" in str(third.value)


@pytest.mark.parametrize(("name", "raw"), [
    ("TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S", "30"), ("TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S", "21601"),
    ("TICKWEAVE_NOT_STARTED_GIVE_UP_S", "10"), ("TICKWEAVE_NOT_STARTED_GIVE_UP_S", "1h"),
    ("TICKWEAVE_THROTTLE_WINDOW_S", "0"), ("TICKWEAVE_THROTTLE_CAPACITY_CEILING", "1"),
])
def test_backpressure_settings_out_of_range_are_refused_by_name(name: str, raw: str) -> None:
    from orchestrator.config import load_settings

    with pytest.raises(ValueError, match=name):
        load_settings({name: raw})


def test_backpressure_settings_are_read_from_the_environment() -> None:
    from orchestrator.config import load_settings

    settings = load_settings({"TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S": "3600", "TICKWEAVE_NOT_STARTED_GIVE_UP_S": "7200",
                              "TICKWEAVE_THROTTLE_WINDOW_S": "5", "TICKWEAVE_THROTTLE_CAPACITY_CEILING": "50"})
    assert (settings.lambda_max_event_age_s, settings.not_started_give_up_s, settings.throttle_window_s,
            settings.throttle_capacity_ceiling) == (3600, 7200, 5.0, 50)
