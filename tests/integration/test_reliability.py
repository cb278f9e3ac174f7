"""Dead letters, dispatch failures, cancellation, redrive, human steps, trigger rules and
idempotency, against the real database and the real app."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Connection, Row
from orchestrator.dispatch.base import DispatchError
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE
from .test_scheduling import set_clock

KEY = "acme-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def claim(engine: Engine, limit: int = 100) -> list[Row]:
    """Claim what is ready, and return every task now out with a worker (the API's eager
    dispatch may have claimed some already: the accepting transport below took them)."""
    with engine.db.transaction() as conn:
        task_store.claim_ready_tasks(conn, limit)
        return conn.execute(
            """SELECT id, attempt, claim_token, node_id, run_id FROM tasks WHERE status = 'dispatched'
               ORDER BY created_at, position, version"""
        ).fetchall()


@pytest.fixture(autouse=True)
def accepting_transport(engine: Engine) -> None:
    """Dispatches are accepted and left for the test to finish, as a worker that never calls back."""
    engine.transports["local"] = FlakyTransport(failures=0)
    engine.dispatcher._issue_grant = no_grant


def finish(engine: Engine, task: Row, ok: bool = True, retryable: bool = True) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
                              output={"key": f"k/{task['node_id']}"} if ok else None,
                              error=None if ok else {"message": "boom", "code": "e1", "retryable": retryable},
                              retryable=retryable)
    return engine.db.run_in_transaction(work)


def statuses(engine: Engine, run_id: Any) -> dict[str, str]:
    _, tasks = engine.get_run(WORKSPACE, run_id)
    return {t["node_id"]: t["status"] for t in tasks}


def run_status(engine: Engine, run_id: Any) -> str:
    return str(engine.get_run(WORKSPACE, run_id)[0]["status"])


SEQ = {"id": "seq", "steps": [{"id": "one", "task": "echo"},
                              {"id": "two", "task": "fail", "retry": {"max_attempts": 2, "base_delay_s": 0}},
                              {"id": "three", "task": "echo"}]}


def test_exhausted_task_is_dead_lettered_with_every_attempt_and_can_be_retried(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, SEQ)
    run = engine.trigger_run(WORKSPACE, "seq", dispatch_now=False)
    finish(engine, claim(engine)[0])
    finish(engine, claim(engine)[0], ok=False)
    assert finish(engine, claim(engine)[0], ok=False).outcome == "failed"
    assert run_status(engine, run.id) == "failed"

    page = client.get("/api/dlq", headers=AUTH).json()
    (entry,) = page["items"]
    assert (entry["node_id"], entry["pipeline_id"], entry["run_id"]) == ("two", "seq", str(run.id))
    assert [a["status"] for a in entry["attempts"]] == ["failed", "failed"]
    assert entry["attempts"][0]["error"]["message"] == "boom"
    assert entry["inputs"] == {"one": {"key": "k/one"}} and entry["code_version"] == "pipeline version 1"
    assert client.get("/api/dlq?pipeline=other", headers=AUTH).json()["items"] == []

    retried = client.post(f"/api/dlq/{entry['id']}/retry", headers=AUTH)
    assert retried.status_code == 200 and retried.json()["run_status"] == "running"
    assert client.post(f"/api/dlq/{entry['id']}/retry", headers=AUTH).status_code == 409  # once
    assert client.get("/api/dlq", headers=AUTH).json()["items"] == []
    # the retried task was dispatched at once by the request
    assert statuses(engine, run.id) == {"one": "succeeded", "two": "dispatched", "three": "pending"}
    finish(engine, claim(engine)[0])
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"
    task, attempts = engine.get_task(WORKSPACE, entry["task_id"])
    assert task["attempt"] == 3 and [a["status"] for a in attempts] == ["failed", "failed", "succeeded"]


def test_dlq_purge_and_pagination(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": [{"id": "x", "task": "fail", "on_failure": "continue"}]})
    engine.trigger_run(WORKSPACE, "wide", versions=[f"v{i}" for i in range(5)], dispatch_now=False)
    for task in claim(engine):
        finish(engine, task, ok=False, retryable=False)
    first = client.get("/api/dlq?limit=3", headers=AUTH).json()
    second = client.get(f"/api/dlq?limit=3&cursor={first['next_cursor']}", headers=AUTH).json()
    assert len(first["items"]) == 3 and len(second["items"]) == 2
    assert {e["id"] for e in first["items"]}.isdisjoint({e["id"] for e in second["items"]})
    assert client.post("/api/dlq/purge", json={"older_than_days": 1}, headers=AUTH).json() == {"purged": 0}
    assert client.post("/api/dlq/purge", json={"older_than_days": -1}, headers=AUTH).status_code == 422
    from datetime import UTC, datetime, timedelta
    set_clock(engine, datetime.now(UTC) + timedelta(days=3))
    assert client.post("/api/dlq/purge", json={"older_than_days": 2}, headers=AUTH).json() == {"purged": 5}


class FlakyTransport:
    name = "local"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise DispatchError("connection refused")
        self.sent.append(message)

    def close(self) -> None:
        pass


def no_grant(settings: Any, **kwargs: Any) -> None:
    return None


def test_dispatch_failures_do_not_spend_attempts_and_dead_letter_past_the_limit(engine: Engine) -> None:
    from datetime import UTC, datetime, timedelta

    transport = FlakyTransport(failures=3)
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = no_grant
    engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [{"id": "x", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "one")  # first dispatch fails
    clock = datetime.now(UTC)
    for _ in range(3):
        clock += timedelta(minutes=10)
        set_clock(engine, clock)
        engine.tick()
    (message,) = transport.sent
    task, attempts = engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
    assert task["status"] == "dispatched" and task["max_attempts"] == 4  # 1 + 3 given back
    assert [a["status"] for a in attempts] == ["dispatch_failed"] * 3 + ["dispatched"]
    (out,) = claim(engine)
    assert finish(engine, out).run_status == "succeeded"

    engine.settings = engine.settings.with_overrides(max_dispatch_failures=2)
    engine.dispatcher.settings = engine.settings
    transport.failures = 10
    second = engine.trigger_run(WORKSPACE, "one")
    clock += timedelta(minutes=10)
    set_clock(engine, clock)
    engine.tick()
    assert statuses(engine, second.id) == {"x": "failed"}
    assert run_status(engine, second.id) == "failed"
    (entry,) = engine.list_dead_letters(WORKSPACE)
    assert entry["error"]["code"] == "dispatch_failed" and entry["run_id"] == second.id
    assert run_status(engine, run.id) == "succeeded"


def test_cancel_refuses_later_callbacks_and_triggers_nothing(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]}]})
    run = engine.trigger_run(WORKSPACE, "p", dispatch_now=False)
    (a,) = claim(engine)
    response = client.post(f"/api/runs/{run.id}/cancel", headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert statuses(engine, run.id) == {"a": "cancelled", "b": "cancelled"}
    late = finish(engine, a)
    assert (late.accepted, late.outcome) == (False, "already_finished")
    assert claim(engine) == []
    assert client.post(f"/api/runs/{run.id}/cancel", headers=AUTH).status_code == 409
    assert client.post(f"/api/runs/{uuid.uuid4()}/cancel", headers=AUTH).status_code == 404


def test_cancel_racing_a_callback_ends_every_task_once(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]}]})
    for _ in range(10):
        run = engine.trigger_run(WORKSPACE, "p", dispatch_now=False)
        with engine.db.transaction() as conn:
            (a,) = task_store.claim_ready_tasks(conn, 10, run_id=run.id)
        barrier = threading.Barrier(2)
        outcome: dict[str, Any] = {}

        def callback(a: Row = a, barrier: threading.Barrier = barrier, outcome: dict[str, Any] = outcome) -> None:
            barrier.wait()
            outcome["callback"] = finish(engine, a)

        def cancel(run: Any = run, barrier: threading.Barrier = barrier, outcome: dict[str, Any] = outcome) -> None:
            barrier.wait()
            try:
                engine.cancel_run(WORKSPACE, run.id, actor="test")
                outcome["cancel"] = "cancelled"
            except Exception as exc:
                outcome["cancel"] = type(exc).__name__

        threads = [threading.Thread(target=callback), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        final = statuses(engine, run.id)
        assert run_status(engine, run.id) == "cancelled" and outcome["cancel"] == "cancelled"
        if outcome["callback"].accepted:  # the callback won: a succeeded, b cancelled before it ran
            assert final == {"a": "succeeded", "b": "cancelled"}
        else:
            assert final == {"a": "cancelled", "b": "cancelled"}
        assert claim(engine) == []  # nothing of a cancelled run is ever dispatched


def test_redrive_reruns_only_failed_and_skipped_tasks(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "seq", "steps": [
        {"id": "one", "task": "echo"}, {"id": "two", "task": "fail"}, {"id": "three", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "seq", dispatch_now=False)
    one = claim(engine)[0]
    finish(engine, one)
    finish(engine, claim(engine)[0], ok=False)
    assert client.post(f"/api/runs/{run.id}/retry", headers=AUTH).json()["retried_tasks"] == 2
    assert statuses(engine, run.id) == {"one": "succeeded", "two": "dispatched", "three": "pending"}
    assert run_status(engine, run.id) == "running"
    assert client.post(f"/api/runs/{run.id}/retry", headers=AUTH).status_code == 409  # not failed
    finish(engine, claim(engine)[0])
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"
    task, _ = engine.get_task(WORKSPACE, one["id"])
    assert task["attempt"] == 1  # the succeeded step kept its output and did not run again


def test_approval_gate_resumes_the_run_and_racing_decisions_have_one_winner(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "gated", "steps": [
        {"id": "build", "task": "echo"}, {"id": "approve", "kind": "approval"}, {"id": "ship", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "gated", dispatch_now=False)
    finish(engine, claim(engine)[0])
    assert statuses(engine, run.id)["approve"] == "waiting"
    assert claim(engine) == []  # a gate is never dispatched
    _, tasks = engine.get_run(WORKSPACE, run.id)
    gate = next(t for t in tasks if t["node_id"] == "approve")

    barrier = threading.Barrier(4)
    answers: list[int] = []

    def decide(decision: str) -> None:
        barrier.wait()
        answers.append(client.post(f"/api/approvals/{gate['id']}", json={"decision": decision}, headers=AUTH).status_code)

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "approve", "reject", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(answers) == [200, 409, 409, 409]
    final = statuses(engine, run.id)
    if final["approve"] == "succeeded":
        assert final["ship"] == "dispatched"  # the approval request dispatched the next step itself
    else:
        assert final == {"build": "succeeded", "approve": "failed", "ship": "skipped"}
        assert run_status(engine, run.id) == "failed"
    task, _ = engine.get_task(WORKSPACE, gate["id"])
    assert task["output"]["by"] == KEY[:6]


def test_manual_step_and_wrong_kind(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "manual", "steps": [
        {"id": "check", "kind": "manual"}, {"id": "after", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "manual", dispatch_now=False)
    _, tasks = engine.get_run(WORKSPACE, run.id)
    check = next(t for t in tasks if t["node_id"] == "check")
    assert check["status"] == "waiting"
    wrong = client.post(f"/api/approvals/{check['id']}", json={"decision": "approve"}, headers=AUTH)
    assert wrong.status_code == 409 and "manual" in wrong.json()["error"]["message"]
    bad = client.post(f"/api/tasks/{check['id']}/complete", json={"success": "maybe"}, headers=AUTH)
    assert bad.status_code == 422
    done = client.post(f"/api/tasks/{check['id']}/complete", json={"success": True}, headers=AUTH)
    assert done.status_code == 200 and done.json()["newly_ready"] == 1
    assert statuses(engine, run.id) == {"check": "succeeded", "after": "dispatched"}
    viewer, _ = engine.create_api_key(WORKSPACE, "viewer")
    assert client.post(f"/api/tasks/{check['id']}/complete", json={"success": True},
                       headers={"x-api-key": viewer}).status_code == 403


@pytest.mark.parametrize(("on_timeout", "expected"), [("reject", "failed"), ("escalate", "waiting")])
def test_approval_timeout(engine: Engine, on_timeout: str, expected: str) -> None:
    from datetime import UTC, datetime, timedelta

    engine.create_pipeline(WORKSPACE, {"id": "gated", "nodes": [
        {"id": "approve", "kind": "approval", "approval": {"timeout_s": 60, "on_timeout": on_timeout}}]})
    run = engine.trigger_run(WORKSPACE, "gated", dispatch_now=False)
    set_clock(engine, datetime.now(UTC) + timedelta(seconds=61))
    assert engine.tick().waits_expired == 1
    assert statuses(engine, run.id) == {"approve": expected}
    _, tasks = engine.get_run(WORKSPACE, run.id)
    if on_timeout == "escalate":
        assert tasks[0]["message"].startswith("escalated")
        assert engine.tick().waits_expired == 0  # escalated once, then waits for a person
    else:
        assert tasks[0]["error"]["code"] == "timeout" and run_status(engine, run.id) == "failed"


def test_a_one_failed_handler_runs_even_when_the_failure_stops_the_run(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "alerting", "nodes": [
        {"id": "load", "task": "fail"},
        {"id": "publish", "task": "echo", "depends": ["load"]},
        {"id": "alert", "task": "echo", "depends": ["load"], "trigger_rule": "one_failed"},
        {"id": "cleanup", "task": "echo", "depends": ["publish"], "trigger_rule": "all_done"},
    ]})
    run = engine.trigger_run(WORKSPACE, "alerting", dispatch_now=False)
    finish(engine, claim(engine)[0], ok=False)
    assert statuses(engine, run.id) == {"load": "failed", "publish": "skipped", "alert": "ready", "cleanup": "ready"}
    # Failing, not failed: a finished run never has a task left open; it fails when its
    # handlers have run.
    assert run_status(engine, run.id) == "running"
    for task in claim(engine):
        finish(engine, task)
    assert statuses(engine, run.id) == {"load": "failed", "publish": "skipped", "alert": "succeeded",
                                        "cleanup": "succeeded"}
    assert run_status(engine, run.id) == "failed"


def test_none_failed_skips_after_a_tolerated_failure_and_skips_propagate(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "rules", "nodes": [
        {"id": "flaky", "task": "fail", "on_failure": "continue"},
        {"id": "strict", "task": "echo", "depends": ["flaky"], "trigger_rule": "none_failed"},
        {"id": "after", "task": "echo", "depends": ["strict"]},
        {"id": "lenient", "task": "echo", "depends": ["flaky"]},
    ]})
    run = engine.trigger_run(WORKSPACE, "rules", dispatch_now=False)
    finish(engine, claim(engine)[0], ok=False)
    assert statuses(engine, run.id) == {"flaky": "failed", "strict": "skipped", "after": "skipped", "lenient": "ready"}
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"


def test_identical_triggers_racing_with_one_idempotency_key_make_one_run(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [{"id": "a", "task": "echo"}]})
    barrier = threading.Barrier(6)
    ids: list[str] = []

    def trigger() -> None:
        barrier.wait()
        response = client.post("/api/pipelines/p/runs", json={}, headers={**AUTH, "Idempotency-Key": "order-42"})
        ids.append(response.json()["id"])

    threads = [threading.Thread(target=trigger) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(ids) == 6 and len(set(ids)) == 1
    assert len(engine.list_runs(WORKSPACE)) == 1


def test_idempotency_key_expires_after_its_ttl(engine: Engine) -> None:
    from datetime import UTC, datetime, timedelta

    engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [{"id": "a", "task": "echo"}]})
    first = engine.trigger_run(WORKSPACE, "p", idempotency_key="k", dispatch_now=False)
    assert engine.trigger_run(WORKSPACE, "p", idempotency_key="k", dispatch_now=False).id == first.id
    set_clock(engine, datetime.now(UTC) + timedelta(seconds=engine.settings.idempotency_ttl_s + 5))
    later = engine.trigger_run(WORKSPACE, "p", idempotency_key="k", dispatch_now=False)
    assert later.created and later.id != first.id


def test_timeout_s_is_a_hard_limit_even_with_heartbeats(engine: Engine) -> None:
    from datetime import UTC, datetime, timedelta

    from orchestrator.engine.tick import expire_leases

    start = datetime.now(UTC)
    set_clock(engine, start)
    engine.create_pipeline(WORKSPACE, {"id": "slow", "nodes": [
        {"id": "x", "task": "sleep", "timeout_s": 30, "heartbeat_s": 20}]})
    run = engine.trigger_run(WORKSPACE, "slow", dispatch_now=False)
    (task,) = claim(engine)
    for seconds in (10, 20):  # heartbeats keep coming...
        set_clock(engine, start + timedelta(seconds=seconds))
        with engine.db.transaction() as conn:
            assert task_store.mark_running(conn, task["id"], task["attempt"], task["claim_token"], None, None)
    set_clock(engine, start + timedelta(seconds=31))  # ...but the attempt's 30 s are up
    assert expire_leases(engine.db, engine.settings, 10) == 1
    _, tasks = engine.get_run(WORKSPACE, run.id)
    assert tasks[0]["status"] == "failed" and tasks[0]["error"]["code"] == "timeout"


def test_exponential_backoff_delays_follow_the_policy(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "backoff", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 4, "backoff": "exponential",
                                              "base_delay_s": 10, "max_delay_s": 25}}]})
    engine.trigger_run(WORKSPACE, "backoff", dispatch_now=False)
    delays = []
    for _ in range(3):
        (task,) = claim(engine)
        finish(engine, task, ok=False)
        with engine.db.connection() as conn:
            row = conn.execute("SELECT extract(epoch FROM available_at - tw_now()) AS d FROM tasks WHERE id = %s",
                               (task["id"],)).fetchone()
            assert row is not None
            delays.append(round(float(row["d"])))
            conn.execute("UPDATE tasks SET available_at = tw_now() WHERE id = %s", (task["id"],))
    assert delays == [10, 20, 25]  # base, 2 x base, capped at max_delay_s
