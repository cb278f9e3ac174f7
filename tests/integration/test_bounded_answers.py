"""Bounded answers (issue 17): no answer embeds every task of a run. A run answer carries counts by
status (overall and per node), a first page of tasks and a cursor; GET /api/runs/{id}/tasks and
GET /api/runs/{id}/nodes page through the rest, keyset-paginated on an index (issue 19: the unique
key (run_id, node_id, version, map_index), so a map node's items follow it in index order). A 100,000-task run
(runs.MAX_TASKS_PER_RUN) must stay viewable and cancellable on Lambda (answers <= 6 MB): every
answer about it stays under 1 MB."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine import runs
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

KEY = "acme-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MEGABYTE = 1_000_000


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False, headers=AUTH) as test_client:
        yield test_client


def chain(pipeline_id: str, nodes: int, versions: list[str]) -> dict[str, Any]:
    """`nodes` steps in a chain (each depends on the one before), for each of `versions`."""
    return {"id": pipeline_id, "versions": versions, "nodes": [
        {"id": f"n{i:05d}", "task": "echo", **({"depends": [f"n{i - 1:05d}"]} if i else {})} for i in range(nodes)]}


def size(response: Any) -> int:
    return len(response.content)


def test_every_answer_about_a_100000_task_run_is_under_a_megabyte(engine: Engine, client: TestClient) -> None:
    versions = [f"v{i:03d}" for i in range(100)]
    engine.create_pipeline(WORKSPACE, chain("huge", 1000, versions))
    assert 1000 * len(versions) == runs.MAX_TASKS_PER_RUN

    started = time.monotonic()
    triggered = client.post("/api/pipelines/huge/runs", json={})
    took = {"trigger": time.monotonic() - started}
    assert triggered.status_code == 201, triggered.text[:500]
    run_id = triggered.json()["id"]
    sizes = {"trigger": size(triggered)}

    started = time.monotonic()
    answer = client.get(f"/api/runs/{run_id}")
    took["get run"] = time.monotonic() - started
    assert answer.status_code == 200
    sizes["get run"] = size(answer)
    run = answer.json()
    assert run["task_count"] == runs.MAX_TASKS_PER_RUN
    assert sum(run["counts"].values()) == runs.MAX_TASKS_PER_RUN
    assert run["counts"]["pending"] == runs.MAX_TASKS_PER_RUN - len(versions)  # only the roots can start
    assert len(run["tasks"]) == 100 and run["tasks_next_cursor"]
    assert run["node_count"] == 1000 and len(run["nodes"]) == 100 and run["nodes_next_cursor"]
    assert run["nodes"][0] == {**run["nodes"][0], "node": "n00000", "position": 0, "tasks": 100}

    started = time.monotonic()
    page = client.get(f"/api/runs/{run_id}/tasks", params={"limit": 200, "cursor": run["tasks_next_cursor"]})
    took["tasks page"] = time.monotonic() - started
    assert page.status_code == 200 and len(page.json()["items"]) == 200
    sizes["tasks page (200)"] = size(page)
    deep = client.get(f"/api/runs/{run_id}/tasks", params={"status": "pending", "node": "n00999", "limit": 200})
    assert deep.status_code == 200 and len(deep.json()["items"]) == 100
    sizes["tasks page (node, status)"] = size(deep)
    nodes = client.get(f"/api/runs/{run_id}/nodes", params={"limit": 500, "cursor": run["nodes_next_cursor"]})
    assert nodes.status_code == 200 and len(nodes.json()["items"]) == 500
    sizes["nodes page (500)"] = size(nodes)

    listed = client.get("/api/runs", params={"limit": 500})
    assert listed.status_code == 200
    sizes["list runs"] = size(listed)

    started = time.monotonic()
    cancelled = client.post(f"/api/runs/{run_id}/cancel")
    took["cancel"] = time.monotonic() - started
    assert cancelled.status_code == 200, cancelled.text[:500]
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"] == {"cancelled": runs.MAX_TASKS_PER_RUN}
    sizes["cancel"] = size(cancelled)

    print("\nanswer sizes for a 100,000-task run (bytes):", json.dumps(sizes, indent=1))
    print("seconds:", json.dumps({k: round(v, 3) for k, v in took.items()}))
    assert all(n < MEGABYTE for n in sizes.values()), sizes


SMALL = {
    "id": "small", "versions": ["v1", "v2", "v3", "v4"],
    "nodes": [{"id": "extract", "task": "echo"}, {"id": "gate", "kind": "approval"},
              {"id": "load", "task": "echo", "depends": ["extract", "gate"]}],
}


def walk(client: TestClient, url: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a paged endpoint, and the number of pages it took."""
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        answer = client.get(url, params={**params, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages


def test_run_answer_counts_and_pages_walk_every_task_once(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, SMALL)
    run_id = engine.trigger_run(WORKSPACE, "small", dispatch_now=False).id

    run = client.get(f"/api/runs/{run_id}", params={"limit": 5}).json()
    assert (run["task_count"], run["node_count"]) == (12, 3)
    assert run["counts"] == {"ready": 4, "waiting": 4, "pending": 4}
    assert [(n["node"], n["position"], n["kind"], n["tasks"], n["counts"]) for n in run["nodes"]] == [
        ("extract", 0, "task", 4, {"ready": 4}), ("gate", 1, "approval", 4, {"waiting": 4}),
        ("load", 2, "task", 4, {"pending": 4})]
    assert run["nodes_next_cursor"] is None
    # (node, version) order; the first page of the run answer goes on in /tasks
    assert [(t["node"], t["version"]) for t in run["tasks"]] == [
        ("extract", "v1"), ("extract", "v2"), ("extract", "v3"), ("extract", "v4"), ("gate", "v1")]
    load = client.get(f"/api/runs/{run_id}/tasks", params={"node": "load", "limit": 1}).json()["items"][0]
    assert (load["position"], load["depends"], load["depends_count"]) == (2, ["extract", "gate"], 2)
    rest = client.get(f"/api/runs/{run_id}/tasks", params={"cursor": run["tasks_next_cursor"], "limit": 200}).json()
    assert len(rest["items"]) == 7 and rest["next_cursor"] is None

    everything, pages = walk(client, f"/api/runs/{run_id}/tasks", limit=5)
    assert pages == 3 and len({t["id"] for t in everything}) == 12
    keys = [(t["node"], t["version"]) for t in everything]
    assert keys == sorted(keys)
    _, tasks = engine.get_run(WORKSPACE, run_id)
    assert {t["id"] for t in everything} == {str(t["id"]) for t in tasks}

    waiting, _ = walk(client, f"/api/runs/{run_id}/tasks", status="waiting", limit=3)
    assert [(t["node"], t["version"]) for t in waiting] == [("gate", v) for v in SMALL["versions"]]
    assert walk(client, f"/api/runs/{run_id}/tasks", status="waiting", node="extract")[0] == []
    one_node, pages = walk(client, f"/api/runs/{run_id}/tasks", node="load", limit=2)
    assert [t["version"] for t in one_node] == ["v1", "v2", "v3", "v4"] and pages == 2
    assert client.get(f"/api/runs/{run_id}/tasks", params={"node": "nowhere"}).json() == {
        "items": [], "next_cursor": None}

    nodes, pages = walk(client, f"/api/runs/{run_id}/nodes", limit=2)
    assert [n["node"] for n in nodes] == ["extract", "gate", "load"] and pages == 2
    assert client.get(f"/api/runs/{run_id}", params={"limit": 0}).json()["tasks"] == []

    cancelled = client.post(f"/api/runs/{run_id}/cancel").json()
    assert cancelled["counts"] == {"cancelled": 12}
    assert {n["node"]: n["counts"] for n in cancelled["nodes"]} == {
        node: {"cancelled": 4} for node in ("extract", "gate", "load")}


def test_paging_input_is_checked_and_other_workspaces_runs_are_not_found(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, SMALL)
    run_id = engine.trigger_run(WORKSPACE, "small", dispatch_now=False).id
    node_cursor = client.get(f"/api/runs/{run_id}/nodes", params={"limit": 1}).json()["next_cursor"]
    for url, params in [
        (f"/api/runs/{run_id}/tasks", {"limit": "0"}), (f"/api/runs/{run_id}/tasks", {"limit": "201"}),
        (f"/api/runs/{run_id}/tasks", {"limit": "²"}), (f"/api/runs/{run_id}/tasks", {"status": "done"}),
        (f"/api/runs/{run_id}/tasks", {"cursor": "not-a-cursor"}), (f"/api/runs/{run_id}/tasks", {"cursor": node_cursor}),
        (f"/api/runs/{run_id}/tasks", {"include": "everything"}), (f"/api/runs/{run_id}/nodes", {"limit": "501"}),
        (f"/api/runs/{run_id}/nodes", {"cursor": "W1tbW1tbW1s"}), (f"/api/runs/{run_id}", {"limit": "201"}),
        (f"/api/runs/{run_id}/tasks", {"limit": "9" * 5000}), (f"/api/runs/{run_id}/tasks", {"node": "x" * 256}),
    ]:
        answer = client.get(url, params=params)
        assert answer.status_code == 422, (url, params, answer.text)
        assert answer.json()["error"]["code"] == "invalid"

    other, _ = engine.create_api_key("elsewhere", "admin")
    for path in ("", "/tasks", "/nodes"):
        answer = client.get(f"/api/runs/{run_id}{path}", headers={"Authorization": f"Bearer {other}"})
        assert answer.status_code == 404, (path, answer.text)
        assert client.get(f"/api/runs/{uuid.uuid4()}{path}").status_code == 404
    assert client.post(f"/api/runs/{run_id}/cancel", headers={"Authorization": f"Bearer {other}"}).status_code == 404


def test_include_attempts_and_list_answers_are_bounded(engine: Engine, client: TestClient) -> None:
    engine.create_pipeline(WORKSPACE, {**SMALL, "versions": [f"v{i:04d}" for i in range(30)]})
    # No transport in this engine: each dispatch of a root fails, which is an attempt on record.
    run_id = client.post("/api/pipelines/small/runs", json={}).json()["id"]
    page = client.get(f"/api/runs/{run_id}/tasks", params={"node": "extract", "include": "attempts"}).json()
    assert all(len(t["attempts"]) == 1 and t["attempts"][0]["status"] == "dispatch_failed" for t in page["items"])
    assert "attempts" not in client.get(f"/api/runs/{run_id}/tasks").json()["items"][0]
    run = client.get(f"/api/runs/{run_id}", params={"include": "attempts", "limit": 2}).json()
    assert [len(t["attempts"]) for t in run["tasks"]] == [1, 1]

    listed = client.get("/api/runs").json()["items"][0]
    assert listed["version_count"] == 30 and listed["versions"] == [f"v{i:04d}" for i in range(20)]
    orchestration = client.post("/api/orchestrations", json={"pipelines": ["small"]}).json()
    assert [(r["version_count"], len(r["versions"])) for r in orchestration["runs"]] == [(30, 20)]


def test_a_task_in_a_page_is_bounded() -> None:
    from orchestrator.api.run_views import bounded, task_view

    small = {"message": "boom", "type": "ValueError", "retryable": False}
    assert bounded(small) == small
    huge = {"message": "x" * 20_000, "traceback": "y" * 20_000, "type": "ValueError", "nested": {"a": [1] * 5000}}
    cut = bounded(huge)
    assert cut["truncated"] is True and cut["type"] == "ValueError" and len(cut["message"]) == 300
    assert "nested" not in cut and len(json.dumps(cut)) <= 2000
    assert len(bounded("z" * 10_000)) == 2000
    row = {"id": uuid.uuid4(), "node_id": "n", "version": "v", "position": 0, "kind": "task", "task_name": "t",
           "status": "failed", "attempt": 1, "max_attempts": 1, "depends": ["a"] * 50, "depends_count": 10_000,
           "created_at": None, "dispatched_at": None, "started_at": None, "finished_at": None, "progress": None,
           "message": "m" * 5000, "output": {"key": "k", "blob": "b" * 100_000}, "error": huge}
    assert len(json.dumps(task_view(row), default=str)) < 10_000


class _Explain:
    """A connection whose statements are explained instead of run."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.plans: list[dict[str, Any]] = []

    def execute(self, query: str, params: Any = None) -> Any:
        rows = self.conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchall()
        self.plans.append(rows[0]["QUERY PLAN"][0]["Plan"])
        return self.conn.execute("SELECT 1 WHERE false")


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.mark.parametrize("filters", [
    {}, {"node": "n00010"}, {"status": "ready"}, {"after": ("n00010", "v0500", -1)},
    {"node": "n00010", "after": ("n00010", "v0500", -1)}, {"items": False},
    {"node": "n00010", "after": ("n00010", "v0500", 7), "items": False},
    {"status": "pending", "after": ("n00010", "v0500", -1)},
])
def test_a_page_of_tasks_is_an_index_range(engine: Engine, filters: dict[str, Any]) -> None:
    from orchestrator.store import tasks as task_store

    engine.create_pipeline(WORKSPACE, chain("wide", 20, [f"v{i:04d}" for i in range(1000)]))
    run_id = engine.trigger_run(WORKSPACE, "wide", dispatch_now=False).id
    with engine.db.connection() as conn:
        conn.execute("ANALYZE tasks")
        explain = _Explain(conn)
        task_store.page_tasks_of_run(explain, WORKSPACE, run_id, limit=101, **filters)  # type: ignore[arg-type]
    plan = explain.plans[0]  # (then the upstreams of the page's tasks, by their ids)
    assert not any(n["Node Type"] == "Seq Scan" for n in _nodes(plan)), plan
    assert plan["Node Type"] == "Limit", plan
    (scan,) = plan["Plans"]
    if filters.get("status") == "ready" and scan["Node Type"] == "Sort":
        # The run's ready tasks, sorted: a partial index holds just them (bounded by what is ready).
        (scan,) = scan["Plans"]
        assert (scan["Node Type"], scan["Index Name"]) == ("Index Scan", "tasks_ready_run_idx"), plan
        return
    # The page is the first rows of an index range, in index order: no sort, no scan of the run.
    assert (scan["Node Type"], scan["Index Name"]) == ("Index Scan", "tasks_run_node_version_item_key"), plan


def test_documented_page_limits_are_the_engines() -> None:
    from orchestrator.api import openapi

    assert (openapi.MAX_TASK_PAGE, openapi.MAX_NODE_PAGE) == (runs.MAX_TASK_PAGE, runs.MAX_NODE_PAGE)
