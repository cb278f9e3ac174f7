"""The tick asks first (store.tick_work): an idle tick is one statement, answered from indexes,
and a step with work due is never skipped (the tick tests of each step drive it through
`Engine.tick()`; here, the question itself and the steps an earlier step's work wakes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest

from orchestrator.config import Settings
from orchestrator.engine.service import Engine
from orchestrator.store.tick_work import find_due_work

from .conftest import WORKSPACE
from .test_callback_statement import CapturingTransport, TracedDatabase, succeed, traced_stack
from .test_query_plans import shape_a_long_lived_database
from .test_scheduling import at, set_clock


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Engine, CapturingTransport]]:
    with traced_stack(settings, max_size=4) as made:
        yield made

def test_an_idle_tick_is_one_statement(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    assert isinstance(engine.db, TracedDatabase)
    engine.create_pipeline(WORKSPACE, {"id": "daily", "schedule": "0 3 * * *", "steps": ["a", "b"]})
    run = engine.trigger_run(WORKSPACE, "daily")
    with engine.db.traced() as statements:
        summary = engine.tick()  # `a` is dispatched and running: nothing is due
    assert len(statements) == 1 and statements[0].startswith("SELECT EXISTS (SELECT 1 FROM schedules"), statements
    assert summary.claimed == 0 and summary.expired == 0
    # ... and a tick with work due still does it: the lease of `a` lapses.
    with engine.db.connection() as conn:
        conn.execute("UPDATE tasks SET lease_expires_at = tw_now() - interval '1 second' WHERE run_id = %s"
                      " AND status = 'dispatched'", (run.id,))
    with engine.db.traced() as statements:
        summary = engine.tick()
    assert summary.expired == 1 and len(statements) > 1
    assert transport.take(run.id, "a")  # dispatched again (its first send and the resend)


def test_work_made_due_by_an_earlier_step_is_done_in_the_same_tick(
    stack: tuple[Engine, CapturingTransport],
) -> None:
    # Nothing is ready when the tick asks; the due schedule's run makes its first step ready
    # (the schedule step does not dispatch): the claim runs in the same tick, not a minute later.
    engine, transport = stack
    assert isinstance(engine.db, TracedDatabase)
    set_clock(engine, at("2026-01-01T02:59:00"))
    engine.create_pipeline(WORKSPACE, {"id": "daily", "schedule": "0 3 * * *", "steps": ["a", "b"]})
    set_clock(engine, at("2026-01-01T03:00:01"))
    with engine.db.connection() as conn:
        due = find_due_work(conn, dlq_retention_days=30, event_retention_s=86_400)
    assert due.schedules and not due.ready_tasks
    summary = engine.tick()
    assert summary.scheduled_runs == 1 and summary.claimed == summary.dispatched == 1
    (run_id,) = {m["run_id"] for m in transport.sent}
    assert succeed(engine, transport.one(run_id, "a")).accepted


@pytest.mark.books_unchecked  # tasks are marked succeeded by SQL to shape the table, not by the engine
def test_the_question_is_answered_from_indexes(engine: Engine) -> None:
    shape_a_long_lived_database(engine)
    with engine.db.connection() as conn:
        plan = json.dumps(conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT EXISTS (SELECT 1 FROM tasks WHERE status = 'ready'"
            " AND available_at <= tw_now()), EXISTS (SELECT 1 FROM tasks WHERE status IN ('dispatched', 'running')"
            " AND lease_expires_at < tw_now()), EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting'"
            " AND wait_expires_at < tw_now()), EXISTS (SELECT 1 FROM tasks WHERE kind = 'map' AND status = 'ready')"
        ).fetchall()[0])
        due = find_due_work(conn, dlq_retention_days=30, event_retention_s=86_400)
    assert "Seq Scan" not in plan, plan
    assert due.ready_tasks and not due.expired_leases and not due.schedules and not due.idle
    # A retention of 0 keeps everything: never answered due, whatever the entries' age.
    set_clock(engine, at("2030-01-01T00:00:00") + timedelta(days=1))
    with engine.db.connection() as conn:
        assert not find_due_work(conn, dlq_retention_days=0, event_retention_s=0).expired_dead_letters
