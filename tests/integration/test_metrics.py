"""GET /api/metrics against the real database and app: exact counts, percentiles, rates and
schedule lag for one workspace's window, in JSON and in the Prometheus text format."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Connection, Row
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.metrics import parse_window
from orchestrator.engine.operations import expire_waits
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE
from .test_scheduling import at, fire, set_clock

KEY = "acme-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER_KEY = "other-admin-key"
VALUE_ERROR = {"message": "boom", "code": "e1", "type": "ValueError", "retryable": True}
KEY_ERROR = {"message": "missing", "type": "KeyError", "retryable": True}

ETL = {"id": "etl", "steps": [{"id": "one", "task": "echo"},
                              {"id": "two", "task": "flaky", "retry": {"max_attempts": 3, "base_delay_s": 0}}]}
GATE = {"id": "gate", "nodes": [
    {"id": "approve", "kind": "approval", "approval": {"timeout_s": 3600, "on_timeout": "reject"}},
    {"id": "ship", "task": "echo", "depends": ["approve"]}]}
EVERY5 = {"id": "every5", "schedule": "*/5 * * * *", "schedule_options": {"catchup": "none"},
          "nodes": [{"id": "a", "task": "echo"}]}


class AcceptingTransport:
    """Takes every dispatch and never calls back: the test finishes tasks itself."""

    name = "local"

    def send(self, message: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    engine.transports["local"] = AcceptingTransport()
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None  # type: ignore[method-assign]
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def claim_one(engine: Engine, run_id: uuid.UUID) -> Row:
    with engine.db.transaction() as conn:
        (task,) = task_store.claim_ready_tasks(conn, 10, run_id=run_id)
    return task


def finish(engine: Engine, task: Row, error: dict[str, Any] | None = None) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=error is None,
                              output={"key": f"k/{task['node_id']}"} if error is None else None, error=error,
                              retryable=bool(error and error.get("retryable")))
    return engine.db.run_in_transaction(work)


def node_task(engine: Engine, workspace: str, run_id: uuid.UUID, node: str) -> Row:
    return next(t for t in engine.get_run(workspace, run_id)[1] if t["node_id"] == node)


def sql(engine: Engine, statement: str, *params: Any) -> None:
    with engine.db.connection() as conn:
        conn.execute(statement, params)


@pytest.fixture
def scenario(engine: Engine, client: TestClient) -> dict[str, Any]:
    """Two workspaces' worth of runs with known outcomes and timings (see each step)."""
    set_clock(engine, at("2026-01-01T00:01:00"))
    ids: dict[str, Any] = {}

    # Another workspace: a failure with its own error code that must not be counted.
    engine.create_api_key("other", "admin", raw_key=OTHER_KEY)
    engine.create_pipeline("other", ETL)
    other = engine.trigger_run("other", "etl", dispatch_now=False)
    finish(engine, claim_one(engine, other.id), {"message": "x", "code": "not-ours", "retryable": False})

    engine.create_pipeline(WORKSPACE, ETL)
    # run A: `two` fails once (e1) then succeeds -> succeeded; 3 attempts, 1 retry
    a = engine.trigger_run(WORKSPACE, "etl", dispatch_now=False)
    finish(engine, claim_one(engine, a.id))
    finish(engine, claim_one(engine, a.id), VALUE_ERROR)
    assert finish(engine, claim_one(engine, a.id)).run_status == "succeeded"
    # run B: `two` fails three times (e1, e1, KeyError without a code) -> failed and dead-lettered, run failed;
    # 4 attempts, 2 retries
    b = engine.trigger_run(WORKSPACE, "etl", dispatch_now=False)
    finish(engine, claim_one(engine, b.id))
    finish(engine, claim_one(engine, b.id), VALUE_ERROR)
    finish(engine, claim_one(engine, b.id), VALUE_ERROR)
    assert finish(engine, claim_one(engine, b.id), KEY_ERROR).dead_lettered
    ids["etl"] = (a.id, b.id)

    engine.create_pipeline(WORKSPACE, GATE)
    gate_runs = [engine.trigger_run(WORKSPACE, "gate", dispatch_now=False).id for _ in range(4)]
    c, d, e, f = gate_runs
    # C approved (the request dispatches `ship`, which then succeeds), D rejected, E times out, F waits
    approve = client.post(f"/api/approvals/{node_task(engine, WORKSPACE, c, 'approve')['id']}",
                          json={"decision": "approve"}, headers=AUTH)
    assert approve.status_code == 200, approve.text
    with engine.db.transaction() as conn:
        (ship,) = conn.execute("SELECT id, attempt, claim_token, node_id FROM tasks WHERE run_id = %s "
                               "AND status = 'dispatched'", (c,)).fetchall()
    assert finish(engine, ship).run_status == "succeeded"
    reject = client.post(f"/api/approvals/{node_task(engine, WORKSPACE, d, 'approve')['id']}",
                         json={"decision": "reject", "comment": "no"}, headers=AUTH)
    assert reject.status_code == 200, reject.text
    sql(engine, "UPDATE tasks SET wait_expires_at = tw_now() - interval '1 second' WHERE run_id = %s AND node_id = 'approve'", e)
    assert expire_waits(engine.db, 100) == 1
    ids["gate"] = gate_runs

    # Scheduled runs: three slots, fired; their creation is then placed 10, 20 and 70 s after the slot.
    engine.create_pipeline(WORKSPACE, EVERY5)
    for slot in ("00:05", "00:10", "00:15"):
        set_clock(engine, at(f"2026-01-01T{slot}:20"))
        assert fire(engine).runs == 1
    sql(engine, """UPDATE runs SET created_at = scheduled_at + make_interval(secs => CASE
                       WHEN scheduled_at = %s THEN 10 WHEN scheduled_at = %s THEN 20 ELSE 70 END)
                   WHERE pipeline_id = 'every5'""", at("2026-01-01T00:05:00"), at("2026-01-01T00:10:00"))

    # Exact timings: run durations (etl 10 s and 40 s; gate 100, 200, 300 s), attempt durations
    # (2 s per attempt number), decision times (C 60 s, D 180 s).
    for run_id, seconds in zip([a.id, b.id, c, d, e], [10, 40, 100, 200, 300], strict=True):
        sql(engine, "UPDATE runs SET finished_at = started_at + make_interval(secs => %s) WHERE id = %s", seconds, run_id)
    sql(engine, """UPDATE task_attempts SET finished_at = dispatched_at + make_interval(secs => 2 * attempt)
                   WHERE finished_at IS NOT NULL""")
    for run_id, seconds in ((c, 60), (d, 180)):
        sql(engine, """UPDATE tasks SET finished_at = available_at + make_interval(secs => %s)
                       WHERE run_id = %s AND node_id = 'approve'""", seconds, run_id)

    # An old run: two days ago, outside the default window, inside a week.
    old = engine.trigger_run(WORKSPACE, "etl", dispatch_now=False)
    sql(engine, "UPDATE runs SET created_at = created_at - interval '2 days' WHERE id = %s", old.id)
    ids["old"] = old.id
    ids["unused"] = f
    return ids


