"""Run lifecycle against a real Postgres, driving claims and outcomes directly."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from orchestrator.db.connection import Connection, Row
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE

DIAMOND: dict[str, Any] = {
    "id": "diamond",
    "nodes": [
        {"id": "a", "task": "echo"},
        {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]},
        {"id": "d", "task": "echo", "depends": ["b", "c"]},
    ],
}


def claim(engine: Engine, run_id: uuid.UUID | None = None, limit: int = 100) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit, run_id=run_id)


def finish(engine: Engine, task: Row, ok: bool = True, retryable: bool = True) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(
            conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
            output={"key": f"k/{task['node_id']}"} if ok else None,
            error=None if ok else {"message": "boom", "retryable": retryable}, retryable=retryable,
        )

    return engine.db.run_in_transaction(work)


def statuses(engine: Engine, run_id: uuid.UUID) -> dict[str, str]:
    _, tasks = engine.get_run(WORKSPACE, run_id)
    return {t["node_id"]: t["status"] for t in tasks}


def test_diamond_runs_each_node_once_in_order(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, DIAMOND)
    run = engine.trigger_run(WORKSPACE, "diamond", dispatch_now=False)
    assert statuses(engine, run.id) == {"a": "ready", "b": "pending", "c": "pending", "d": "pending"}

    (a,) = claim(engine)
    assert a["node_id"] == "a" and a["attempt"] == 1
    assert claim(engine) == []  # nothing else is ready while a runs
    result = finish(engine, a)
    assert result.accepted and result.newly_ready == 2
    b, c = sorted(claim(engine), key=lambda r: r["node_id"])
    assert finish(engine, b).newly_ready == 0
    assert statuses(engine, run.id)["d"] == "pending"
    assert finish(engine, c).newly_ready == 1
    (d,) = claim(engine)
    assert d["node_id"] == "d"
    final = finish(engine, d)
    assert final.run_status == "succeeded"
    run_row, _ = engine.get_run(WORKSPACE, run.id)
    assert run_row["status"] == "succeeded" and run_row["finished_at"] is not None
    assert run_row["unfinished_tasks"] == 0


def test_stop_failure_fails_the_run_and_skips_the_rest(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "seq", "steps": [
        {"id": "one", "task": "echo"}, {"id": "two", "task": "fail"}, {"id": "three", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "seq", dispatch_now=False)
    finish(engine, claim(engine)[0])
    result = finish(engine, claim(engine)[0], ok=False)
    assert result.outcome == "failed" and result.run_status == "failed" and result.dead_lettered
    assert statuses(engine, run.id) == {"one": "succeeded", "two": "failed", "three": "skipped"}
    assert claim(engine) == []
    run_row, _ = engine.get_run(WORKSPACE, run.id)
    assert run_row["error"] == "node 'two' (version default) failed"
    assert (run_row["failed_tasks"], run_row["succeeded_with_failures"]) == (1, False)


def test_continue_failure_lets_the_sequence_complete(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "seq", "steps": [
        {"id": "one", "task": "echo"}, {"id": "two", "task": "fail", "on_failure": "continue"},
        {"id": "three", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "seq", dispatch_now=False)
    finish(engine, claim(engine)[0])
    assert finish(engine, claim(engine)[0], ok=False).newly_ready == 1
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"
    assert statuses(engine, run.id) == {"one": "succeeded", "two": "failed", "three": "succeeded"}
    run_row, _ = engine.get_run(WORKSPACE, run.id)
    assert (run_row["status"], run_row["failed_tasks"], run_row["succeeded_with_failures"]) == ("succeeded", 1, True)


def test_retry_policy_returns_the_task_to_ready_with_backoff(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "flaky", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 2, "backoff": "fixed", "base_delay_s": 30}}]})
    run = engine.trigger_run(WORKSPACE, "flaky", dispatch_now=False)
    first = claim(engine)[0]
    assert finish(engine, first, ok=False).outcome == "retrying"
    assert claim(engine) == []  # not before the delay
    with engine.db.connection() as conn:
        conn.execute("SET tickweave.clock_offset = '31 seconds'")
        second = task_store.claim_ready_tasks(conn, 10)
        conn.execute("RESET tickweave.clock_offset")
    assert [t["attempt"] for t in second] == [2]
    assert finish(engine, second[0], ok=False).run_status == "failed"
    task, attempts = engine.get_task(WORKSPACE, second[0]["id"])
    assert task["status"] == "failed" and [a["status"] for a in attempts] == ["failed", "failed"]
    assert task["dead_lettered"] is True
    assert statuses(engine, run.id) == {"x": "failed"}


def test_non_retryable_failure_skips_remaining_attempts(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "flaky", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 5}}]})
    engine.trigger_run(WORKSPACE, "flaky", dispatch_now=False)
    assert finish(engine, claim(engine)[0], ok=False, retryable=False).outcome == "failed"


def test_callback_fencing_refuses_other_attempts_and_duplicates(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 3, "base_delay_s": 0}}]})
    engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    first = claim(engine)[0]
    assert finish(engine, first, ok=False).outcome == "retrying"
    second = claim(engine)[0]
    # the first attempt's late success: refused, nothing changes
    late = finish(engine, first)
    assert (late.accepted, late.outcome) == (False, "stale_attempt")
    forged = dict(second, claim_token=uuid.uuid4())
    assert finish(engine, forged).outcome == "stale_attempt"
    assert finish(engine, second).outcome == "succeeded"
    again = finish(engine, second)
    assert (again.accepted, again.outcome) == (False, "duplicate")
    opposite = finish(engine, second, ok=False)
    assert (opposite.accepted, opposite.outcome) == (False, "already_finished")
    task, attempts = engine.get_task(WORKSPACE, second["id"])
    assert task["status"] == "succeeded" and task["attempt"] == 2
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]


def test_lease_expiry_fails_the_attempt_and_retries(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "lease", "nodes": [
        {"id": "x", "task": "sleep", "heartbeat_s": 5, "retry": {"max_attempts": 2, "base_delay_s": 0}}]})
    engine.trigger_run(WORKSPACE, "lease", dispatch_now=False)
    first = claim(engine)[0]
    assert engine.tick().expired == 0
    with engine.db.connection() as conn:
        conn.execute("SET tickweave.clock_offset = '11 seconds'")
        expired = task_store.lock_expired_leases(conn, 10)
        conn.execute("RESET tickweave.clock_offset")
    assert [r["id"] for r in expired] == [first["id"]]


def test_versions_make_one_task_per_node_and_version(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {**DIAMOND, "versions": ["v1", "v2"]})
    run = engine.trigger_run(WORKSPACE, "diamond", dispatch_now=False)
    _, tasks = engine.get_run(WORKSPACE, run.id)
    assert sorted((t["node_id"], t["version"]) for t in tasks) == sorted(
        (n, v) for n in "abcd" for v in ("v1", "v2"))
    run2 = engine.trigger_run(WORKSPACE, "diamond", versions=["2024-01-01"], dispatch_now=False)
    _, tasks2 = engine.get_run(WORKSPACE, run2.id)
    assert {t["version"] for t in tasks2} == {"2024-01-01"}


def test_pipeline_versions_are_immutable_and_deduplicated(engine: Engine) -> None:
    first = engine.create_pipeline(WORKSPACE, DIAMOND)
    assert first.version == 1
    with pytest.raises(Conflict):
        engine.create_pipeline(WORKSPACE, DIAMOND)
    same = engine.update_pipeline(WORKSPACE, "diamond", DIAMOND)
    assert (same.version, same.changed) == (1, False)
    changed = engine.update_pipeline(WORKSPACE, "diamond", {**DIAMOND, "description": "new"})
    assert (changed.version, changed.changed) == (2, True) and changed.sha256 != first.sha256
    with pytest.raises(InvalidInput):
        engine.update_pipeline(WORKSPACE, "diamond", {**DIAMOND, "id": "other"})
    with pytest.raises(NotFound):
        engine.update_pipeline(WORKSPACE, "missing", {**DIAMOND, "id": "missing"})


def test_idempotency_key_returns_the_same_run(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, DIAMOND)
    first = engine.trigger_run(WORKSPACE, "diamond", idempotency_key="k1", dispatch_now=False)
    again = engine.trigger_run(WORKSPACE, "diamond", idempotency_key="k1", dispatch_now=False)
    assert first.created and not again.created and again.id == first.id
    assert len(engine.list_runs(WORKSPACE)) == 1
