"""A map's `max_concurrency` (issue 19): the claim never has more of a map node's children out
with workers (dispatched or running) than its max_concurrency, whoever claims (the tick, a run's
eager claim, racing claimers on their own connections), together with the pipeline's
max_active_tasks; and a map node itself is never claimed (migration 0017).

Maps over params, so no object store is involved: the tests claim with the store function and
finish with finish_attempt directly, as a worker's callback does. The invariant checker runs
after every test (tests/db_fixtures.py; its map_concurrency_limit check included).

The racing test replays a step that lost a deadlock among finishers only (as
Database.run_in_transaction does for every callback): two maps feeding one reducer can deadlock
when their last children finish at once (the map node's second update in one transaction takes a
KEY SHARE lock on its run row through the foreign key, which the run counter's FOR UPDATE waits
for). A claim that loses a deadlock fails the test."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg
import pytest

from orchestrator.db.connection import Connection, Row, connect
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store
from tests.polling import poll

from .conftest import WORKSPACE
from .test_repairs_keep_the_books import books, claim, finish, run_status, waiting_backends


def fan_out(pipeline_id: str, items: int, max_concurrency: int | None = 5, *,
            max_active_tasks: int | None = None, second_map: int | None = None) -> dict[str, Any]:
    """A map over params.items (and, with `second_map`, another map over them with that
    max_concurrency), then a reducer after them."""
    each: dict[str, Any] = {"over": "params.items"}
    if max_concurrency is not None:
        each["max_concurrency"] = max_concurrency
    nodes: list[dict[str, Any]] = [{"id": "each", "task": "t", "map": each}]
    if second_map is not None:
        nodes.append({"id": "other", "task": "t", "map": {"over": "params.items", "max_concurrency": second_map}})
    nodes.append({"id": "after", "task": "t", "depends": [n["id"] for n in nodes]})
    pipeline: dict[str, Any] = {"id": pipeline_id, "params": {"items": list(range(items))}, "nodes": nodes}
    if max_active_tasks is not None:
        pipeline["concurrency"] = {"max_active_tasks": max_active_tasks}
    return pipeline


def claim_rows(engine: Engine, run_id: Any = None, limit: int = 100) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit, run_id=run_id)


def active_children(conn: Connection) -> dict[uuid.UUID, int]:
    """Children out with workers, per map node (one snapshot)."""
    rows = conn.execute(
        """SELECT map_parent_id, count(*)::int AS n FROM tasks
           WHERE map_parent_id IS NOT NULL AND status IN ('dispatched', 'running') GROUP BY map_parent_id"""
    ).fetchall()
    return {r["map_parent_id"]: r["n"] for r in rows}


def active_in(engine: Engine, run_id: Any) -> int:
    with engine.db.connection() as conn:
        row = conn.execute("""SELECT count(*)::int AS n FROM tasks WHERE run_id = %s AND map_parent_id IS NOT NULL
                              AND status IN ('dispatched', 'running')""", (run_id,)).fetchone()
    assert row is not None
    return int(row["n"])


def node_counts(engine: Engine, run_id: Any, node: str) -> Counter[str]:
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT status FROM tasks WHERE run_id = %s AND node_id = %s AND kind = 'task'",
                            (run_id, node)).fetchall()
    return Counter(str(r["status"]) for r in rows)


def test_two_hundred_items_at_max_concurrency_five(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, fan_out("m", 200, 5))
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)

    first = claim_rows(engine)  # the tick's claim, a batch of 100
    # Five, the first five items (children are claimed in item order).
    assert sorted(r["node_id"] for r in first) == ["each"] * 5
    with engine.db.connection() as conn:
        indexes = conn.execute("SELECT map_index FROM tasks WHERE id = ANY(%s) ORDER BY map_index",
                               ([r["id"] for r in first],)).fetchall()
    assert [r["map_index"] for r in indexes] == [0, 1, 2, 3, 4]
    assert claim_rows(engine) == [] and claim_rows(engine, run.id) == []  # full, for every claimer
    assert active_in(engine, run.id) == 5

    out = list(first)
    done = 0
    turn = 0
    while out:
        task = out.pop(0)
        finish(engine, task)
        done += 1
        turn += 1
        # Finishing one frees one place: exactly one more is claimed (alternately by the
        # run's eager claim and by the tick), never more, whatever the batch size.
        if done == 200:
            break
        more = claim_rows(engine, run.id if turn % 2 else None, limit=50)
        expected = 1 if done + len(out) < 200 else 0
        assert [r["node_id"] for r in more] == ["each"] * expected
        out.extend(more)
        assert claim_rows(engine) == [] and claim_rows(engine, run.id) == []
        assert active_in(engine, run.id) == min(5, 200 - done)
    assert out == [] and node_counts(engine, run.id, "each") == Counter({"succeeded": 200})

    # The last item's finish made the reducer ready: claimed once.
    reducer = claim_rows(engine, run.id)
    assert [r["node_id"] for r in reducer] == ["after"]
    assert claim_rows(engine) == [] and claim_rows(engine, run.id) == []
    finish(engine, reducer[0])
    assert run_status(engine, run.id) == "succeeded"
    assert books(engine) == []


def test_the_eager_claim_in_a_childs_callback_fills_the_place_it_freed(engine: Engine) -> None:
    """The callback's own transaction holds the map node (the child's successor) when it claims
    for its run: its claim counts the place its own finish freed and takes exactly one."""
    engine.create_pipeline(WORKSPACE, fan_out("m", 20, 3))
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)
    out = claim_rows(engine)
    assert len(out) == 3
    for _ in range(17):
        task = out.pop(0)

        def work(conn: Connection, task: Row = task) -> list[Row]:
            result = finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                                    output={"key": "k/each"})
            assert result.accepted
            return task_store.claim_ready_tasks(conn, 10, run_id=run.id)

        more = engine.db.run_in_transaction(work)
        assert len(more) == 1
        out.extend(more)
        assert active_in(engine, run.id) == 3
    while out:
        finish(engine, out.pop(0))
    (reducer,) = claim_rows(engine, run.id)
    finish(engine, reducer)
    assert run_status(engine, run.id) == "succeeded"


def test_a_claim_does_not_wait_for_a_map_node_a_callback_holds(engine: Engine, database_url: str) -> None:
    """The lock order of migration 0017: a callback holds its task and its map node, and its eager
    claim then waits for the pipeline row; a tick's claim holds the pipeline row. Were the tick to
    wait for the map node, the two would deadlock; it skips the map node instead (its children
    wait for the next claim) and the callback's own claim fills the place it freed."""
    engine.create_pipeline(WORKSPACE, fan_out("m", 8, 2, max_active_tasks=10))
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)
    out = claim_rows(engine)
    assert len(out) == 2

    holder = connect(database_url, autocommit=False)
    try:
        accepted = finish_attempt(holder, out[0]["id"], out[0]["attempt"], out[0]["claim_token"], succeeded=True,
                                  output={"key": "k/each"})
        assert accepted.accepted  # the callback holds the child, the map node and the run row
        tick_claim: list[list[Row]] = []
        ticker = threading.Thread(target=lambda: tick_claim.append(claim_rows(engine)))
        ticker.start()
        poll(lambda: bool(tick_claim) or waiting_backends(database_url) > 0, "the claim neither finished nor waited")
        ticker.join(20)
        assert tick_claim == [[]], "the tick's claim waited for (or took children of) a map node it did not lock"
        # The callback's eager claim, in its own transaction, after the tick (which held the
        # pipeline row) is done: one child, in the place the finish freed.
        eager = task_store.claim_ready_tasks(holder, 10, run_id=run.id)
        assert [r["node_id"] for r in eager] == ["each"]
        holder.commit()
    finally:
        holder.rollback()
        holder.close()
    assert active_in(engine, run.id) == 2
    out = [out[1], *eager]
    while out:
        finish(engine, out.pop(0))
        out.extend(claim_rows(engine, run.id))
        assert active_in(engine, run.id) <= 2
    assert run_status(engine, run.id) == "succeeded"
    assert books(engine) == []


