"""Races on separate connections behind a barrier: the database, not the test, keeps them apart."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import psycopg

from orchestrator.db.connection import Connection, Database, Row, connect
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE


def _run_threads(count: int, target: Any) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    return errors


def test_eight_ticks_racing_claim_each_of_1000_tasks_exactly_once(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": [{"id": "x", "task": "echo"}]})
    versions = [f"p{i:04d}" for i in range(1000)]
    run = engine.trigger_run(WORKSPACE, "wide", versions=versions, dispatch_now=False)

    barrier = threading.Barrier(8)
    claimed: list[list[Row]] = [[] for _ in range(8)]

    def tick(index: int) -> None:
        with connect(engine.settings.database_url) as conn:
            barrier.wait()
            while True:
                with conn.transaction():
                    batch = task_store.claim_ready_tasks(conn, 25)
                if not batch:
                    return
                claimed[index].extend(batch)

    assert _run_threads(8, tick) == []
    ids = [row["id"] for batch in claimed for row in batch]
    assert len(ids) == 1000
    assert len(set(ids)) == 1000  # nothing dispatched twice
    assert sum(1 for batch in claimed if batch) >= 2  # the ticks really shared the work
    with psycopg.connect(engine.settings.database_url) as conn:
        by_status = dict(conn.execute(
            "SELECT status, count(*) FROM tasks WHERE run_id = %s GROUP BY status", (run.id,)).fetchall())
        attempts = conn.execute(
            "SELECT count(*), count(DISTINCT task_id), max(attempt) FROM task_attempts").fetchone()
    assert by_status == {"dispatched": 1000}  # nothing lost
    assert attempts == (1000, 1000, 1)


def test_200_diamond_joins_with_parents_finishing_at_once_fire_exactly_once(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "diamond", "nodes": [
        {"id": "a", "task": "echo"},
        {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]},
        {"id": "d", "task": "echo", "depends": ["b", "c"]},
    ]})
    versions = [f"p{i:03d}" for i in range(200)]
    run = engine.trigger_run(WORKSPACE, "diamond", versions=versions, dispatch_now=False)

    def claim_all() -> list[Row]:
        with engine.db.transaction() as conn:
            return task_store.claim_ready_tasks(conn, 1000)

    def finish(db: Database, task: Row) -> AttemptResult:
        def work(conn: Connection) -> AttemptResult:
            return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                                  output={"key": f"out/{task['id']}"})
        return db.run_in_transaction(work)

    for a in claim_all():
        assert finish(engine.db, a).accepted
    parents = claim_all()
    assert len(parents) == 400
    by_version: dict[str, dict[str, Row]] = {}
    for row in parents:
        by_version.setdefault(row["version"], {})[row["node_id"]] = row

    barrier = threading.Barrier(2)
    results: list[list[AttemptResult]] = [[], []]

    def parent_finisher(index: int) -> None:
        node = "bc"[index]
        db = Database(engine.settings.database_url, max_size=1)  # its own connection
        try:
            for version in versions:
                barrier.wait()  # both parents of this join finish at the same moment
                results[index].append(finish(db, by_version[version][node]))
        finally:
            db.close()

    assert _run_threads(2, parent_finisher) == []
    assert all(r.accepted for rs in results for r in rs)
    # exactly one of the two parents made each join ready
    assert sum(r.newly_ready for rs in results for r in rs) == 200
    joins = claim_all()
    assert sorted(j["version"] for j in joins) == versions
    assert Counter(j["node_id"] for j in joins) == {"d": 200}
    assert claim_all() == []
    for j in joins:
        finish(engine.db, j)
    run_row, tasks = engine.get_run(WORKSPACE, run.id)
    assert run_row["status"] == "succeeded" and run_row["unfinished_tasks"] == 0
    assert Counter(t["status"] for t in tasks) == {"succeeded": 800}


def test_racing_finishers_of_the_last_tasks_finish_the_run_once(engine: Engine) -> None:
    """Many leaves finishing at once: the run's counter reaches zero in exactly one transaction."""
    engine.create_pipeline(WORKSPACE, {"id": "fan", "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(16)]})
    for _ in range(20):
        run = engine.trigger_run(WORKSPACE, "fan", dispatch_now=False)
        with engine.db.transaction() as conn:
            tasks = task_store.claim_ready_tasks(conn, 100, run_id=run.id)
        barrier = threading.Barrier(len(tasks))
        outcomes: list[str | None] = []

        def finisher(index: int, tasks: list[Row] = tasks, barrier: threading.Barrier = barrier,
                     outcomes: list[str | None] = outcomes) -> None:
            task = tasks[index]
            with connect(engine.settings.database_url) as conn:
                barrier.wait()
                with conn.transaction():
                    result = finish_attempt(conn, task["id"], task["attempt"], task["claim_token"],
                                            succeeded=True, output={"key": str(uuid.uuid4())})
            outcomes.append(result.run_status)

        assert _run_threads(len(tasks), finisher) == []
        assert Counter(outcomes)["succeeded"] == 1  # the last one, and only it, saw the run finish
        run_row, _ = engine.get_run(WORKSPACE, run.id)
        assert run_row["status"] == "succeeded"


def test_max_active_tasks_holds_under_eight_racing_ticks(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "limited", "concurrency": {"max_active_tasks": 5},
                                       "nodes": [{"id": "x", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "free", "nodes": [{"id": "x", "task": "echo"}]})
    engine.trigger_run(WORKSPACE, "limited", versions=[f"v{i}" for i in range(100)], dispatch_now=False)
    engine.trigger_run(WORKSPACE, "free", versions=[f"v{i}" for i in range(40)], dispatch_now=False)

    barrier = threading.Barrier(8)
    claimed: list[Row] = []
    lock = threading.Lock()

    def tick(index: int) -> None:
        with connect(engine.settings.database_url) as conn:
            barrier.wait()
            for _ in range(10):
                with conn.transaction():
                    batch = task_store.claim_ready_tasks(conn, 7)
                with lock:
                    claimed.extend(batch)

    assert _run_threads(8, tick) == []
    per_pipeline = Counter(row["pipeline_id"] for row in claimed)
    assert per_pipeline == {"limited": 5, "free": 40}  # never over the limit, the rest unhindered
    assert len({row["id"] for row in claimed}) == len(claimed)

    # finishing two makes room for exactly two more
    for row in [r for r in claimed if r["pipeline_id"] == "limited"][:2]:
        def work(conn: Connection, row: Row = row) -> AttemptResult:
            return finish_attempt(conn, row["id"], row["attempt"], row["claim_token"], succeeded=True,
                                  output={"key": "k"})
        engine.db.run_in_transaction(work)
    with engine.db.transaction() as conn:
        more = task_store.claim_ready_tasks(conn, 100)
    assert Counter(r["pipeline_id"] for r in more) == {"limited": 2}


def test_workspace_max_active_tasks_spans_its_pipelines(engine: Engine) -> None:
    from orchestrator.engine.keys import set_workspace_task_limit

    set_workspace_task_limit(engine.db, WORKSPACE, 3)
    for pid in ("a", "b"):
        engine.create_pipeline(WORKSPACE, {"id": pid, "nodes": [{"id": "x", "task": "echo"}]})
        engine.trigger_run(WORKSPACE, pid, versions=["1", "2", "3"], dispatch_now=False)
    engine.create_api_key("other", "admin")
    engine.create_pipeline("other", {"id": "a", "nodes": [{"id": "x", "task": "echo"}]})
    engine.trigger_run("other", "a", versions=["1", "2", "3"], dispatch_now=False)
    with engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 100)
    assert Counter(r["workspace_id"] for r in claimed) == {WORKSPACE: 3, "other": 3}
