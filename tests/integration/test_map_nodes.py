"""Dynamic fan-out (issue 19): a node mapped over a list an upstream produced runs once per item,
and its downstream runs once, after every item, reading a manifest of their outputs.

Real Postgres and the moto S3/STS server (the storage role of template.yaml, session policies
enforced where a worker reads or writes); the test plays the worker from the dispatch messages
the engine sends (the capturing transport of test_attempt_storage_fencing). The invariant
checker runs after every test (tests/db_fixtures.py) and, where a test says so, in between.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from orchestrator.db.connection import connect
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import Conflict
from orchestrator.engine.service import Engine
from orchestrator.storage.s3 import read_json_object
from orchestrator.store import tasks as task_store
from orchestrator.store.invariants import check_books

from . import test_attempt_storage_fencing as fencing
from .test_attempt_storage_fencing import WORKSPACE, grant_of, transport, write_as

engine = fencing.engine  # an engine on moto with the storage role; dispatches are captured


def mapped(over: str = "list.files", **map_options: Any) -> dict[str, Any]:
    return {
        "id": "fan",
        "nodes": [
            {"id": "list", "task": "list-files"},
            {"id": "parse", "task": "parse-file", "depends": ["list"], "params": {"mode": "strict"},
             "map": {"over": over, **map_options}},
            {"id": "load", "task": "load-all", "depends": ["parse"]},
        ],
    }


def books(engine: Engine) -> list[str]:
    with engine.db.connection() as conn:
        return [f"{v.check}: {v.message}" for v in check_books(conn)]


def take_all(engine: Engine, node: str) -> list[dict[str, Any]]:
    sent = transport(engine)
    with sent._lock:
        taken = [m for m in sent.sent if m["node"] == node]
        sent.sent = [m for m in sent.sent if m["node"] != node]
    return taken


def succeed(engine: Engine, message: dict[str, Any], value: Any) -> AttemptResult:
    output = write_as(grant_of(engine, message), value)
    return engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                                  output=output, error=None)


def fail(engine: Engine, message: dict[str, Any], retryable: bool = False) -> AttemptResult:
    return engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="failed", output=None,
                                  error={"code": "bad_file", "message": f"cannot parse {message.get('map')}",
                                         "retryable": retryable})


def start(engine: Engine, files: list[Any], pipeline: dict[str, Any] | None = None) -> uuid.UUID:
    engine.create_pipeline(WORKSPACE, pipeline or mapped())
    run = engine.trigger_run(WORKSPACE, "fan")
    (listing,) = take_all(engine, "list")
    assert succeed(engine, listing, {"files": files}).outcome == "succeeded"
    return run.id


def run_row(engine: Engine, run_id: uuid.UUID) -> dict[str, Any]:
    return engine.get_run(WORKSPACE, run_id)[0]


def map_node(engine: Engine, run_id: uuid.UUID, node: str = "parse") -> dict[str, Any]:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT * FROM tasks WHERE run_id = %s AND node_id = %s AND kind = 'map'",
                           (run_id, node)).fetchone()
    assert row is not None
    return row


def manifest_of(engine: Engine, message: dict[str, Any], node: str = "parse") -> dict[str, Any]:
    ref = message["inputs"][node]
    assert ref["manifest"] is True
    value: dict[str, Any] = read_json_object(engine.settings, ref["key"])
    return value


def test_each_item_runs_once_with_its_item_and_the_reducer_once_after_all(engine: Engine) -> None:
    run_id = start(engine, ["a.csv", "b.csv", "c.csv"])

    children = sorted(take_all(engine, "parse"), key=lambda m: m["map"]["index"])
    assert [(m["map"]["index"], m["map"]["item"], m["map"]["count"]) for m in children] == [
        (0, "a.csv", 3), (1, "b.csv", 3), (2, "c.csv", 3)]
    # Each child has the node's params and the node's inputs (the listing), and writes under its
    # own item's attempt prefix.
    assert all(m["params"]["mode"] == "strict" and set(m["inputs"]) == {"list"} for m in children)
    keys = [grant_of(engine, m).output_key for m in children]
    assert keys == [f"runs/{WORKSPACE}/fan/{run_id}/default/nodes/parse/items/{i}/attempts/1/output.json"
                    for i in range(3)]
    assert map_node(engine, run_id)["status"] == "pending" and books(engine) == []

    for message in reversed(children[1:]):  # in any order; the reducer waits for every item
        assert succeed(engine, message, {"rows": message["map"]["index"] * 10}).outcome == "succeeded"
        assert take_all(engine, "load") == []
    succeed(engine, children[0], {"rows": 0})
    (load,) = take_all(engine, "load")
    manifest = manifest_of(engine, load)
    assert (manifest["count"], manifest["succeeded"], manifest["failed"]) == (3, 3, 0)
    assert [(i["index"], i["status"], i["key"]) for i in manifest["items"]] == [
        (i, "succeeded", keys[i]) for i in range(3)]
    # The reducer's grant reads every child's output (a prefix), nothing else of the run.
    grant = grant_of(engine, load)
    assert grant.read_prefixes == (f"runs/{WORKSPACE}/fan/{run_id}/default/nodes/parse/items/",)
    assert succeed(engine, load, {"loaded": 3}).outcome == "succeeded"
    assert run_row(engine, run_id)["status"] == "succeeded"
    assert books(engine) == []


def test_an_empty_list_settles_the_node_at_once_and_the_reducer_reads_an_empty_manifest(engine: Engine) -> None:
    run_id = start(engine, [])
    assert take_all(engine, "parse") == []
    node = map_node(engine, run_id)
    assert (node["status"], node["map_width"]) == ("succeeded", 0)
    (load,) = take_all(engine, "load")
    manifest = manifest_of(engine, load)
    assert (manifest["count"], manifest["items"]) == (0, [])
    assert succeed(engine, load, {}).outcome == "succeeded"
    assert run_row(engine, run_id)["status"] == "succeeded"


def test_one_item(engine: Engine) -> None:
    run_id = start(engine, [{"key": "x"}])
    (child,) = take_all(engine, "parse")
    assert child["map"] == {"index": 0, "item": {"key": "x"}, "count": 1}
    succeed(engine, child, 1)
    (load,) = take_all(engine, "load")
    assert [i["status"] for i in manifest_of(engine, load)["items"]] == ["succeeded"]
    succeed(engine, load, 1)
    assert run_row(engine, run_id)["status"] == "succeeded"


@pytest.mark.parametrize(("value", "code", "words"), [
    ({"files": "a.csv"}, "map_over_invalid", "is a string, not a list"),
    ({"other": []}, "map_over_invalid", "there is no 'files'"),
    ([1, 2], "map_over_invalid", "has no 'files'"),
])
def test_a_list_that_is_not_there_fails_the_map_node_saying_why(
    engine: Engine, value: Any, code: str, words: str
) -> None:
    engine.create_pipeline(WORKSPACE, mapped())
    run = engine.trigger_run(WORKSPACE, "fan")
    (listing,) = take_all(engine, "list")
    assert succeed(engine, listing, value).outcome == "succeeded"  # the upstream's success stands
    node = map_node(engine, run.id)
    assert node["status"] == "failed" and node["error"]["code"] == code, node["error"]
    assert words in node["error"]["message"] and "list.files" in node["error"]["message"]
    assert run_row(engine, run.id)["status"] == "failed"
    assert take_all(engine, "parse") == [] and take_all(engine, "load") == []


def test_failures_within_tolerated_failures_let_the_node_succeed(engine: Engine) -> None:
    pipeline = mapped(tolerated_failures="50%")
    run_id = start(engine, ["a", "b", "c", "d"], pipeline)
    children = sorted(take_all(engine, "parse"), key=lambda m: m["map"]["index"])
    fail(engine, children[1])
    fail(engine, children[3])
    succeed(engine, children[0], "A")
    succeed(engine, children[2], "C")
    node = map_node(engine, run_id)
    assert node["status"] == "succeeded" and node["output"]["failed"] == 2
    (load,) = take_all(engine, "load")
    manifest = manifest_of(engine, load)
    assert [i["status"] for i in manifest["items"]] == ["succeeded", "failed", "succeeded", "failed"]
    assert manifest["items"][1]["error"]["code"] == "bad_file"
    # Each failed item is dead-lettered on its own.
    with engine.db.connection() as conn:
        dead = conn.execute("SELECT inputs FROM dead_letters WHERE run_id = %s ORDER BY inputs->'map'->>'index'",
                            (run_id,)).fetchall()
    # ...with what it ran on: the map node's inputs and its own item.
    assert [(d["inputs"]["map"], set(d["inputs"])) for d in dead] == [
        ({"index": 1, "item": "b"}, {"list", "map"}), ({"index": 3, "item": "d"}, {"list", "map"})]
    succeed(engine, load, "done")
    assert run_row(engine, run_id)["status"] == "succeeded"


def test_failures_beyond_tolerated_fail_the_node_and_a_redrive_reruns_only_the_failed_items(engine: Engine) -> None:
    run_id = start(engine, ["a", "b", "c"], mapped(tolerated_failures=0))
    children = sorted(take_all(engine, "parse"), key=lambda m: m["map"]["index"])
    succeed(engine, children[0], "A")
    fail(engine, children[1])
    succeed(engine, children[2], "C")
    node = map_node(engine, run_id)
    assert node["status"] == "failed" and node["error"]["code"] == "map_failures_exceeded"
    assert "1 of 3 items failed" in node["error"]["message"]
    assert run_row(engine, run_id)["status"] == "failed"
    assert take_all(engine, "load") == []
    assert books(engine) == []

    assert engine.redrive_run(WORKSPACE, run_id) >= 2  # the failed item, the map node, the reducer
    assert books(engine) == []
    engine.tick()
    (again,) = take_all(engine, "parse")  # only the failed item runs again
    assert (again["map"]["index"], again["attempt"]) == (1, 2)
    succeed(engine, again, "B")
    (load,) = take_all(engine, "load")
    manifest = manifest_of(engine, load)
    assert manifest["items"][1]["key"].endswith("/items/1/attempts/2/output.json")
    assert load["inputs"]["parse"]["key"].endswith("/nodes/parse/attempts/2/manifest.json")  # the second settle
    succeed(engine, load, "ok")
    assert run_row(engine, run_id)["status"] == "succeeded"


def test_children_racing_to_finish_fire_the_reducer_exactly_once(engine: Engine, database_url: str) -> None:
    run_id = start(engine, [f"f{i}" for i in range(12)])
    children = take_all(engine, "parse")
    # Each child writes its output first (as a worker does); then every callback goes in at once.
    outputs = [(m, write_as(grant_of(engine, m), m["map"]["index"])) for m in children]
    barrier = threading.Barrier(len(outputs))
    results: list[str] = []
    errors: list[BaseException] = []

    def call(message: dict[str, Any], output: dict[str, Any]) -> None:
        try:
            barrier.wait()
            result = engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                                            output=output, error=None)
            results.append(result.outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=pair) for pair in outputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(results) == ["succeeded"] * 12
    loads = take_all(engine, "load")
    assert len(loads) == 1  # one dispatch of the reducer
    with engine.db.connection() as conn:
        attempts = conn.execute(
            """SELECT count(*) AS n FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE t.run_id = %s AND t.node_id = 'load'""", (run_id,)).fetchone()
    assert attempts is not None and attempts["n"] == 1
    assert books(engine) == []


def test_a_map_over_params_expands_as_the_run_starts(engine: Engine) -> None:
    pipeline = {"id": "fan", "params": {"regions": ["eu", "us"]},
                "nodes": [{"id": "each", "task": "sync", "map": {"over": "params.regions"}},
                          {"id": "after", "task": "report", "depends": ["each"]}]}
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "fan", params={"regions": ["eu", "us", "ap"]})
    children = sorted(take_all(engine, "each"), key=lambda m: m["map"]["index"])
    assert [m["map"]["item"] for m in children] == ["eu", "us", "ap"]  # the trigger's params win
    for message in children:
        succeed(engine, message, message["map"]["item"])
    (after,) = take_all(engine, "after")
    assert manifest_of(engine, after, "each")["succeeded"] == 3
    succeed(engine, after, None)
    assert run_row(engine, run.id)["status"] == "succeeded"


def test_cancel_cancels_every_item(engine: Engine) -> None:
    run_id = start(engine, ["a", "b", "c"])
    children = take_all(engine, "parse")
    succeed(engine, children[0], 1)
    engine.cancel_run(WORKSPACE, run_id, actor="test")
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT status, count(*)::int AS n FROM tasks WHERE run_id = %s GROUP BY status",
                            (run_id,)).fetchall()
    assert {r["status"]: r["n"] for r in rows} == {"succeeded": 2, "cancelled": 4}  # list, item 0 | 2 items, map, load
    # A late callback of a cancelled item is refused, and changes nothing.
    late = succeed(engine, children[1], 2)
    assert not late.accepted
    assert books(engine) == []


def test_a_lapsed_item_is_retried_alone(engine: Engine) -> None:
    from datetime import UTC, datetime, timedelta

    from .test_scheduling import set_clock

    pipeline = mapped()
    pipeline["nodes"][1]["retry"] = {"max_attempts": 2, "base_delay_s": 0}
    run_id = start(engine, ["a", "b"], pipeline)
    children = sorted(take_all(engine, "parse"), key=lambda m: m["map"]["index"])
    succeed(engine, children[0], "A")
    engine.record_heartbeat(children[1]["token"], progress=None, message=None)
    set_clock(engine, datetime.now(UTC) + timedelta(minutes=10))
    assert engine.tick().expired == 1
    (retry,) = take_all(engine, "parse")
    assert (retry["map"]["index"], retry["attempt"]) == (1, 2)
    assert not succeed(engine, children[1], "stale").accepted  # the lapsed attempt is fenced off
    succeed(engine, retry, "B")
    (load,) = take_all(engine, "load")
    succeed(engine, load, None)
    assert run_row(engine, run_id)["status"] == "succeeded"


def test_a_dead_lettered_item_retried_after_the_map_settled_settles_it_again(engine: Engine) -> None:
    run_id = start(engine, ["a", "b"], mapped(tolerated_failures=1))
    children = sorted(take_all(engine, "parse"), key=lambda m: m["map"]["index"])
    succeed(engine, children[0], "A")
    fail(engine, children[1])
    (load,) = take_all(engine, "load")
    # The reducer is out with a worker: the retry would change the manifest under it.
    with engine.db.connection() as conn:
        entry = conn.execute("SELECT id FROM dead_letters WHERE run_id = %s", (run_id,)).fetchone()
    assert entry is not None
    with pytest.raises(Conflict):
        engine.retry_dead_letter(WORKSPACE, entry["id"])
    succeed(engine, load, None)
    assert run_row(engine, run_id)["status"] == "succeeded"
    # Once it finished, the retry runs the item again and the map node settles again (a new
    # manifest); the reducer keeps its outcome.
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert books(engine) == []
    assert map_node(engine, run_id)["status"] == "pending"
    engine.tick()
    (again,) = take_all(engine, "parse")
    succeed(engine, again, "B")
    node = map_node(engine, run_id)
    assert (node["status"], node["attempt"], node["output"]["failed"]) == ("succeeded", 2, 0)
    assert run_row(engine, run_id)["status"] == "succeeded"
    assert books(engine) == []


def test_ten_thousand_items_expand_in_bulk_and_settle_once(engine: Engine, database_url: str) -> None:
    width = 10_000
    run_id = start(engine, [f"s3://bucket/part-{i:05d}.csv" for i in range(width)])
    transport(engine).sent.clear()  # the eager dispatch of the first batch; the rest is claimed below
    node = map_node(engine, run_id)
    assert (node["status"], node["map_width"], node["unfinished_deps"]) == ("pending", width, width)
    assert run_row(engine, run_id)["unfinished_tasks"] == width + 2  # the items, the map node, the reducer
    # Finish every item straight through the store (the callback path is the same transition;
    # a worker per item is what the benchmark measures).
    with connect(database_url) as conn:
        conn.execute("UPDATE tasks SET status = 'ready' WHERE map_parent_id = %s AND status = 'dispatched'",
                     (node["id"],))
        conn.commit()
    done = 0
    while done < width:
        with engine.db.transaction() as conn:
            claimed = task_store.claim_ready_tasks(conn, 1000, run_id=run_id)
        assert claimed, f"nothing claimable after {done} items"
        with engine.db.transaction() as conn:
            for task in claimed:
                finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                               output={"key": f"k/{task['id']}"})
        done += len(claimed)
    node = map_node(engine, run_id)
    assert node["status"] == "succeeded" and node["output"]["succeeded"] == width
    assert books(engine) == []


@pytest.mark.parametrize("round_", range(3))
def test_two_upstreams_finishing_at_once_expand_the_map_exactly_once(engine: Engine, round_: int) -> None:
    pipeline = {"id": "fan", "nodes": [
        {"id": "list", "task": "list-files"},
        {"id": "config", "task": "read-config"},
        {"id": "parse", "task": "parse-file", "depends": ["list", "config"], "map": {"over": "list.files"}},
        {"id": "load", "task": "load-all", "depends": ["parse"]},
    ]}
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "fan")
    (listing,) = take_all(engine, "list")
    (config,) = take_all(engine, "config")
    outputs = [(listing, write_as(grant_of(engine, listing), {"files": list(range(7))})),
               (config, write_as(grant_of(engine, config), {"threshold": 3}))]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def call(message: dict[str, Any], output: dict[str, Any]) -> None:
        barrier.wait()
        outcomes.append(engine.record_callback(uuid.UUID(message["task_id"]), message["token"],
                                               status="succeeded", output=output, error=None).outcome)

    threads = [threading.Thread(target=call, args=pair) for pair in outputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["succeeded", "succeeded"]
    node = map_node(engine, run.id)
    with engine.db.connection() as conn:
        children = conn.execute("SELECT map_index FROM tasks WHERE map_parent_id = %s ORDER BY map_index",
                                (node["id"],)).fetchall()
    assert [c["map_index"] for c in children] == list(range(7)) and node["map_width"] == 7
    # Every child gets both of the map node's inputs.
    sent = take_all(engine, "parse")
    assert len(sent) == 7 and all(set(m["inputs"]) == {"list", "config"} for m in sent)
    assert books(engine) == []


def test_a_bad_map_definition_is_refused_with_its_path(engine: Engine) -> None:
    from starlette.testclient import TestClient

    from orchestrator.api.app import create_app

    client = TestClient(create_app(engine.settings, engine=engine))
    headers = {"Authorization": "Bearer fence-admin-key"}
    bad = mapped(over="lst.files")
    answer = client.post("/api/pipelines", json=bad, headers=headers)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["error"]["details"]
    assert any(e["path"] == "nodes[1].map.over" and "not an upstream" in e["message"] for e in errors), errors
    nested = {"id": "nest", "nodes": [
        {"id": "a", "task": "t", "map": {"over": "params.xs"}},
        {"id": "b", "task": "t", "depends": ["a"], "map": {"over": "a.items"}}]}
    answer = client.post("/api/pipelines", json=nested, headers=headers)
    assert answer.status_code == 422 and "nested maps are not supported" in answer.text
    answer = client.post("/api/pipelines", json=mapped(tolerated_failures="150%"), headers=headers)
    assert answer.status_code == 422 and "more than 100%" in answer.text
    assert client.get("/api/pipelines/fan", headers=headers).status_code == 404  # nothing was saved


def test_an_item_that_finishes_under_max_concurrency_starts_the_next_at_once(engine: Engine) -> None:
    # No tick in this test: each callback that frees a place claims the next item itself.
    pipeline = mapped(max_concurrency=2)
    pipeline["nodes"][1]["retry"] = {"max_attempts": 2, "base_delay_s": 60}
    run_id = start(engine, ["a", "b", "c", "d", "e"], pipeline)
    first = take_all(engine, "parse")
    assert sorted(m["map"]["index"] for m in first) == [0, 1]
    sent: list[int] = [m["map"]["index"] for m in first]
    queue = list(first)
    while queue:
        message = queue.pop(0)
        if message["map"]["index"] == 2:
            # a failed attempt with a retry frees its place too: a sibling starts
            engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="failed", output=None,
                                   error={"code": "flaky", "message": "again", "retryable": True})
        else:
            succeed(engine, message, message["map"]["index"])
        more = take_all(engine, "parse")
        assert len(more) <= 1
        sent += [m["map"]["index"] for m in more]
        queue += more
        with engine.db.connection() as conn:
            active = conn.execute(
                "SELECT count(*) AS n FROM tasks WHERE map_parent_id IS NOT NULL AND run_id = %s "
                "AND status IN ('dispatched', 'running')", (run_id,)).fetchone()
        assert active is not None and active["n"] <= 2
    assert sorted(sent) == [0, 1, 2, 3, 4]  # item 2 waits for its retry delay: the tick sends it
    assert map_node(engine, run_id)["status"] == "pending"
    assert books(engine) == []


def test_a_map_over_a_param_does_not_hand_each_item_the_whole_list(engine: Engine) -> None:
    pipeline = {"id": "fan", "params": {"mode": "fast"},
                "nodes": [{"id": "each", "task": "sync", "map": {"over": "params.regions"}}]}
    engine.create_pipeline(WORKSPACE, pipeline)
    engine.trigger_run(WORKSPACE, "fan", params={"regions": [f"r{i}" for i in range(50)]})
    children = take_all(engine, "each")
    assert len(children) == 50
    assert all(m["params"] == {"mode": "fast"} for m in children)  # the list itself is each one's item


def test_read_urls_serve_only_the_items_a_reducers_token_grants(engine: Engine) -> None:
    from starlette.testclient import TestClient

    from orchestrator.api.app import create_app

    run_id = start(engine, ["a", "b"])
    for message in take_all(engine, "parse"):
        succeed(engine, message, message["map"]["item"])
    (load,) = take_all(engine, "load")
    keys = [item["key"] for item in manifest_of(engine, load)["items"]]
    client = TestClient(create_app(engine.settings, engine=engine))

    answer = client.post("/api/worker/read-urls", json={"token": load["token"], "keys": keys})
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["urls"]) == set(keys)
    # Another node's output of the same run, and another run's item, are not under the grant.
    outside = [keys[0].replace("/nodes/parse/", "/nodes/list/"), keys[0].replace(str(run_id), str(uuid.uuid4()))]
    for key in outside:
        answer = client.post("/api/worker/read-urls", json={"token": load["token"], "keys": [key]})
        assert answer.status_code == 403, answer.text
        assert "read prefix" in answer.json()["error"]["message"] or "not" in answer.json()["error"]["message"]
    # A forged token, a traversal and too many keys are refused, never a 500.
    assert client.post("/api/worker/read-urls", json={"token": "x.y.z.w.v", "keys": keys}).status_code == 401
    sneaky = keys[0].rsplit("/items/", 1)[0] + "/items/../../list/attempts/1/output.json"
    assert client.post("/api/worker/read-urls", json={"token": load["token"], "keys": [sneaky]}).status_code in (
        403, 422)
    assert client.post("/api/worker/read-urls",
                       json={"token": load["token"], "keys": keys * 300}).status_code == 422
    succeed(engine, load, None)
    assert run_row(engine, run_id)["status"] == "succeeded"


@pytest.mark.parametrize("round_", range(4))
def test_two_map_nodes_settling_into_one_reducer_at_once_do_not_deadlock(
    engine: Engine, database_url: str, round_: int
) -> None:
    # Each transaction updates its map node twice (counted down, then settled); without replay:
    # a deadlock here is an error, not a retry.
    import psycopg

    pipeline = {"id": "two", "params": {"xs": [1], "ys": [2]}, "nodes": [
        {"id": "mx", "task": "t", "map": {"over": "params.xs"}},
        {"id": "my", "task": "t", "map": {"over": "params.ys"}},
        {"id": "join", "task": "t", "depends": ["mx", "my"]}]}
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "two", dispatch_now=False)
    with engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 10)
    assert len(claimed) == 2
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def finish_one(task: Any) -> None:
        try:
            with connect(database_url) as conn:
                barrier.wait()
                finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                               output={"key": f"k/{task['id']}"})
                conn.commit()
        except psycopg.errors.DeadlockDetected as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finish_one, args=(t,)) for t in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.db.connection() as conn:
        join = conn.execute("SELECT status FROM tasks WHERE run_id = %s AND node_id = 'join'", (run.id,)).fetchone()
    assert join is not None and join["status"] == "ready"
    assert books(engine) == []


def test_retrying_an_upstream_of_a_map_node_in_progress_is_refused_and_a_settled_one_keeps_its_outcome(
    engine: Engine
) -> None:
    pipeline = {"id": "fan", "nodes": [
        {"id": "list", "task": "list-files"},
        {"id": "cfg", "task": "read-config", "on_failure": "continue"},
        {"id": "parse", "task": "parse-file", "depends": ["list", "cfg"], "trigger_rule": "all_done",
         "map": {"over": "list.files"}},
        {"id": "load", "task": "load-all", "depends": ["parse"]},
    ]}
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "fan")
    (cfg,) = take_all(engine, "cfg")
    fail(engine, cfg)  # dead, tolerated: parse's rule (all_done) still lets it run
    (listing,) = take_all(engine, "list")
    succeed(engine, listing, {"files": ["a", "b"]})
    children = take_all(engine, "parse")
    assert len(children) == 2
    with engine.db.connection() as conn:
        entry = conn.execute("SELECT id FROM dead_letters WHERE run_id = %s", (run.id,)).fetchone()
    assert entry is not None
    # The map node was expanded on cfg's failure and its items are out: taking cfg back under
    # them is refused, like any task that started on it.
    with pytest.raises(Conflict) as refused:
        engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert "parse" in str(refused.value)
    for message in children:
        succeed(engine, message, 1)
    (load,) = take_all(engine, "load")
    succeed(engine, load, None)
    # Settled, it keeps its outcome: cfg runs again, parse and load are not reopened.
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert map_node(engine, run.id)["status"] == "succeeded"
    engine.tick()
    (again,) = take_all(engine, "cfg")
    succeed(engine, again, {})
    assert take_all(engine, "parse") == [] and take_all(engine, "load") == []
    assert run_row(engine, run.id)["status"] == "succeeded"
    assert books(engine) == []


def _claim_all(engine: Engine) -> dict[str, Any]:
    with engine.db.transaction() as conn:
        return {str(r["id"]): r for r in task_store.claim_ready_tasks(conn, 100)}


def _statuses(engine: Engine, run_id: uuid.UUID) -> dict[str, str]:
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT node_id, map_index, status FROM tasks WHERE run_id = %s", (run_id,)).fetchall()
    return {(r["node_id"] if r["map_index"] < 0 else f"{r['node_id']}[{r['map_index']}]"): r["status"] for r in rows}


def _fail_for_good(engine: Engine, task: Any) -> None:
    def work(conn: Any) -> None:
        finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=False,
                       error={"code": "boom", "message": "boom"}, retryable=False)
    engine.db.run_in_transaction(work)


def test_a_stopping_failure_skips_a_map_node_instead_of_expanding_it_and_a_redrive_waits_for_its_upstream(
    engine: Engine
) -> None:
    # all_success counts skips, not failures: before, the map expanded on the stopping failure,
    # the stop skipped its items, and a redrive then ran them before the upstream re-ran.
    engine.create_pipeline(WORKSPACE, {"id": "stop", "params": {"xs": ["a", "b"]}, "nodes": [
        {"id": "n0", "task": "t"},
        {"id": "n1", "task": "t", "depends": ["n0"], "map": {"over": "params.xs"}}]})
    run = engine.trigger_run(WORKSPACE, "stop", dispatch_now=False)
    (n0,) = _claim_all(engine).values()
    _fail_for_good(engine, n0)
    assert _statuses(engine, run.id) == {"n0": "failed", "n1": "skipped"}  # no items were made
    assert map_node(engine, run.id, "n1")["map_width"] is None
    engine.redrive_run(WORKSPACE, run.id)
    assert [m["node"] for m in transport(engine).sent] == ["n0"]  # the map waits for its upstream
    assert _claim_all(engine) == {}
    assert _statuses(engine, run.id) == {"n0": "dispatched", "n1": "pending"}
    assert books(engine) == []


def test_the_items_of_a_mapped_failure_handler_run_when_the_run_stops(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "handler", "params": {"xs": ["a", "b"]}, "nodes": [
        {"id": "n0", "task": "t"},
        {"id": "alert", "task": "t", "depends": ["n0"], "trigger_rule": "one_failed",
         "map": {"over": "params.xs"}}]})
    run = engine.trigger_run(WORKSPACE, "handler", dispatch_now=False)
    (n0,) = _claim_all(engine).values()
    _fail_for_good(engine, n0)
    assert _statuses(engine, run.id) == {"n0": "failed", "alert": "pending", "alert[0]": "ready", "alert[1]": "ready"}
    for item in _claim_all(engine).values():
        with engine.db.transaction() as conn:
            finish_attempt(conn, item["id"], item["attempt"], item["claim_token"], succeeded=True,
                           output={"key": "k"})
    assert map_node(engine, run.id, "alert")["status"] == "succeeded"
    assert run_row(engine, run.id)["status"] == "failed"
    # A redrive would re-run n0 under items that ran on its failure: refused, saying why.
    engine.create_pipeline(WORKSPACE, {"id": "handler2", "params": {"xs": ["a"]}, "nodes": [
        {"id": "n0", "task": "t"},
        {"id": "alert", "task": "t", "depends": ["n0"], "trigger_rule": "one_failed",
         "map": {"over": "params.xs"}}]})
    second = engine.trigger_run(WORKSPACE, "handler2", dispatch_now=False)
    (n0,) = _claim_all(engine).values()
    _fail_for_good(engine, n0)
    (item,) = _claim_all(engine).values()
    _fail_for_good(engine, item)
    assert map_node(engine, second.id, "alert")["status"] == "failed"
    with pytest.raises(Conflict) as refused:
        engine.redrive_run(WORKSPACE, second.id)
    assert "ran its items on the outcome of 'n0'" in str(refused.value)
    assert books(engine) == []
