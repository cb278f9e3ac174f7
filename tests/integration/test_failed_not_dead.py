"""The words of failure (issue 18): a task whose last attempt failed is `failed`, dead-lettered or
not (`dead_lettered` says which); a run that went past tolerated failures says so
(`failed_tasks`, `succeeded_with_failures`), in its answer and in every list of runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE
from .test_reliability import AUTH, FlakyTransport, claim, finish, no_grant


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    engine.transports["local"] = FlakyTransport(failures=0)  # accepts, never calls back
    engine.dispatcher._issue_grant = no_grant  # type: ignore[method-assign]
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def task_of(client: TestClient, run_id: Any, node: str) -> dict[str, Any]:
    page = client.get(f"/api/runs/{run_id}/tasks", params={"node": node}, headers=AUTH).json()
    (task,) = page["items"]
    return dict(task)


def run_answer(client: TestClient, run_id: Any) -> dict[str, Any]:
    answer = client.get(f"/api/runs/{run_id}", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def listed(client: TestClient, run_id: Any, pipeline: str) -> dict[str, Any]:
    items = client.get("/api/runs", params={"pipeline": pipeline}, headers=AUTH).json()["items"]
    return next(dict(r) for r in items if r["id"] == str(run_id))


def dead_letters(engine: Engine, task_id: Any) -> list[dict[str, Any]]:
    with engine.db.connection() as conn:
        return [dict(r) for r in conn.execute(
            "SELECT id, retried_at FROM dead_letters WHERE task_id = %s ORDER BY created_at", (task_id,)).fetchall()]


def test_a_worker_task_out_of_attempts_is_failed_and_dead_lettered_and_its_retry_runs_it(
    engine: Engine, client: TestClient,
) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "flaky", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 2, "base_delay_s": 0}},
        {"id": "y", "task": "echo", "depends": ["x"]}]})
    run = engine.trigger_run(WORKSPACE, "flaky", dispatch_now=False)
    assert finish(engine, claim(engine)[0], ok=False).outcome == "retrying"
    x = claim(engine)[0]
    result = finish(engine, x, ok=False)
    assert (result.outcome, result.task_status, result.dead_lettered, result.run_status) == (
        "failed", "failed", True, "failed")

    task = client.get(f"/api/tasks/{x['id']}", headers=AUTH).json()
    assert (task["status"], task["dead_lettered"]) == ("failed", True)
    assert (task_of(client, run.id, "x")["status"], task_of(client, run.id, "x")["dead_lettered"]) == ("failed", True)
    assert task_of(client, run.id, "y")["dead_lettered"] is False  # skipped, never in the queue
    (entry,) = client.get("/api/dlq", headers=AUTH).json()["items"]
    assert entry["task_id"] == str(x["id"])
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("failed", 1, False)
    assert answer["counts"] == {"failed": 1, "skipped": 1}

    # The retry takes the open entry and the failed task: it runs again, and is no longer in the queue.
    retried = client.post(f"/api/dlq/{entry['id']}/retry", headers=AUTH)
    assert retried.status_code == 200, retried.text
    assert retried.json()["run_status"] == "running"
    again = client.get(f"/api/tasks/{x['id']}", headers=AUTH).json()
    assert (again["status"], again["dead_lettered"]) == ("dispatched", False)
    assert run_answer(client, run.id)["failed_tasks"] == 0  # recounted by the repair
    for task in claim(engine):
        finish(engine, task)
    for task in claim(engine):
        assert finish(engine, task).run_status == "succeeded"
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("succeeded", 0, False)
    assert [e["retried_at"] is not None for e in dead_letters(engine, x["id"])] == [True]


def test_a_rejected_approval_is_failed_without_a_dead_letter(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "gated", "nodes": [
        {"id": "approve", "kind": "approval"}, {"id": "ship", "task": "echo", "depends": ["approve"]}]})
    run = engine.trigger_run(WORKSPACE, "gated", dispatch_now=False)
    gate = task_of(client, run.id, "approve")
    decided = client.post(f"/api/approvals/{gate['id']}", json={"decision": "reject", "comment": "no"}, headers=AUTH)
    assert decided.status_code == 200, decided.text
    assert decided.json()["task_status"] == "failed"

    task = client.get(f"/api/tasks/{gate['id']}", headers=AUTH).json()
    assert (task["status"], task["dead_lettered"], task["error"]["code"]) == ("failed", False, "rejected")
    assert task_of(client, run.id, "approve")["dead_lettered"] is False
    assert dead_letters(engine, gate["id"]) == []
    assert client.get("/api/dlq", headers=AUTH).json()["items"] == []
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("failed", 1, False)
    # The queue holds worker failures only: a redrive is how a rejected gate gets another decision.
    redriven = client.post(f"/api/runs/{run.id}/retry", headers=AUTH)
    assert redriven.status_code == 200 and redriven.json()["failed_tasks"] == 0
    assert task_of(client, run.id, "approve")["status"] == "waiting"


def test_a_status_filter_of_dead_is_refused_with_the_word_to_use(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    finish(engine, claim(engine)[0], ok=False)
    refused = client.get(f"/api/runs/{run.id}/tasks", params={"status": "dead"}, headers=AUTH)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "invalid" and "status=failed" in error["message"]
    assert error["details"] == [{"path": "status", "message": "use failed"}]
    failed = client.get(f"/api/runs/{run.id}/tasks", params={"status": "failed"}, headers=AUTH).json()["items"]
    assert [(t["node"], t["status"], t["dead_lettered"]) for t in failed] == [("x", "failed", True)]
    unknown = client.get(f"/api/runs/{run.id}/tasks", params={"status": "gone"}, headers=AUTH)
    assert unknown.status_code == 422 and "dead" not in unknown.json()["error"]["message"]


def test_a_run_past_a_tolerated_failure_succeeds_with_failures_until_the_failure_is_retried(
    engine: Engine, client: TestClient,
) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "lenient", "steps": [
        {"id": "one", "task": "fail", "on_failure": "continue"}, {"id": "two", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "lenient", dispatch_now=False)
    one = claim(engine)[0]
    assert finish(engine, one, ok=False).dead_lettered
    answer = run_answer(client, run.id)  # still running: the failure already counts
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("running", 1, False)
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"

    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("succeeded", 1, True)
    row = listed(client, run.id, "lenient")
    assert (row["status"], row["failed_tasks"], row["succeeded_with_failures"]) == ("succeeded", 1, True)

    # A plain success beside it says nothing of failures.
    clean = engine.trigger_run(WORKSPACE, "lenient", dispatch_now=False)
    for _ in range(2):
        for task in claim(engine):
            finish(engine, task)
    row = listed(client, clean.id, "lenient")
    assert (row["status"], row["failed_tasks"], row["succeeded_with_failures"]) == ("succeeded", 0, False)

    # The tolerated failure retried from the queue, and succeeding: the run no longer has one.
    (entry,) = client.get("/api/dlq", headers=AUTH).json()["items"]
    assert client.post(f"/api/dlq/{entry['id']}/retry", headers=AUTH).status_code == 200
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("running", 0, False)
    for task in claim(engine):
        finish(engine, task)
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("succeeded", 0, False)
    row = listed(client, run.id, "lenient")
    assert (row["failed_tasks"], row["succeeded_with_failures"]) == (0, False)


def test_a_redriven_run_counts_its_failures_afresh(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "seq", "steps": [
        {"id": "a", "task": "fail", "on_failure": "continue"}, {"id": "b", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "seq", dispatch_now=False)
    finish(engine, claim(engine)[0], ok=False)
    assert finish(engine, claim(engine)[0], ok=False).run_status == "failed"
    assert run_answer(client, run.id)["failed_tasks"] == 2
    redriven = client.post(f"/api/runs/{run.id}/retry", headers=AUTH)
    assert redriven.status_code == 200 and redriven.json()["retried_tasks"] == 2
    assert redriven.json()["failed_tasks"] == 0
    finish(engine, claim(engine)[0], ok=False)  # `a` fails again, tolerated
    assert finish(engine, claim(engine)[0]).run_status == "succeeded"
    answer = run_answer(client, run.id)
    assert (answer["status"], answer["failed_tasks"], answer["succeeded_with_failures"]) == ("succeeded", 1, True)