@pytest.mark.parametrize(("max_active_tasks", "second_map"), [(None, None), (3, None), (4, 2)],
                         ids=["map-limit", "pipeline-limit-below-it", "pipeline-and-two-maps"])
def test_racing_claimers_never_exceed_max_concurrency_nor_lose_a_task(
    engine: Engine, database_url: str, max_active_tasks: int | None, second_map: int | None,
) -> None:
    items, limit = 60, 5
    engine.create_pipeline(WORKSPACE, fan_out("race", items, limit, max_active_tasks=max_active_tasks,
                                              second_map=second_map))
    runs = [engine.trigger_run(WORKSPACE, "race", dispatch_now=False).id for _ in range(2)]
    with engine.db.connection() as conn:
        limits = {r["id"]: int(r["map_max_concurrency"]) for r in conn.execute(
            "SELECT id, map_max_concurrency FROM tasks WHERE kind = 'map' AND run_id = ANY(%s)", (runs,)).fetchall()}

    threads = 6
    barrier = threading.Barrier(threads)
    lock = threading.Lock()
    claimed: list[tuple[uuid.UUID, str, int, uuid.UUID]] = []  # (task, node, attempt, claim token)
    over: list[str] = []
    errors: list[BaseException] = []
    replayed: list[str] = []
    done = threading.Event()

    def check(conn: Connection) -> None:
        for parent, n in active_children(conn).items():
            if n > limits[parent]:
                over.append(f"map node {parent}: {n} children active, max_concurrency {limits[parent]}")
        if max_active_tasks is not None:
            row = conn.execute("""SELECT count(*)::int AS n FROM tasks WHERE pipeline_id = 'race'
                                  AND status IN ('dispatched', 'running')""").fetchone()
            assert row is not None
            if row["n"] > max_active_tasks:
                over.append(f"pipeline: {row['n']} tasks active, max_active_tasks {max_active_tasks}")

    def in_transaction(conn: Connection, step: Callable[[], list[Row]]) -> list[Row]:
        """One step, replayed whole after a deadlock among finishers, as Database.run_in_transaction
        does. A claim that loses a deadlock fails the test: a claim never waits for a task row, so
        it cannot close a cycle (with migration 0017's map node taken FOR UPDATE without SKIP
        LOCKED, the claims here were the victims of such cycles within a few runs)."""
        for _ in range(20):
            try:
                with conn.transaction():
                    return step()
            except psycopg.errors.DeadlockDetected as exc:
                context = str(exc.diag.context or "")
                if "tw_claim_ready_tasks" in context:
                    raise AssertionError(f"a claim took part in a deadlock: {exc}") from exc
                with lock:
                    replayed.append(context)
        raise AssertionError("a step deadlocked 20 times")

    def racer(index: int) -> None:
        rng = random.Random(index)
        conn = connect(database_url)  # its own connection, autocommit: one transaction per step
        observer = connect(database_url)  # the checks, on another connection
        mine: list[Row] = []

        def claim_for(run_id: Any) -> list[Row]:
            return task_store.claim_ready_tasks(conn, rng.randint(1, 8), run_id=run_id)

        def finish_one(task: Row) -> list[Row]:
            result = finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                                    output={"key": "k"})
            assert result.accepted
            return []

        def callback(task: Row) -> list[Row]:
            return finish_one(task) + claim_for(task["run_id"])

        try:
            barrier.wait()
            for _ in range(5000):
                if done.is_set():
                    break
                if mine and rng.random() < 0.5:
                    # a callback: the finish and its run's eager claim in one transaction
                    task = mine.pop(rng.randrange(len(mine)))
                    rows = in_transaction(conn, partial(callback, task))
                    eager = True
                else:
                    run_id = rng.choice([None, *runs])  # the tick, or a run's claim
                    rows = in_transaction(conn, partial(claim_for, run_id))
                    eager = False
                with lock:
                    claimed.extend((r["id"], str(r["node_id"]), int(r["attempt"]), r["claim_token"]) for r in rows)
                mine.extend(rows)
                check(observer)
                if mine and not eager and rng.random() < 0.7:
                    task = mine.pop(rng.randrange(len(mine)))
                    in_transaction(conn, partial(finish_one, task))
                    check(observer)
                row = observer.execute("SELECT count(*)::int AS n FROM runs WHERE id = ANY(%s) AND status = 'succeeded'",
                                       (runs,)).fetchone()
                if row is not None and row["n"] == len(runs):
                    done.set()
            while mine:  # whatever this racer still holds is finished, never lost
                task = mine.pop()
                in_transaction(conn, partial(finish_one, task))
        except BaseException as exc:  # reported below
            errors.append(exc)
            done.set()
        finally:
            conn.close()
            observer.close()

    workers = [threading.Thread(target=racer, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(300)
    assert not any(t.is_alive() for t in workers), "a racing claimer hung"
    assert errors == [], (errors, replayed)  # no claim lost a deadlock, no finish was refused
    assert over == []
    # Nothing claimed twice: one attempt per task, unique claim tokens; every item ran once.
    assert len({c[3] for c in claimed}) == len(claimed)
    assert Counter(c[0] for c in claimed).most_common(1)[0][1] == 1
    maps = 1 if second_map is None else 2
    nodes = Counter(c[1] for c in claimed)
    assert nodes["each"] == items * len(runs) and nodes["after"] == len(runs)
    assert nodes["other"] == (items * len(runs) if second_map else 0)
    assert len(claimed) == (items * maps + 1) * len(runs)
    for run_id in runs:
        assert run_status(engine, run_id) == "succeeded"
        assert node_counts(engine, run_id, "each") == Counter({"succeeded": items})
        assert node_counts(engine, run_id, "after") == Counter({"succeeded": 1})
    assert books(engine) == []


@pytest.mark.books_unchecked  # map nodes are forced to 'ready' by SQL, which the books forbid
def test_a_map_node_is_never_claimed(engine: Engine) -> None:
    pipeline = {"id": "m", "params": {"items": [1, 2, 3]}, "nodes": [
        {"id": "limited", "task": "t", "map": {"over": "params.items", "max_concurrency": 2}},
        {"id": "free", "task": "t", "map": {"over": "params.items"}},
        {"id": "first", "task": "t"},
        {"id": "later", "task": "t", "depends": ["first"], "map": {"over": "params.items"}},
    ]}
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)
    with engine.db.connection() as conn:
        # expanded (limited, free) and not yet expanded (later) map nodes, as a faulty path would leave them
        forced = conn.execute("UPDATE tasks SET status = 'ready' WHERE kind = 'map' AND run_id = %s RETURNING id",
                              (run.id,)).fetchall()
    assert len(forced) == 3
    taken = claim_rows(engine, run.id) + claim_rows(engine) + claim_rows(engine, run.id)
    assert {r["kind"] for r in taken} == {"task"}
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT status, count(*)::int AS n FROM tasks WHERE kind = 'map' GROUP BY status").fetchall()
    assert {r["status"]: r["n"] for r in rows} == {"ready": 3}
    # The free map's children and the plain task were claimed; the limited map's children are
    # left (their map node is not a pending, expanded map node the claim can lock and count).
    assert Counter(str(r["node_id"]) for r in taken) == Counter({"free": 3, "first": 1})


def test_a_full_map_does_not_hold_back_its_runs_other_work(engine: Engine) -> None:
    """The children of a full map are not candidates: the run's other ready tasks, and other
    runs, are claimed in the same batch as ever."""
    pipeline = fan_out("m", 500, 2)
    pipeline["nodes"].insert(0, {"id": "side", "task": "t"})
    engine.create_pipeline(WORKSPACE, pipeline)
    engine.create_pipeline(WORKSPACE, {"id": "plain", "nodes": [{"id": f"n{i}", "task": "t"} for i in range(5)]})
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)
    other = engine.trigger_run(WORKSPACE, "plain", dispatch_now=False)
    batch = claim_rows(engine, limit=10)
    assert Counter((r["run_id"], str(r["node_id"])) for r in batch) == Counter(
        {(run.id, "each"): 2, (run.id, "side"): 1, (other.id, "n0"): 1, (other.id, "n1"): 1, (other.id, "n2"): 1,
         (other.id, "n3"): 1, (other.id, "n4"): 1})
    assert claim(engine) == {}
    assert active_in(engine, run.id) == 2
    for task in batch:
        finish(engine, task)