def test_metrics_of_the_window_are_exact(client: TestClient, scenario: dict[str, Any]) -> None:
    response = client.get("/api/metrics", headers=AUTH)
    assert response.status_code == 200, response.text
    m = response.json()
    assert (m["workspace"], m["pipeline"], m["window_s"]) == ("acme", None, 86_400)

    runs = m["runs"]
    assert runs["by_status"] == {"pending": 0, "running": 4, "succeeded": 2, "failed": 3, "cancelled": 0}
    assert runs["total"] == 9
    assert runs["by_pipeline"]["etl"] == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert runs["by_pipeline"]["gate"]["failed"] == 2 and runs["by_pipeline"]["every5"]["running"] == 3
    overall = runs["duration_s"]["all"]
    assert (overall["count"], overall["max"], overall["sum"]) == (5, 300, 650)
    assert overall["p50"] == pytest.approx(100) and overall["p95"] == pytest.approx(280)
    assert overall["p99"] == pytest.approx(296)
    etl = runs["duration_s"]["by_pipeline"]["etl"]
    assert (etl["count"], etl["p50"], etl["max"]) == (2, pytest.approx(25), 40)
    assert etl["p95"] == pytest.approx(38.5) and etl["p99"] == pytest.approx(39.7)
    gate = runs["duration_s"]["by_pipeline"]["gate"]
    assert (gate["p50"], gate["p95"], gate["p99"]) == (pytest.approx(200), pytest.approx(290), pytest.approx(298))
    assert "every5" not in runs["duration_s"]["by_pipeline"]  # still running

    tasks = m["tasks"]
    assert tasks["by_status"] == {"pending": 1, "ready": 3, "dispatched": 0, "running": 0, "waiting": 1,
                                  "succeeded": 5, "failed": 3, "skipped": 2, "cancelled": 0}
    # of the failed: the rejected and the timed-out approval (not dead-lettered), and B's `two`
    assert (tasks["total"], tasks["finished"], tasks["dead_lettered"]) == (15, 10, 1)
    assert tasks["dead_letter_rate"] == pytest.approx(0.1)

    attempts = m["attempts"]
    assert (attempts["total"], attempts["retries"]) == (8, 3)
    assert attempts["retry_rate"] == pytest.approx(3 / 8)
    durations = attempts["duration_s"]["all"]  # [2, 2, 2, 2, 2, 4, 4, 6]
    assert (durations["count"], durations["p50"], durations["max"]) == (8, pytest.approx(2), 6)
    assert durations["p95"] == pytest.approx(4 + 0.65 * 2) and durations["p99"] == pytest.approx(4 + 0.93 * 2)
    assert attempts["duration_s"]["by_pipeline"]["gate"]["count"] == 1

    assert m["failures"] == {"total": 4, "by_code": [
        {"code": "e1", "type": "ValueError", "count": 3}, {"code": "KeyError", "type": "KeyError", "count": 1}]}

    approvals = m["approvals"]
    assert {k: approvals[k] for k in ("total", "approved", "rejected", "timed_out", "escalated", "waiting")} == {
        "total": 4, "approved": 1, "rejected": 1, "timed_out": 1, "escalated": 0, "waiting": 1}
    assert approvals["approval_rate"] == pytest.approx(1 / 3)
    decision = approvals["decision_time_s"]
    assert (decision["count"], decision["max"]) == (2, 180)
    assert decision["p50"] == pytest.approx(120) and decision["p95"] == pytest.approx(174)

    lag = m["schedule_lag_s"]
    assert (lag["count"], lag["max"]) == (3, 70)
    assert lag["p50"] == pytest.approx(20) and lag["p95"] == pytest.approx(65)


