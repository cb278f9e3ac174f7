"""The tick's queries stay index-backed: an idle tick costs O(due work), not O(rows)."""

from __future__ import annotations

import json

import pytest

from orchestrator.engine.service import Engine

from .conftest import WORKSPACE


def plan(engine: Engine, query: str) -> str:
    with engine.db.connection() as conn:
        rows = conn.execute(f"EXPLAIN (FORMAT JSON) {query}").fetchall()
    return json.dumps(rows[0])


def shape_a_long_lived_database(engine: Engine) -> None:
    """20,000 tasks, all but 20 (still pending) finished: the shape of a long-lived database.
    The tasks are marked succeeded by SQL (mark the test `books_unchecked`)."""
    engine.create_pipeline(WORKSPACE, {"id": "bulk", "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(20)]})
    engine.trigger_run(WORKSPACE, "bulk", versions=[f"v{i}" for i in range(1000)], dispatch_now=False)
    with engine.db.connection() as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE version <> 'v0'")
        conn.execute("ANALYZE")


@pytest.mark.books_unchecked  # tasks are marked succeeded by SQL to shape the table, not by the engine
def test_claim_and_lease_scans_use_their_partial_indexes(engine: Engine) -> None:
    shape_a_long_lived_database(engine)

    claim = plan(engine, """SELECT id FROM tasks WHERE status = 'ready' AND available_at <= tw_now()
                            ORDER BY priority DESC, available_at LIMIT 100 FOR UPDATE SKIP LOCKED""")
    # either partial index on the ready set (the planner sorts a handful of rows itself)
    assert ("tasks_ready_idx" in claim or "tasks_ready_run_idx" in claim or "tasks_ready_run_order_idx" in claim) \
        and "Seq Scan" not in claim

    leases = plan(engine, """SELECT id FROM tasks WHERE status IN ('dispatched', 'running')
                             AND lease_expires_at < tw_now() ORDER BY lease_expires_at LIMIT 100""")
    # a partial index over the active tasks only (the lease index, or the active-count one)
    assert ("tasks_lease_idx" in leases or "tasks_active_idx" in leases) and "Seq Scan" not in leases