def plan(engine: Engine, query: str, *args: Any) -> str:
    with engine.db.connection() as conn:
        rows = conn.execute(f"EXPLAIN (FORMAT JSON) {query}", args).fetchall()  # type: ignore[call-overload]
    return json.dumps(rows[0])


@pytest.mark.books_unchecked  # tasks are marked succeeded by SQL to shape the table, not by the engine
def test_the_claims_map_lookups_are_index_backed(engine: Engine) -> None:
    """What migration 0017 adds to every claim reads a partial index: the limited map nodes (an
    empty index when no map has a limit), a map node's room and its first ready children, and the
    run heads, which no longer walk past a map's waiting children."""
    engine.create_pipeline(WORKSPACE, {"id": "bulk", "nodes": [{"id": f"n{i}", "task": "t"} for i in range(20)]})
    engine.trigger_run(WORKSPACE, "bulk", versions=[f"v{i}" for i in range(500)], dispatch_now=False)
    pipeline = fan_out("m", 3000, 5)
    pipeline["nodes"].insert(0, {"id": "side", "task": "t"})
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, "m", dispatch_now=False)
    with engine.db.connection() as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE pipeline_id = 'bulk' AND version <> 'v0'")
        conn.execute("ANALYZE tasks")
        node = conn.execute("SELECT id FROM tasks WHERE kind = 'map'").fetchone()
    assert node is not None

    lock = plan(engine, """SELECT m.id FROM tasks m
                           WHERE m.kind = 'map' AND m.status = 'pending' AND m.map_width IS NOT NULL
                             AND m.map_max_concurrency IS NOT NULL
                             AND EXISTS (SELECT 1 FROM tasks c WHERE c.map_parent_id = m.id AND c.status = 'ready'
                                         AND c.map_parent_id IS NOT NULL AND c.map_max_concurrency IS NOT NULL)
                           ORDER BY m.id FOR UPDATE OF m SKIP LOCKED""")
    assert "tasks_map_limited_idx" in lock and "Seq Scan" not in lock
    room = plan(engine, """SELECT count(*) FROM tasks a WHERE a.map_parent_id = %s
                           AND a.status IN ('dispatched', 'running') AND a.map_parent_id IS NOT NULL
                           AND a.map_max_concurrency IS NOT NULL""", node["id"])
    assert "tasks_map_active_children_idx" in room and "Seq Scan" not in room
    children = plan(engine, """SELECT c.id FROM tasks c WHERE c.map_parent_id = %s AND c.status = 'ready'
                               AND c.map_parent_id IS NOT NULL AND c.map_max_concurrency IS NOT NULL
                               AND c.available_at <= tw_now() ORDER BY c.available_at, c.map_index LIMIT 5""",
                    node["id"])
    assert "tasks_map_ready_children_idx" in children and "Seq Scan" not in children
    heads = plan(engine, """SELECT t.id FROM tasks t WHERE t.status = 'ready' AND t.kind <> 'map'
                            AND t.map_max_concurrency IS NULL AND t.run_id = %s AND t.available_at <= tw_now()
                            ORDER BY t.priority DESC, t.available_at LIMIT 200""", run.id)
    # The ordered index (its predicate leaves the waiting children out) or, where the planner
    # prefers it, the run's ready set; never a scan of the table.
    assert ("tasks_ready_run_order_idx" in heads or "tasks_ready_run_idx" in heads) and "Seq Scan" not in heads
    # The run's side task is its head, not behind 3,000 waiting children.
    assert [r["node_id"] for r in claim_rows(engine, run.id, limit=3)] == ["side", "each", "each"]
