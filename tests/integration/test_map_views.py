"""What the API answers about mapped nodes (issue 19, "Everywhere it shows"): a mapped node is one
node of the run with its items counted, the tasks endpoint pages a node's map node and then its
items in index order, `depends` is node-level, and a run with a 100,000-task map answers in a
few tens of kilobytes.

Real Postgres. The runs here map over `params.<name>` (expanded without a worker) and the test
plays the workers through the store, as tests/integration/test_map_nodes.py does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Row
from orchestrator.engine import runs
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE

AUTH = {"Authorization": "Bearer acme-admin-key"}
XSS = "<img src=x onerror=alert(1)>"
WIDTH = 250


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False, headers=AUTH) as test_client:
        yield test_client


def files(width: int = WIDTH) -> list[str]:
    items = [f"file-{i:04d}.csv" for i in range(width)]
    if width > 7:
        items[7] = XSS
    return items


def fan(**extra: Any) -> dict[str, Any]:
    """prep -> parse (mapped over params.files) -> load."""
    return {
        "id": "fan", "params": {"files": files()}, **extra,
        "nodes": [
            {"id": "prep", "task": "prep"},
            {"id": "parse", "task": "parse-file", "depends": ["prep"],
             "map": {"over": "params.files", "max_concurrency": 1000, "tolerated_failures": "10%"}},
            {"id": "load", "task": "load-all", "depends": ["parse"]},
        ],
    }


def claim(engine: Engine, run_id: uuid.UUID, limit: int) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit, run_id=run_id)


def finish(engine: Engine, task: Row, ok: bool) -> None:
    with engine.db.transaction() as conn:
        result = finish_attempt(
            conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
            output={"key": f"k/{task['id']}"} if ok else None,
            error=None if ok else {"code": "bad_file", "message": f"cannot parse\nline two of {task['id']}"},
            retryable=False)
    assert result.accepted


def children(engine: Engine, run_id: uuid.UUID, node: str = "parse") -> list[Row]:
    """The claimed items of a mapped node in index order (with their claims)."""
    with engine.db.connection() as conn:
        return conn.execute(
            """SELECT id, map_index, attempt, claim_token, status FROM tasks
               WHERE run_id = %s AND node_id = %s AND map_parent_id IS NOT NULL ORDER BY version, map_index""",
            (run_id, node)).fetchall()


def start(engine: Engine, pipeline: dict[str, Any] | None = None, **trigger: Any) -> uuid.UUID:
    engine.create_pipeline(WORKSPACE, pipeline or fan())
    run_id = engine.trigger_run(WORKSPACE, "fan", dispatch_now=False, **trigger).id
    return run_id


def expand(engine: Engine, run_id: uuid.UUID) -> None:
    """prep succeeds: the map expands in that transaction."""
    for prep in claim(engine, run_id, 10):
        finish(engine, prep, True)


def walk(client: TestClient, url: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
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


def play(engine: Engine, run_id: uuid.UUID) -> list[Row]:
    """200 items succeed, 5 fail for good, 10 run, 35 stay dispatched."""
    assert len(claim(engine, run_id, WIDTH)) == WIDTH
    items = children(engine, run_id)
    for child in items[:200]:
        finish(engine, child, True)
    for child in items[200:205]:
        finish(engine, child, False)
    with engine.db.transaction() as conn:
        for child in items[205:215]:
            assert task_store.mark_running(conn, child["id"], child["attempt"], child["claim_token"], 0.5, None)
    return items


def test_a_mapped_node_is_one_node_with_its_items_counted(engine: Engine, client: TestClient) -> None:
    run_id = start(engine)
    run = client.get(f"/api/runs/{run_id}").json()
    # Not expanded yet: the mapped node is one pending task, its width unknown.
    assert (run["task_count"], run["item_count"], run["node_count"], run["map_items"]) == (3, 0, 3, {})
    parse = next(n for n in run["nodes"] if n["node"] == "parse")
    assert parse == {"node": "parse", "position": 1, "kind": "map", "task": "parse-file", "status": "pending",
                     "tasks": 1, "counts": {"pending": 1},
                     "map": {"over": "params.files", "width": None, "max_concurrency": 1000,
                             "tolerated_failures": "10%", "items": {}}}

    expand(engine, run_id)
    play(engine, run_id)
    run = client.get(f"/api/runs/{run_id}").json()
    # (A task whose last attempt failed for good is failed, and dead-lettered.)
    items = {"succeeded": 200, "failed": 5, "running": 10, "dispatched": 35}
    assert run["item_count"] == WIDTH and run["map_items"] == items
    # counts: every task, items included; the map node once (running while its items run).
    assert run["counts"] == {"succeeded": 201, "failed": 5, "running": 11, "dispatched": 35, "pending": 1}
    assert run["task_count"] == sum(run["counts"].values()) == WIDTH + 3
    assert run["node_count"] == 3
    nodes = {n["node"]: n for n in run["nodes"]}
    assert [n["node"] for n in run["nodes"]] == ["prep", "parse", "load"]
    assert nodes["parse"]["status"] == "running" and nodes["parse"]["counts"] == {"running": 1}
    assert nodes["parse"]["tasks"] == 1
    assert nodes["parse"]["map"] == {"over": "params.files", "width": WIDTH, "max_concurrency": 1000,
                                     "tolerated_failures": "10%", "items": items}
    assert (nodes["prep"]["status"], nodes["load"]["status"]) == ("succeeded", "pending")
    assert "map" not in nodes["prep"] and "map" not in nodes["load"]
    assert client.get(f"/api/runs/{run_id}/nodes").json()["items"] == run["nodes"]

    # The run answer's first page: prep, load... in (node, version, map_index) order.
    keys = [(t["node"], t.get("map_index")) for t in run["tasks"]]
    assert keys[:3] == [("load", None), ("parse", None), ("parse", 0)] and len(keys) == 100
    assert run["tasks_next_cursor"]
    # Without items: node-level tasks only, all on one page.
    bare = client.get(f"/api/runs/{run_id}", params={"items": "false"}).json()
    assert [(t["node"], t["kind"], t["status"]) for t in bare["tasks"]] == [
        ("load", "task", "pending"), ("parse", "map", "running"), ("prep", "task", "succeeded")]
    assert bare["tasks_next_cursor"] is None and bare["counts"] == run["counts"]
    assert bare["tasks"][1]["map"] == nodes["parse"]["map"]


def test_a_mapped_nodes_tasks_page_in_index_order(engine: Engine, client: TestClient) -> None:
    run_id = start(engine)
    expand(engine, run_id)
    played = play(engine, run_id)
    url = f"/api/runs/{run_id}/tasks"

    first = client.get(url, params={"node": "parse", "limit": 100}).json()
    head = first["items"][0]
    assert (head["kind"], head["status"], head["map"]["width"]) == ("map", "running", WIDTH)
    assert "map_index" not in head and "map_item" not in head
    assert [t["map_index"] for t in first["items"][1:]] == list(range(99))
    everything, pages = walk(client, url, node="parse", limit=100)
    assert pages == 3 and len(everything) == WIDTH + 1
    assert [t.get("map_index", -1) for t in everything] == list(range(-1, WIDTH))
    assert len({t["id"] for t in everything}) == WIDTH + 1
    map_id = head["id"]
    for child in everything[1:]:
        assert child["kind"] == "task" and child["map_parent_id"] == map_id and child["node"] == "parse"
        assert child["map_item"] == files()[child["map_index"]]
    assert everything[8]["map_item"] == XSS  # item 7, as given
    assert [(t["status"], t["dead_lettered"]) for t in everything[201:206]] == [("failed", True)] * 5
    assert not any(t["dead_lettered"] for t in everything[:201] + everything[206:])
    assert everything[201]["error"]["message"].startswith("cannot parse\n")
    assert {t["status"] for t in everything[206:216]} == {"running"}
    assert {str(t["id"]) for t in everything[1:]} == {str(c["id"]) for c in played}

    # A page of the whole run goes through the node and on, in the same order.
    whole, _ = walk(client, url, limit=37)
    assert [(t["node"], t.get("map_index", -1)) for t in whole] == (
        [("load", -1), ("parse", -1)] + [("parse", i) for i in range(WIDTH)] + [("prep", -1)])
    # The shown status filters: the map node is running, not pending.
    running, _ = walk(client, url, status="running", limit=4)
    assert [t.get("map_index", -1) for t in running] == [-1, *range(205, 215)]
    pending, _ = walk(client, url, status="pending")
    assert [t["node"] for t in pending] == ["load"]
    failed, _ = walk(client, url, status="failed", node="parse", limit=2)
    assert [t["map_index"] for t in failed] == [200, 201, 202, 203, 204]
    only_nodes, pages = walk(client, url, items="false", limit=2)
    assert [t["node"] for t in only_nodes] == ["load", "parse", "prep"] and pages == 2
    assert [t["kind"] for t in walk(client, url, items="false", node="parse")[0]] == ["map"]

    # Cursors of before map items, and a bad items flag, are refused like any bad input.
    old = runs_cursor(["t", "parse", "default"])
    for params in ({"cursor": old}, {"cursor": runs_cursor(["t", "parse", "default", "7"])},
                   {"cursor": runs_cursor(["t", "parse", "default", runs.MAX_TASKS_PER_RUN])},
                   {"items": "maybe"}):
        answer = client.get(url, params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["error"]["code"] == "invalid"
    assert client.get(f"/api/runs/{run_id}", params={"items": "no"}).status_code == 422


def runs_cursor(value: list[Any]) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def test_depends_are_node_level(engine: Engine, client: TestClient) -> None:
    run_id = start(engine)
    expand(engine, run_id)
    tasks, _ = walk(client, f"/api/runs/{run_id}/tasks", limit=200)
    by_key = {(t["node"], t.get("map_index", -1)): t for t in tasks}
    # The map node's upstream is prep, never its 250 items; an item has no upstream of its own.
    assert (by_key["parse", -1]["depends"], by_key["parse", -1]["depends_count"]) == (["prep"], 1)
    assert (by_key["parse", 3]["depends"], by_key["parse", 3]["depends_count"]) == ([], 0)
    assert (by_key["load", -1]["depends"], by_key["load", -1]["depends_count"]) == (["parse"], 1)
    detail = client.get(f"/api/tasks/{by_key['parse', -1]['id']}").json()
    assert (detail["depends"], detail["depends_count"]) == (["prep"], 1)
    item = client.get(f"/api/tasks/{by_key['parse', 3]['id']}").json()
    assert (item["depends"], item["depends_count"]) == ([], 0)
    # In-process reads agree.
    _, rows = engine.get_run(WORKSPACE, run_id)
    parse = next(r for r in rows if r["node_id"] == "parse" and r["kind"] == "map")
    assert list(parse["depends"]) == ["prep"]
    assert [r["map_index"] for r in rows if r["node_id"] == "parse"] == list(range(-1, WIDTH))


def test_a_task_answer_of_a_map_node_and_of_an_item(engine: Engine, client: TestClient) -> None:
    run_id = start(engine)
    expand(engine, run_id)
    played = play(engine, run_id)
    map_id = client.get(f"/api/runs/{run_id}/tasks", params={"node": "parse", "limit": 1}).json()["items"][0]["id"]

    node = client.get(f"/api/tasks/{map_id}").json()
    assert (node["kind"], node["status"], node["output"]) == ("map", "running", None)
    assert node["map"] == {"over": "params.files", "width": WIDTH, "max_concurrency": 1000,
                           "tolerated_failures": "10%",
                           "items": {"succeeded": 200, "failed": 5, "running": 10, "dispatched": 35}}
    assert not {"map_spec", "map_width", "map_index", "map_item", "map_parent_id"} & set(node)

    item = client.get(f"/api/tasks/{played[7]['id']}").json()
    assert (item["kind"], item["map_index"], item["map_item"], item["map_parent_id"]) == ("task", 7, XSS, map_id)
    assert item["status"] == "succeeded" and len(item["attempts"]) == 1 and "map" not in item
    plain = client.get(f"/api/runs/{run_id}/tasks", params={"node": "prep"}).json()["items"][0]
    prep = client.get(f"/api/tasks/{plain['id']}").json()
    assert not {"map", "map_index", "map_item", "map_parent_id", "map_spec"} & set(prep)

    # The rest finish: 5 failures of 250 are within 10%, the map node succeeds with its manifest.
    for child in played[215:]:
        finish(engine, child, True)
    for child in played[205:215]:
        finish(engine, child, True)
    node = client.get(f"/api/tasks/{map_id}").json()
    assert node["status"] == "succeeded" and node["attempt"] == 1
    assert node["output"]["manifest"] is True and node["output"]["key"].endswith(".json")
    assert (node["output"]["count"], node["output"]["succeeded"], node["output"]["failed"]) == (WIDTH, 245, 5)
    assert node["map"]["items"] == {"succeeded": 245, "failed": 5}
    run = client.get(f"/api/runs/{run_id}").json()
    parse = next(n for n in run["nodes"] if n["node"] == "parse")
    assert (parse["status"], parse["counts"], parse["map"]["items"]) == (
        "succeeded", {"succeeded": 1}, {"succeeded": 245, "failed": 5})
    assert run["map_items"] == {"succeeded": 245, "failed": 5}
    # five tolerated failures, counted while the run goes on (`load` is still to run)
    assert (run["status"], run["failed_tasks"], run["succeeded_with_failures"]) == ("running", 5, False)


def test_versions_and_a_map_that_could_not_expand(engine: Engine, client: TestClient) -> None:
    run_id = start(engine, fan(versions=["v1", "v2"]))
    expand(engine, run_id)
    run = client.get(f"/api/runs/{run_id}").json()
    assert (run["task_count"], run["item_count"], run["node_count"]) == (6 + 2 * WIDTH, 2 * WIDTH, 3)
    parse = next(n for n in run["nodes"] if n["node"] == "parse")
    assert (parse["tasks"], parse["counts"], parse["status"]) == (2, {"running": 2}, "running")
    assert (parse["map"]["width"], parse["map"]["items"]) == (2 * WIDTH, {"ready": 2 * WIDTH})
    nodes, _ = walk(client, f"/api/runs/{run_id}/tasks", node="parse", limit=200)
    assert [(t["version"], t.get("map_index", -1)) for t in nodes] == (
        [("v1", i) for i in range(-1, WIDTH)] + [("v2", i) for i in range(-1, WIDTH)])

    # A list that is not one: the map node fails unexpanded, its width stays unknown.
    engine.create_pipeline(WORKSPACE, {**fan(), "id": "broken", "params": {"files": "not a list"}})
    broken = engine.trigger_run(WORKSPACE, "broken", dispatch_now=False).id
    expand(engine, broken)
    answer = client.get(f"/api/runs/{broken}").json()
    parse = next(n for n in answer["nodes"] if n["node"] == "parse")
    assert (parse["status"], parse["map"]["width"], parse["map"]["items"]) == ("failed", None, {})
    assert answer["item_count"] == 0


def test_a_big_params_list_is_not_answered_whole() -> None:
    from orchestrator.api.run_views import bounded_params

    small = {"files": ["a", "b"], "strict": True}
    assert bounded_params(small) == (small, False)
    shown, cut = bounded_params({"files": [f"f{i}" for i in range(100_000)], "strict": True, "db": {"host": "h"}})
    assert cut and shown == {"strict": True, "db": {"host": "h"}}


# --- a 100,000-task run: a map of 99,997 items over a param -------------------------------------


def test_a_run_with_a_100000_task_map_answers_in_a_few_kilobytes(engine: Engine, client: TestClient) -> None:
    width = runs.MAX_TASKS_PER_RUN - 3  # with prep, the map node and the reducer: 100,000 tasks
    engine.create_pipeline(WORKSPACE, {**fan(), "params": {}})
    listing = [f"s3://bucket/part-{i:06d}.csv" for i in range(width)]
    run_id = engine.trigger_run(WORKSPACE, "fan", params={"files": listing, "strict": True}, dispatch_now=False).id
    started = time.monotonic()
    expand(engine, run_id)
    took = {"expansion": time.monotonic() - started}

    sizes: dict[str, int] = {}
    started = time.monotonic()
    answer = client.get(f"/api/runs/{run_id}")
    took["get run"] = time.monotonic() - started
    assert answer.status_code == 200, answer.text[:500]
    sizes["get run"] = len(answer.content)
    run = answer.json()
    assert (run["task_count"], run["item_count"], run["node_count"]) == (runs.MAX_TASKS_PER_RUN, width, 3)
    assert run["map_items"] == {"ready": width}
    # The run's params hold the list: answered without it.
    assert run["params_truncated"] is True and run["params"] == {"strict": True}
    parse = next(n for n in run["nodes"] if n["node"] == "parse")
    assert (parse["kind"], parse["status"], parse["tasks"], parse["map"]["width"]) == ("map", "running", 1, width)
    assert len(run["tasks"]) == 100 and run["tasks_next_cursor"]

    started = time.monotonic()
    bare = client.get(f"/api/runs/{run_id}", params={"items": "false"})
    took["get run, items=false"] = time.monotonic() - started
    sizes["get run, items=false"] = len(bare.content)
    assert [t["node"] for t in bare.json()["tasks"]] == ["load", "parse", "prep"]
    map_id = bare.json()["tasks"][1]["id"]
    started = time.monotonic()
    detail = client.get(f"/api/tasks/{map_id}")
    took["get map node"] = time.monotonic() - started
    sizes["get map node"] = len(detail.content)
    assert detail.json()["depends"] == ["prep"] and detail.json()["map"]["width"] == width
    assert detail.json()["params_truncated"] is True and "files" not in detail.json()["params"]
    sizes["nodes"] = len(client.get(f"/api/runs/{run_id}/nodes").content)

    # Every item, in index order, a page of 200 at a time.
    started = time.monotonic()
    seen, cursor, pages = -2, None, 0
    while True:
        page = client.get(f"/api/runs/{run_id}/tasks",
                          params={"node": "parse", "limit": 200, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text[:300]
        body = page.json()
        sizes["tasks page (200)"] = max(sizes.get("tasks page (200)", 0), len(page.content))
        for task in body["items"]:
            index = task.get("map_index", -1)
            assert index == seen + 1, (index, seen)
            seen = index
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    took[f"{pages} pages of items"] = time.monotonic() - started
    assert seen == width - 1 and pages == (width + 1 + 199) // 200

    print("\nanswer sizes for a run with a 99,997-item map (bytes):", json.dumps(sizes, indent=1))
    print("seconds:", json.dumps({k: round(v, 3) for k, v in took.items()}, indent=1))
    assert sizes["get run"] < 100_000 and sizes["get run, items=false"] < 20_000, sizes
    assert all(n < 150_000 for n in sizes.values()), sizes  # a page of 200 items: ~100 KB here
