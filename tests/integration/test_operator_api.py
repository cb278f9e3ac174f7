"""What an operator does around pipelines, dead letters and workers (issue 18): a pipeline's
display name; deleting a pipeline (refused while runs are active unless they are cancelled, its
schedules stop, its history stays readable, the id can be used again), raced against triggers;
one dead letter by id and the tick's retention purge; a run's event id and the name of the key
that triggered it; task definitions' history under their own path; workers' health from their
heartbeats and callbacks. Against the real database and the real app."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Connection, Row
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import Conflict, NotFound
from orchestrator.engine.operations import purge_expired_dead_letters
from orchestrator.engine.service import Engine
from orchestrator.engine.workers import WorkerSightings
from orchestrator.storage.tokens import TaskClaims, params_digest
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE
from .test_scheduling import set_clock

ADMIN = {"x-api-key": "acme-admin-key"}
OTHER = {"x-api-key": "other-admin-key"}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    engine.create_api_key("other", "admin", raw_key="other-admin-key")
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def claim(engine: Engine) -> list[Row]:
    with engine.db.transaction() as conn:
        task_store.claim_ready_tasks(conn, 100)
        return conn.execute(
            """SELECT id, attempt, claim_token, node_id, run_id, task_name, params FROM tasks
               WHERE status = 'dispatched' ORDER BY created_at, position, version"""
        ).fetchall()


def finish(engine: Engine, task: Row, ok: bool) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
                              output={"key": f"k/{task['node_id']}"} if ok else None,
                              error=None if ok else {"message": "boom\nat line 2", "code": "e1", "retryable": False},
                              retryable=False)
    return engine.db.run_in_transaction(work)


def sql(engine: Engine, query: str, *args: Any) -> list[Row]:
    with engine.db.connection() as conn:
        cursor = conn.execute(query, args)
        return cursor.fetchall() if cursor.description else []


ONE = {"id": "one", "steps": [{"id": "a", "task": "echo"}]}
FAILING = {"id": "failing", "steps": [{"id": "a", "task": "fail", "retry": {"max_attempts": 1}}]}


# --- display names ----------------------------------------------------------------------------


def test_a_pipeline_name_is_accepted_stored_and_shown(client: TestClient) -> None:
    created = client.post("/api/pipelines", json={**ONE, "name": "Nightly Unicode import"}, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "Nightly Unicode import"
    assert created.json()["definition"]["name"] == "Nightly Unicode import"
    assert client.get("/api/pipelines/one", headers=ADMIN).json()["name"] == "Nightly Unicode import"
    client.post("/api/pipelines", json={**ONE, "id": "unnamed"}, headers=ADMIN)
    listed = {p["id"]: p["name"] for p in client.get("/api/pipelines", headers=ADMIN).json()["items"]}
    assert listed == {"one": "Nightly Unicode import", "unnamed": None}
    # a rename is a change: a new version
    renamed = client.put("/api/pipelines/one", json={**ONE, "name": "Unicode import"}, headers=ADMIN)
    assert (renamed.json()["version"], renamed.json()["name"], renamed.json()["changed"]) == (2, "Unicode import", True)
    # a definition without a name keeps the sha256 it had before names existed
    unnamed = client.get("/api/pipelines/unnamed", headers=ADMIN).json()
    assert "name" not in unnamed["definition"]

    for bad, expected in (("", "at least 1"), ("   ", "only spaces"), ("x" * 201, "at most 200"),
                          ("two\nlines", "control characters"), (7, "string")):
        refused = client.post("/api/pipelines", json={**ONE, "id": "bad", "name": bad}, headers=ADMIN)
        assert refused.status_code == 422, (bad, refused.text)
        error = refused.json()["error"]
        assert error["details"][0]["path"] == "name" and expected in error["message"], error
    assert client.get("/api/pipelines/bad", headers=ADMIN).status_code == 404


# --- deleting a pipeline ----------------------------------------------------------------------


def test_a_deleted_pipeline_is_gone_but_its_history_stays_readable(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {**ONE, "schedule": "0 3 * * *"})
    engine.create_pipeline(WORKSPACE, {**ONE, "id": "kept"})
    run = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    (task,) = claim(engine)
    finish(engine, task, ok=True)
    engine.create_api_key(WORKSPACE, "operator", raw_key="acme-operator-key")

    refused = client.delete("/api/pipelines/one", headers={"x-api-key": "acme-operator-key"})
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    assert client.delete("/api/pipelines/one", headers=OTHER).status_code == 404  # another workspace's
    assert client.delete("/api/pipelines/one?cancel_runs=maybe", headers=ADMIN).status_code == 422

    deleted = client.delete("/api/pipelines/one", headers=ADMIN)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"deleted": "one", "cancelled_runs": 0}

    gone = client.get("/api/pipelines/one", headers=ADMIN)
    assert gone.status_code == 404 and "one" in gone.json()["error"]["message"]
    assert [p["id"] for p in client.get("/api/pipelines", headers=ADMIN).json()["items"]] == ["kept"]
    assert client.get("/api/schedules?pipeline=one", headers=ADMIN).json()["items"] == []
    assert client.post("/api/pipelines/one/runs", json={}, headers=ADMIN).status_code == 404
    assert client.post("/api/pipelines/one/pause", headers=ADMIN).status_code == 404
    assert client.put("/api/pipelines/one", json=ONE, headers=ADMIN).status_code == 404
    assert client.delete("/api/pipelines/one", headers=ADMIN).status_code == 404
    # its run, tasks and their outputs stay readable
    old = client.get(f"/api/runs/{run.id}", headers=ADMIN)
    assert old.status_code == 200 and old.json()["status"] == "succeeded" and old.json()["pipeline_id"] == "one"
    assert [t["output"] for t in old.json()["tasks"]] == [{"key": "k/a"}]
    assert [r["id"] for r in client.get("/api/runs?pipeline=one", headers=ADMIN).json()["items"]] == [str(run.id)]
    assert client.get(f"/api/tasks/{task['id']}", headers=ADMIN).status_code == 200
    # a definition that depends on it is refused as depending on a missing pipeline
    needs = {"id": "needs", "depends": [{"pipeline": "one"}], "steps": [{"id": "a", "task": "echo"}]}
    assert client.post("/api/pipelines", json=needs, headers=ADMIN).status_code == 422


def test_posting_a_deleted_id_creates_the_pipeline_anew_and_keeps_its_history(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {**ONE, "name": "first"})
    first = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    engine.set_paused(WORKSPACE, "one", True)
    client.delete("/api/pipelines/one?cancel_runs=true", headers=ADMIN)

    again = client.post("/api/pipelines", json={**ONE, "name": "second", "schedule": "*/5 * * * *"}, headers=ADMIN)
    assert again.status_code == 201, again.text
    # the versions continue (the old run still pins version 1), and nothing of the old state is kept
    assert (again.json()["version"], again.json()["name"], again.json()["paused"]) == (2, "second", False)
    assert [s["state"] for s in again.json()["schedules"]] == ["active"]
    assert again.json()["stats"]["use_count"] == 1  # its history is its own
    assert client.get(f"/api/runs/{first.id}", headers=ADMIN).json()["pipeline_version"] == 1
    second = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    assert engine.run_summary(WORKSPACE, second.id)["pipeline_version"] == 2
    assert client.post("/api/pipelines", json=ONE, headers=ADMIN).status_code == 409  # live again


def test_a_delete_is_refused_while_runs_are_active_unless_they_are_cancelled(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {**ONE, "concurrency": {"max_active_runs": 1}})
    running = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    queued = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    claim(engine)  # the running run's task is out with a worker

    refused = client.delete("/api/pipelines/one", headers=ADMIN)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "2 active run(s)" in error["message"] and "cancel_runs=true" in error["message"], error
    assert error["details"]["active_runs"] == [str(running.id), str(queued.id)]
    assert client.get("/api/pipelines/one", headers=ADMIN).status_code == 200  # nothing changed

    deleted = client.delete("/api/pipelines/one?cancel_runs=true", headers=ADMIN)
    assert deleted.status_code == 200 and deleted.json() == {"deleted": "one", "cancelled_runs": 2}
    for run_id in (running.id, queued.id):
        run = client.get(f"/api/runs/{run_id}", headers=ADMIN).json()
        assert run["status"] == "cancelled" and "deleted" in run["error"], run
        assert {t["status"] for t in run["tasks"]} == {"cancelled"}


def test_a_delete_is_refused_while_other_pipelines_depend_on_it(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "up", "outputs": {"data": {"from": "a"}}, "steps": [{"id": "a", "task": "echo"}]})
    for name in ("down", "side"):
        engine.create_pipeline(WORKSPACE, {"id": name, "depends": [{"pipeline": "up", "outputs": ["data"]}],
                                           "steps": [{"id": "a", "task": "echo"}]})
    refused = client.delete("/api/pipelines/up", headers=ADMIN)
    assert refused.status_code == 409
    assert "'down', 'side'" in refused.json()["error"]["message"]
    assert refused.json()["error"]["details"]["dependants"] == ["down", "side"]
    assert client.delete("/api/pipelines/down", headers=ADMIN).status_code == 200
    client.put("/api/pipelines/side", json={"id": "side", "steps": [{"id": "a", "task": "echo"}]}, headers=ADMIN)
    assert client.delete("/api/pipelines/up", headers=ADMIN).status_code == 200


def test_the_schedules_of_a_deleted_pipeline_stop_firing(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {**ONE, "schedule": "* * * * *", "schedule_options": {"catchup": "latest"}})
    engine.create_pipeline(WORKSPACE, {**ONE, "id": "kept", "schedule": "* * * * *",
                                       "schedule_options": {"catchup": "latest"}})
    engine.delete_pipeline(WORKSPACE, "one")
    assert sql(engine, "SELECT count(*) AS n FROM schedules WHERE pipeline_id = 'one'")[0]["n"] == 0
    now = sql(engine, "SELECT tw_now() AS now")[0]["now"]
    set_clock(engine, now + timedelta(minutes=5))
    summary = engine.tick()
    assert summary.scheduled_runs == 1  # kept's, and none of one's
    assert [r["pipeline_id"] for r in sql(engine, "SELECT pipeline_id FROM runs")] == ["kept"]


def test_the_due_schedule_claim_stays_on_its_index(engine: Engine) -> None:
    """Skipping deleted pipelines is a filter on the pipeline row the claim joins by primary key:
    an idle tick still reads the due-schedule index, not the schedules or pipelines tables."""
    for i in range(3):
        engine.create_pipeline(WORKSPACE, {**ONE, "id": f"p{i}", "schedule": "0 3 * * *"})
    engine.delete_pipeline(WORKSPACE, "p1")
    with engine.db.connection() as conn:
        conn.execute("SET enable_seqscan = off")  # a few rows: the index must be there to be used
        plan = json.dumps(conn.execute(
            """EXPLAIN (FORMAT JSON) SELECT s.id FROM schedules s
                JOIN pipelines p ON p.workspace_id = s.workspace_id AND p.id = s.pipeline_id
                WHERE s.state = 'active' AND s.next_fire_at <= tw_now() AND p.deleted_at IS NULL
                ORDER BY s.next_fire_at LIMIT 100 FOR UPDATE OF p, s SKIP LOCKED""").fetchall()[0])
        conn.execute("RESET enable_seqscan")
    assert "schedules_due_idx" in plan and "pipelines_pkey" in plan, plan


@pytest.mark.parametrize("cancel_runs", [False, True])
@pytest.mark.parametrize("limited", [False, True])
def test_a_delete_racing_a_trigger_never_leaves_a_run_started_after_it(
    engine: Engine, cancel_runs: bool, limited: bool
) -> None:
    """A trigger holds the pipeline row until its run commits; a delete locks it: the run is
    either there before the delete looks (refused, or cancelled), or is refused itself."""
    outcomes: set[tuple[str, str]] = set()
    for round_ in range(12):
        pipeline_id = f"race-{round_}"
        definition: dict[str, Any] = {"id": pipeline_id,
                                      "steps": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]}
        if limited:
            definition["concurrency"] = {"max_active_runs": 5}
        engine.create_pipeline(WORKSPACE, definition)
        barrier = threading.Barrier(2)
        results: dict[str, Any] = {}

        def delete(pid: str = pipeline_id, out: dict[str, Any] = results, gate: threading.Barrier = barrier) -> None:
            gate.wait()
            try:
                out["delete"] = engine.delete_pipeline(WORKSPACE, pid, cancel_runs=cancel_runs)
            except (Conflict, NotFound) as exc:
                out["delete"] = exc

        def trigger(pid: str = pipeline_id, out: dict[str, Any] = results, gate: threading.Barrier = barrier) -> None:
            gate.wait()
            try:
                out["trigger"] = engine.trigger_run(WORKSPACE, pid, dispatch_now=False)
            except (Conflict, NotFound) as exc:
                out["trigger"] = exc

        threads = [threading.Thread(target=delete), threading.Thread(target=trigger)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        deleted = not isinstance(results["delete"], Exception)
        triggered = not isinstance(results["trigger"], Exception)
        outcomes.add(("deleted" if deleted else "refused", "triggered" if triggered else "refused"))

        (row,) = sql(engine, "SELECT deleted_at FROM pipelines WHERE workspace_id = %s AND id = %s", WORKSPACE, pipeline_id)
        runs = sql(engine, """SELECT r.id, r.status, r.created_at, r.unfinished_tasks,
                                     (SELECT count(*) FROM tasks t WHERE t.run_id = r.id) AS tasks
                              FROM runs r WHERE r.pipeline_id = %s""", pipeline_id)
        assert deleted == (row["deleted_at"] is not None)
        # nothing half-written: every run has all its tasks
        assert all(r["tasks"] == 2 for r in runs), runs
        if deleted:
            assert all(r["created_at"] < row["deleted_at"] for r in runs), (row, runs)
            assert all(r["status"] == "cancelled" for r in runs), runs
            assert triggered == bool(runs) and (not runs or cancel_runs)
        else:
            assert not cancel_runs and triggered and len(runs) == 1
            assert isinstance(results["delete"], Conflict) and "active run" in results["delete"].message
        if triggered is False:
            assert isinstance(results["trigger"], NotFound) and runs == []
    # each round is decided one way or the other; over the rounds, both orders are normally seen
    assert outcomes <= {("deleted", "refused"), ("refused", "triggered"), ("deleted", "triggered")}
    assert ("deleted", "triggered") not in outcomes or cancel_runs


# --- dead letters -----------------------------------------------------------------------------


def dead_letter(engine: Engine, count: int = 1) -> list[Row]:
    """`count` dead letters, each of its own run of FAILING."""
    engine.create_pipeline(WORKSPACE, FAILING)
    for _ in range(count):
        engine.trigger_run(WORKSPACE, "failing", dispatch_now=False)
    for task in claim(engine):
        finish(engine, task, ok=False)
    return sql(engine, "SELECT id, created_at FROM dead_letters ORDER BY created_at, id")


def test_one_dead_letter_by_id(engine: Engine, client: TestClient) -> None:
    (entry,) = dead_letter(engine)
    listed = client.get("/api/dlq", headers=ADMIN).json()["items"]
    got = client.get(f"/api/dlq/{entry['id']}", headers=ADMIN)
    assert got.status_code == 200, got.text
    assert got.json() == listed[0]
    assert got.json()["attempts"][0]["error"]["message"] == "boom\nat line 2"
    assert got.json()["error"]["code"] == "e1" and got.json()["node_id"] == "a"

    assert client.get(f"/api/dlq/{entry['id']}", headers=OTHER).status_code == 404  # another workspace's
    unknown = client.get(f"/api/dlq/{uuid.uuid4()}", headers=ADMIN)
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]["message"]
    malformed = client.get("/api/dlq/not-an-id", headers=ADMIN)
    assert malformed.status_code == 422 and "not a dead letter id" in malformed.json()["error"]["message"]
    assert client.get(f"/api/dlq/{entry['id']}").status_code == 401


def test_the_tick_purges_dead_letters_past_their_retention_in_bounded_batches(engine: Engine) -> None:
    entries = dead_letter(engine, count=5)
    ids = [e["id"] for e in entries]
    # three back-dated past the 30 days, oldest first: ids[0] 60 days, ids[1] 50, ids[2] 40
    for entry_id, days in zip(ids[:3], (60, 50, 40), strict=True):
        sql(engine, "UPDATE dead_letters SET created_at = tw_now() - make_interval(days => %s) WHERE id = %s",
            days, entry_id)
    engine.settings = engine.settings.with_overrides(dlq_retention_days=30, dlq_purge_batch=2)

    assert purge_expired_dead_letters(engine.db, 0, 2) == 0  # 0 keeps them forever
    assert purge_expired_dead_letters(engine.db, 30, 1) == 1  # one bounded batch
    left = [r["id"] for r in sql(engine, "SELECT id FROM dead_letters ORDER BY created_at")]
    assert left == ids[1:]  # the oldest went first
    # The tick purges batch after batch (2, then 0 < 2 stops) while its deadline allows.
    assert engine.tick().to_dict()["dead_letters_purged"] == 2
    assert engine.tick().dead_letters_purged == 0
    assert sorted(r["id"] for r in sql(engine, "SELECT id FROM dead_letters")) == sorted(ids[3:])
    # the tasks stay failed, and their runs readable
    assert {r["status"] for r in sql(engine, "SELECT status FROM tasks")} == {"failed"}

    with engine.db.connection() as conn:
        # a handful of rows: the planner would scan them all; the index must be there to use
        conn.execute("SET enable_seqscan = off")
        plan = json.dumps(conn.execute(
            """EXPLAIN (FORMAT JSON) SELECT id FROM dead_letters
               WHERE created_at < tw_now() - make_interval(days => 30) ORDER BY created_at LIMIT 500
               FOR UPDATE SKIP LOCKED""").fetchall()[0])
        conn.execute("RESET enable_seqscan")
    assert "dead_letters_created_idx" in plan, plan


# --- runs: event id, the key's name ------------------------------------------------------------


def test_runs_carry_their_event_id_and_the_name_of_the_key_that_started_them(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {**ONE, "triggers": [{"event": "file.arrived"}]})
    key = client.post("/api/keys", json={"role": "operator", "name": "dev-key"}, headers=ADMIN).json()["key"]
    named = {"x-api-key": key}

    manual = client.post("/api/pipelines/one/runs", json={}, headers=named).json()
    assert (manual["triggered_by"], manual["event_id"]) == ("dev-key", None)
    event = client.post("/api/events", json={"name": "file.arrived", "id": "evt-42", "payload": {}}, headers=named)
    assert event.status_code == 201, event.text
    (event_run_id,) = [r["id"] for r in event.json()["runs"]]
    got = client.get(f"/api/runs/{event_run_id}", headers=ADMIN).json()
    assert (got["trigger"], got["event_id"], got["triggered_by"]) == ("event", "evt-42", "dev-key")
    listed = {r["id"]: r for r in client.get("/api/runs", headers=ADMIN).json()["items"]}
    assert listed[event_run_id]["event_id"] == "evt-42" and listed[manual["id"]]["event_id"] is None
    # a key given no name is shown by its first characters, as before
    unnamed = client.post("/api/pipelines/one/runs", json={}, headers=ADMIN).json()
    assert unnamed["triggered_by"] == "acme-a"


# --- task definitions ----------------------------------------------------------------------------

REGISTRATION = {"service": "renderer", "version": "1.0.0", "transport": "http", "endpoint": "http://127.0.0.1:9/d",
                "tasks": [{"name": "render", "code_hash": "sha256:aaaaaaaa"}]}


def test_task_definition_history_has_its_own_path(client: TestClient) -> None:
    assert client.post("/api/workers/register", json=REGISTRATION, headers=ADMIN).status_code == 200
    history = client.get("/api/task-definitions/render/history", headers=ADMIN)
    assert history.status_code == 200 and history.json()["task"] == "render"
    assert [v["code_hash"] for v in history.json()["versions"]] == ["sha256:aaaaaaaa"]
    assert client.get("/api/task-definitions/render/history", headers=OTHER).status_code == 404
    assert client.get("/api/task-definitions/nothing/history", headers=ADMIN).status_code == 404
    # the old path shared /api/tasks/{task_id}'s prefix; it is gone
    assert client.get("/api/tasks/render/history", headers=ADMIN).status_code == 404


# --- worker health ---------------------------------------------------------------------------------


def worker(client: TestClient) -> dict[str, Any]:
    (item,) = client.get("/api/workers", headers=ADMIN).json()["items"]
    return dict(item)


def silence(engine: Engine, minutes: int) -> None:
    sql(engine, "UPDATE workers SET last_seen_at = tw_now() - make_interval(mins => %s)", minutes)


def token_for(engine: Engine, task: Row) -> str:
    return engine.keyring.issue(TaskClaims(
        task_id=str(task["id"]), attempt=int(task["attempt"]), claim_token=str(task["claim_token"]),
        workspace=WORKSPACE, task_name=str(task["task_name"]), params_sha256=params_digest(task["params"]),
        expires_at=int(time.time()) + 600, storage=None))


def test_worker_health_follows_heartbeats_and_callbacks(engine: Engine, client: TestClient) -> None:
    client.post("/api/workers/register", json=REGISTRATION, headers=ADMIN)
    registered = worker(client)
    assert (registered["health"], registered["stale_after_s"]) == ("healthy", 300)
    assert registered["last_seen_at"] is not None

    engine.create_pipeline(WORKSPACE, {"id": "draw", "steps": [
        {"id": "a", "task": "render", "retry": {"max_attempts": 1}}, {"id": "b", "task": "render"}]})
    engine.trigger_run(WORKSPACE, "draw", dispatch_now=False)
    (task,) = claim(engine)
    token = token_for(engine, task)

    silence(engine, 6)  # silent past the threshold (5 minutes)
    assert worker(client)["health"] == "stale"
    beat = client.post("/api/heartbeat", json={"token": token, "progress": 0.5})
    assert beat.status_code == 200, beat.text
    seen = worker(client)
    assert seen["health"] == "healthy" and seen["last_seen_at"] > registered["last_seen_at"]

    # written at most once per 30 s per task name: a second heartbeat at once writes nothing
    silence(engine, 6)
    client.post("/api/heartbeat", json={"token": token, "progress": 0.6})
    assert worker(client)["health"] == "stale"

    # a callback is heard too (a process whose last write is older than its interval)
    engine.sightings = WorkerSightings(every_s=0)
    answer = client.post(f"/api/callback/{task['id']}", json={
        "token": token, "status": "failed", "error": {"message": "no", "retryable": False}})
    assert answer.status_code == 200 and answer.json()["accepted"], answer.text
    assert worker(client)["health"] == "healthy"
    # another workspace sees none of it
    assert client.get("/api/workers", headers=OTHER).json()["items"] == []