def test_pipeline_filter_and_window(client: TestClient, scenario: dict[str, Any]) -> None:
    m = client.get("/api/metrics?pipeline=etl", headers=AUTH).json()
    assert m["pipeline"] == "etl"
    assert m["runs"]["by_status"] == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert list(m["runs"]["by_pipeline"]) == ["etl"]
    assert m["tasks"]["by_status"]["succeeded"] == 3 and m["tasks"]["dead_lettered"] == 1
    assert m["tasks"]["dead_letter_rate"] == pytest.approx(1 / 4)
    assert (m["attempts"]["total"], m["attempts"]["retries"]) == (7, 3)
    assert m["approvals"]["total"] == 0 and m["approvals"]["approval_rate"] is None
    assert m["approvals"]["decision_time_s"] == {"count": 0, "p50": None, "p95": None, "max": None, "sum": 0.0}
    assert m["schedule_lag_s"]["count"] == 0

    week = client.get("/api/metrics?window=7d&pipeline=etl", headers=AUTH).json()
    assert week["window_s"] == 7 * 86_400
    assert week["runs"]["by_status"]["running"] == 1  # the two-day-old run
    assert client.get("/api/metrics?window=3600", headers=AUTH).json()["runs"]["total"] == 9
    # a pipeline with no runs (or no such pipeline) has zeros, not an error
    empty = client.get("/api/metrics?pipeline=nope", headers=AUTH).json()
    assert empty["runs"]["total"] == 0 and empty["attempts"]["retry_rate"] is None


def test_another_workspace_sees_only_its_own(client: TestClient, scenario: dict[str, Any]) -> None:
    m = client.get("/api/metrics", headers={"x-api-key": OTHER_KEY}).json()
    assert m["workspace"] == "other"
    assert m["runs"]["by_status"]["failed"] == 1 and m["runs"]["total"] == 1
    assert m["failures"]["by_code"] == [{"code": "not-ours", "type": None, "count": 1}]
    assert (m["tasks"]["dead_lettered"], m["tasks"]["finished"]) == (1, 2)  # `one` failed, `two` skipped
    ours = client.get("/api/metrics", headers=AUTH).json()
    assert all(row["code"] != "not-ours" for row in ours["failures"]["by_code"])


def test_prometheus_text(client: TestClient, scenario: dict[str, Any]) -> None:
    for response in (client.get("/api/metrics?format=prometheus", headers=AUTH),
                     client.get("/api/metrics", headers={**AUTH, "Accept": "text/plain"})):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        lines = set(response.text.splitlines())
        assert 'tickweave_runs{workspace="acme",status="failed"} 3' in lines
        assert 'tickweave_tasks{workspace="acme",status="failed"} 3' in lines
        assert 'tickweave_dead_lettered_tasks{workspace="acme"} 1' in lines
        assert not any('status="dead"' in line for line in lines)
        assert 'tickweave_pipeline_runs{workspace="acme",pipeline="etl",status="succeeded"} 1' in lines
        assert 'tickweave_run_duration_seconds{workspace="acme",pipeline="etl",quantile="0.5"} 25' in lines
        assert 'tickweave_run_duration_seconds_count{workspace="acme",pipeline="etl"} 2' in lines
        assert 'tickweave_run_duration_seconds_sum{workspace="acme",pipeline="etl"} 50' in lines
        assert 'tickweave_task_failures{workspace="acme",code="e1",type="ValueError"} 3' in lines
        assert 'tickweave_approvals{workspace="acme",outcome="timed_out"} 1' in lines
        assert 'tickweave_schedule_lag_max_seconds{workspace="acme"} 70' in lines
        assert "# TYPE tickweave_run_duration_seconds summary" in lines
        assert all(line.startswith("#") or line.startswith("tickweave_") for line in lines)
    assert client.get("/api/metrics?format=json", headers={**AUTH, "Accept": "text/plain"}).json()["runs"]["total"] == 9


