"""The tick heals in loops: every repair step runs batch after batch while a batch comes back
full and the deadline allows, so one tick heals a backlog (5,000 expired leases) that a batch a
tick would take fifty ticks to; a deadline stops the loops early and the next tick goes on."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.engine.tick import DEADLINE_MARGIN_S, remaining_time
from orchestrator.store import tasks as task_store
from tests import capturing

from .conftest import WORKSPACE


class Transport(capturing.CapturingTransport):
    """Accepts every dispatch (the test plays the workers); `room` is what it says it can start
    now (None: without bound), so a healing tick can be kept from claiming again."""

    def __init__(self) -> None:
        super().__init__()
        self.room: int | None = None

    def capacity(self) -> int | None:
        return self.room


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = Engine(settings, Database(settings.database_url, max_size=4), transports={"local": Transport()})
    eng.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
    yield eng
    eng.close()


def transport(engine: Engine) -> Transport:
    sent = engine.transports["local"]
    assert isinstance(sent, Transport)
    return sent


def out_with_workers(engine: Engine, nodes: int, versions: int) -> list[dict[str, Any]]:
    """nodes x versions tasks, created through the engine and dispatched by ticks."""
    engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": [
        {"id": f"n{i:03d}", "task": "echo", "heartbeat_s": 30, "retry": {"max_attempts": 3, "base_delay_s": 0}}
        for i in range(nodes)]})
    engine.trigger_run(WORKSPACE, "wide", versions=[f"v{i:04d}" for i in range(versions)], dispatch_now=False)
    summary = engine.tick()
    assert summary.dispatched == nodes * versions, summary.to_dict()
    with engine.db.connection() as conn:
        return conn.execute(
            "SELECT id, attempt, claim_token FROM tasks WHERE status = 'dispatched' ORDER BY id").fetchall()


def start_half(engine: Engine, tasks: list[dict[str, Any]]) -> None:
    """Every other task heard from by its worker (running), the rest never started."""
    with engine.db.transaction() as conn:
        for task in tasks[::2]:
            assert task_store.mark_running(conn, task["id"], task["attempt"], task["claim_token"], None, None)


def lapse_every_lease(engine: Engine) -> int:
    with engine.db.transaction() as conn:
        return conn.execute(
            """UPDATE tasks SET lease_expires_at = tw_now() - interval '1 second'
               WHERE status IN ('dispatched', 'running')""").rowcount


def count(conn: Connection, sql: str, *args: Any) -> dict[str, int]:
    return {str(r["k"]): int(r["n"]) for r in conn.execute(sql, args).fetchall()}


def test_one_tick_heals_five_thousand_expired_leases(engine: Engine) -> None:
    tasks = out_with_workers(engine, nodes=50, versions=100)
    assert len(tasks) == 5_000
    start_half(engine, tasks)
    assert lapse_every_lease(engine) == 5_000
    transport(engine).room = 0  # the healing tick claims nothing again: what it healed stays visible

    began = time.perf_counter()
    summary = engine.tick()
    took = time.perf_counter() - began
    print(f"\none tick healed {summary.expired} expired leases in {took:.2f} s "
          f"(expire_leases step {summary.durations_ms['expire_leases']:.0f} ms)")

    assert summary.expired == 5_000 and summary.deadline_stopped == []
    with engine.db.connection() as conn:
        assert count(conn, "SELECT status AS k, count(*) AS n FROM tasks GROUP BY status") == {"ready": 5_000}
        # Per the rules: a running attempt that lapsed failed (and retries); a dispatch nobody
        # started is a delivery failure that keeps the task's attempts.
        assert count(conn, "SELECT status AS k, count(*) AS n FROM task_attempts GROUP BY status") == {
            "expired": 2_500, "dispatch_failed": 2_500}
    # The next tick, with room, sends every one of them again: nothing was lost on the way.
    transport(engine).room = None
    again = engine.tick()
    assert again.expired == 0 and again.dispatched == 5_000


def test_a_short_deadline_stops_the_loops_and_the_next_tick_goes_on(engine: Engine) -> None:
    out_with_workers(engine, nodes=10, versions=100)
    assert lapse_every_lease(engine) == 1_000
    transport(engine).room = 0
    checks = 0

    def remaining() -> float:
        # Plenty of time for the first few checks (the summary's and three batches of leases;
        # no schedule is due, so that step does not look), then less than the margin: the loops
        # stop where they are.
        nonlocal checks
        checks += 1
        return 60.0 if checks <= 4 else DEADLINE_MARGIN_S / 2

    first = engine.tick(remaining_s=remaining)
    assert first.deadline_s == 60.0
    assert first.expired == 300, first.to_dict()
    assert first.deadline_stopped[0] == "expire_leases"
    # The steps after it were stopped too (they run when an earlier step did work); a step with
    # nothing due at all (no dead letter is past its retention) was not stopped, it had nothing.
    assert {"expire_waits", "queued_runs", "pipeline_triggers"} <= set(first.deadline_stopped)
    assert "dlq_retention" not in first.deadline_stopped
    assert first.to_dict()["deadline_stopped"] == first.deadline_stopped
    with engine.db.connection() as conn:
        lapsed = conn.execute(
            "SELECT count(*) AS n FROM tasks WHERE status = 'dispatched' AND lease_expires_at < tw_now()").fetchone()
        assert lapsed is not None and lapsed["n"] == 700  # left as they were, for the next tick

    second = engine.tick(remaining_s=lambda: 60.0)
    assert second.expired == 700 and second.deadline_stopped == []
    with engine.db.connection() as conn:
        assert count(conn, "SELECT status AS k, count(*) AS n FROM tasks GROUP BY status") == {"ready": 1_000}


def test_queued_runs_are_paged_so_full_pipelines_do_not_hide_the_rest(settings: Settings) -> None:
    """One pipeline a page: the first two pages are pipelines at their limit (nothing to start),
    the third has room. Unordered and unpaged, the same full pipeline came back every tick."""
    eng = Engine(replace(settings, tick_batch_size=1), Database(settings.database_url, max_size=4),
                 transports={"local": Transport()})
    eng.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")  # creates the workspace
    try:
        queued: dict[str, uuid.UUID] = {}
        for name in ("a-full", "b-full", "c-free"):
            eng.create_pipeline(WORKSPACE, {"id": name, "concurrency": {"max_active_runs": 1},
                                            "nodes": [{"id": "x", "task": "echo"}]})
            eng.trigger_run(WORKSPACE, name, dispatch_now=False)
            queued[name] = eng.trigger_run(WORKSPACE, name, dispatch_now=False).id
        with eng.db.transaction() as conn:
            claimed = task_store.claim_ready_tasks(conn, 10)
        (free,) = [t for t in claimed if t["pipeline_id"] == "c-free"]

        # c-free's running run ends without the engine's eager start of the next (an engine
        # that stopped in between): only the tick's safety net starts its queued run.
        def work(conn: Connection) -> Any:
            return finish_attempt(conn, free["id"], free["attempt"], free["claim_token"], succeeded=True,
                                  output={"key": "k"})

        assert eng.db.run_in_transaction(work).run_status == "succeeded"
        summary = eng.tick()
        assert summary.queued_runs_started == 1
        status = {name: eng.get_run(WORKSPACE, run_id)[0]["status"] for name, run_id in queued.items()}
        assert status == {"a-full": "pending", "b-full": "pending", "c-free": "running"}
    finally:
        eng.close()


def test_remaining_time_takes_the_lambda_context_capped_by_the_maximum() -> None:
    class Context:
        def __init__(self, ms: int) -> None:
            self.ms = ms

        def get_remaining_time_in_millis(self) -> int:
            return self.ms

    now = [100.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    assert remaining_time() is None
    lambda_only = remaining_time(context=Context(12_000), clock=clock)
    assert lambda_only is not None and lambda_only() == 12.0
    capped = remaining_time(context=Context(40_000), max_s=25.0, clock=clock)
    assert capped is not None and capped() == 25.0
    now[0] += 20.0
    assert capped() == 5.0  # the maximum counts from when the tick began
    short = remaining_time(context=Context(1_500), max_s=25.0, clock=clock)
    assert short is not None and short() == 1.5
    plain = remaining_time(context=object(), max_s=25.0, clock=clock)  # no Lambda context: the maximum
    assert plain is not None and plain() == 25.0
