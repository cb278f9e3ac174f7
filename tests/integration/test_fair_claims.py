"""Fair claims: within a priority, no run, pipeline or workspace starves another (round-robin
across workspaces, then across runs), whatever backlog one of them has queued."""

from __future__ import annotations

from collections import Counter
from typing import Any

from orchestrator.db.connection import Row
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE


def claim(engine: Engine, limit: int) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, limit)


def wide(pipeline_id: str, width: int) -> dict[str, Any]:
    return {"id": pipeline_id, "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(width)]}


def test_a_small_run_is_claimed_in_the_first_batch_behind_a_10000_task_backlog(engine: Engine) -> None:
    engine.create_api_key("tenant-b", "admin", raw_key="tenant-b-key")
    engine.create_pipeline(WORKSPACE, wide("backlog", 1000))
    big = engine.trigger_run(WORKSPACE, "backlog", versions=[f"v{i}" for i in range(10)], dispatch_now=False)
    engine.create_pipeline(WORKSPACE, wide("minutely", 2))
    small = engine.trigger_run(WORKSPACE, "minutely", dispatch_now=False)
    engine.create_pipeline("tenant-b", wide("theirs", 1))
    theirs = engine.trigger_run("tenant-b", "theirs", dispatch_now=False)

    batch = claim(engine, 100)  # one tick's first batch
    by_run = Counter(r["run_id"] for r in batch)
    # Before: the first 100 of the backlog, in arrival order; the others waited for 100 batches.
    assert by_run[small.id] == 2 and by_run[theirs.id] == 1
    assert by_run[big.id] == 97
    assert len(batch) == 100


def test_two_backlogged_runs_share_each_batch(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, wide("first", 500))
    first = engine.trigger_run(WORKSPACE, "first", dispatch_now=False)
    engine.create_pipeline(WORKSPACE, wide("second", 500))
    second = engine.trigger_run(WORKSPACE, "second", dispatch_now=False)
    by_run = Counter(r["run_id"] for r in claim(engine, 100))
    assert by_run[first.id] == 50 and by_run[second.id] == 50


def test_workspaces_share_a_batch_before_runs_within_one(engine: Engine) -> None:
    """Tenant A has 4 backlogged runs, tenant B one: B gets half of each batch, not a fifth."""
    engine.create_api_key("tenant-b", "admin", raw_key="tenant-b-key")
    runs_a = []
    for i in range(4):
        engine.create_pipeline(WORKSPACE, wide(f"a{i}", 100))
        runs_a.append(engine.trigger_run(WORKSPACE, f"a{i}", dispatch_now=False).id)
    engine.create_pipeline("tenant-b", wide("b", 100))
    run_b = engine.trigger_run("tenant-b", "b", dispatch_now=False).id
    by_run = Counter(r["run_id"] for r in claim(engine, 40))
    assert by_run[run_b] == 20
    assert sorted(by_run[r] for r in runs_a) == [5, 5, 5, 5]


def test_priority_still_comes_first_and_a_runs_own_claim_keeps_its_order(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, wide("low", 50))
    engine.trigger_run(WORKSPACE, "low", dispatch_now=False)
    engine.create_pipeline(WORKSPACE, {"id": "high", "nodes": [{"id": f"n{i}", "task": "echo", "priority": 5}
                                                                for i in range(30)]})
    high = engine.trigger_run(WORKSPACE, "high", dispatch_now=False)
    batch = claim(engine, 30)
    assert {r["run_id"] for r in batch} == {high.id}
    with engine.db.transaction() as conn:
        own = task_store.claim_ready_tasks(conn, 10, run_id=high.id)
    assert own == []  # all of high's tasks are out already; nothing of another run is taken