@pytest.mark.parametrize(("query", "fragment"), [
    ("window=abc", "window must be"), ("window=0", "from 1 second to 90 days"),
    ("window=91d", "from 1 second to 90 days"), ("window=-5", "window must be"), ("format=xml", "format"),
])
def test_bad_parameters_are_422(client: TestClient, engine: Engine, query: str, fragment: str) -> None:
    response = client.get(f"/api/metrics?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid" and fragment in response.json()["error"]["message"]


def test_auth_and_roles(client: TestClient, engine: Engine) -> None:
    assert client.get("/api/metrics").status_code == 401
    engine.create_api_key(WORKSPACE, "viewer", raw_key="acme-viewer-key")
    assert client.get("/api/metrics", headers={"x-api-key": "acme-viewer-key"}).status_code == 200


def test_parse_window() -> None:
    assert parse_window(None) == 86_400
    assert [parse_window(v) for v in ("90", "90s", "15m", "1h", "24H", "7d", "2w", "90d")] == [
        90, 90, 900, 3600, 86_400, 604_800, 1_209_600, 7_776_000]
    for bad in ("1y", "1.5h", "h", "-1", "0", "91d", "1h30m"):
        with pytest.raises(InvalidInput):
            parse_window(bad)


def test_metric_queries_start_from_the_workspace_index(engine: Engine) -> None:
    """Every statement reaches runs through a (workspace, ...) index and tasks and attempts by
    their run and task ids: nothing is scanned, however long the history."""
    from orchestrator.store import metrics as metrics_store

    engine.create_pipeline(WORKSPACE, ETL)
    engine.trigger_run(WORKSPACE, "etl", versions=[f"v{i}" for i in range(300)], dispatch_now=False)
    # a long history before the window: 5,000 month-old runs
    sql(engine, """INSERT INTO runs (id, workspace_id, pipeline_id, pipeline_version, status, trigger, versions,
                                     unfinished_tasks, created_at, started_at, finished_at)
                   SELECT gen_random_uuid(), workspace_id, pipeline_id, pipeline_version, 'succeeded', 'manual',
                          versions, 0, created_at - interval '30 days' - make_interval(secs => g),
                          created_at - interval '30 days', created_at - interval '29 days'
                   FROM runs, generate_series(1, 5000) g""")
    sql(engine, """INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind, transport,
                                      status, attempt, retry, heartbeat_s, on_failure, trigger_rule, unfinished_deps,
                                      created_at)
                   SELECT gen_random_uuid(), id, workspace_id, pipeline_id, 'one', 'default', 0, 'task', 'local',
                          'failed', 1, '{}', 60, 'stop', 'all_success', 0, created_at
                   FROM runs WHERE status = 'succeeded'""")
    # each of those runs has one more failed task (the books' run_failed_task_count)
    sql(engine, "UPDATE runs SET failed_task_count = failed_task_count + 1 WHERE status = 'succeeded'")
    sql(engine, """INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at, finished_at, error)
                   SELECT id, 1, gen_random_uuid(), 'failed', created_at, created_at, '{"code": "old"}'
                   FROM tasks WHERE status = 'failed'""")
    plans: list[str] = []

    class Explaining:
        def __init__(self, conn: Connection) -> None:
            self.conn = conn

        def execute(self, query: str, params: Any = None) -> Any:
            if query.lstrip().upper().startswith("SELECT") and "FROM runs" in query:
                rows = self.conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchall()
                plans.append(str(rows[0]))
            return self.conn.execute(query, params)

    with engine.db.connection() as conn:
        conn.execute("ANALYZE runs, tasks, task_attempts")
        explaining: Any = Explaining(conn)
        since = metrics_store.window_bounds(conn, 86_400)["since"]
        for pipeline in (None, "etl"):
            for query in (metrics_store.run_counts, metrics_store.run_durations, metrics_store.task_counts,
                          metrics_store.attempt_stats, metrics_store.failures_by_code,
                          metrics_store.approval_stats, metrics_store.schedule_lag):
                query(explaining, WORKSPACE, since, pipeline)
    assert len(plans) == 14
    for plan in plans:
        # (workspace, created_at), (workspace, pipeline, created_at) or, for scheduled runs only,
        # the (workspace, pipeline, scheduled_at) partial index
        assert any(index in plan for index in (
            "runs_workspace_created_idx", "runs_pipeline_created_idx", "runs_pipeline_slot_idx")), plan
        assert "Seq Scan" not in plan, plan
