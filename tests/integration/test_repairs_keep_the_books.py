"""The repair paths keep the DAG's books (issue 14): dead-letter retry, redrive, cancel through
every caller, stopping failures at scale, end-of-run hooks once, the tick's lock order, the
claim's limits and scopes. Each test interleaves for real (a second connection, or a thread
paused at a statement boundary) and checks the books (orchestrator/store/invariants.py) at the
points where the defect it covers broke them."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from orchestrator.db.connection import Connection, Database, Row, connect
from orchestrator.engine import operations
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import Conflict
from orchestrator.engine.service import Engine
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import schedules as schedule_store
from orchestrator.store import tasks as task_store
from orchestrator.store.invariants import check_books
from tests.polling import poll

from .conftest import WORKSPACE
from .test_scheduling import at, set_clock


def claim(engine: Engine, run_id: Any = None, limit: int = 100) -> dict[str, Row]:
    """Claim what is ready; the claimed tasks by node id (first version)."""
    with engine.db.transaction() as conn:
        rows = task_store.claim_ready_tasks(conn, limit, run_id=run_id)
    return {str(r["node_id"]): r for r in rows}


def finish(engine: Engine, task: Row, ok: bool = True, retryable: bool = False) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
                              output={"key": f"k/{task['node_id']}"} if ok else None,
                              error=None if ok else {"message": "boom", "code": "e1"}, retryable=retryable)
    return engine.db.run_in_transaction(work)


def statuses(engine: Engine, run_id: Any) -> dict[str, str]:
    _, tasks = engine.get_run(WORKSPACE, run_id)
    return {str(t["node_id"]): str(t["status"]) for t in tasks}


def run_status(engine: Engine, run_id: Any, workspace: str = WORKSPACE) -> str:
    return str(engine.get_run(workspace, run_id)[0]["status"])


def books(engine: Engine) -> list[str]:
    with engine.db.connection() as conn:
        return [f"{v.check}: {v.message}" for v in check_books(conn)]


def dead_letter_of(engine: Engine, task_id: Any) -> Any:
    entries = engine.list_dead_letters(WORKSPACE)
    return next(e["id"] for e in entries if e["task_id"] == task_id)


def drive_to_the_end(engine: Engine, run_id: Any, rounds: int = 20, workspace: str = WORKSPACE) -> str:
    """Succeed whatever the run dispatches until it ends (bounded); its final status."""
    for _ in range(rounds):
        if run_status(engine, run_id, workspace) in ("succeeded", "failed", "cancelled"):
            break
        for task in claim(engine, run_id).values():
            finish(engine, task)
    return run_status(engine, run_id, workspace)


def waiting_backends(database_url: str) -> int:
    """Backends of this database waiting for a lock (the race is really interleaved)."""
    with connect(database_url) as conn:
        row = conn.execute(
            """SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE NOT l.granted AND a.datname = current_database()"""
        ).fetchone()
    assert row is not None
    return int(row["n"])


# --- defect 1: a retried upstream is never counted twice -------------------------------------


def test_dead_letter_retry_does_not_count_a_tolerated_failure_twice(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "join", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"},
        {"id": "b", "task": "echo"},
        {"id": "c", "task": "echo", "depends": ["a", "b"]},
    ]})
    run = engine.trigger_run(WORKSPACE, "join", dispatch_now=False)
    first = claim(engine)
    finish(engine, first["a"], ok=False)  # dead, tolerated: c counted it
    operations.retry_dead_letter(engine.db, WORKSPACE, dead_letter_of(engine, first["a"]["id"]))
    assert books(engine) == []
    finish(engine, claim(engine)["a"])  # the retry succeeds while b is still out
    # Before the fix, c was decremented a second time: ready (and sent) without b's output.
    assert statuses(engine, run.id)["c"] == "pending"
    assert books(engine) == []
    finish(engine, first["b"])
    assert statuses(engine, run.id)["c"] == "ready"
    assert drive_to_the_end(engine, run.id) == "succeeded"


def test_dead_letter_retry_restores_the_failed_count(engine: Engine) -> None:
    """none_failed decided on the retried outcome, not the failure it replaced."""
    engine.create_pipeline(WORKSPACE, {"id": "strict", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"},
        {"id": "q", "task": "echo"},
        {"id": "d", "task": "echo", "depends": ["a", "q"], "trigger_rule": "none_failed"},
    ]})
    run = engine.trigger_run(WORKSPACE, "strict", dispatch_now=False)
    first = claim(engine)
    finish(engine, first["a"], ok=False)
    operations.retry_dead_letter(engine.db, WORKSPACE, dead_letter_of(engine, first["a"]["id"]))
    finish(engine, claim(engine)["a"])
    finish(engine, first["q"])
    assert statuses(engine, run.id)["d"] == "ready"  # before the fix: skipped (failed_deps stayed 1)
    assert drive_to_the_end(engine, run.id) == "succeeded"


def test_dead_letter_retry_is_refused_while_a_task_that_consumed_the_failure_runs(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "consumed", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"},
        {"id": "after", "task": "echo", "depends": ["a"]},
    ]})
    run = engine.trigger_run(WORKSPACE, "consumed", dispatch_now=False)
    finish(engine, claim(engine)["a"], ok=False)
    after = claim(engine)["after"]  # out with a worker, on a's tolerated failure
    a_id = next(t["id"] for t in engine.get_run(WORKSPACE, run.id)[1] if t["node_id"] == "a")
    with pytest.raises(Conflict, match="already started"):
        operations.retry_dead_letter(engine.db, WORKSPACE, dead_letter_of(engine, a_id))
    assert engine.list_dead_letters(WORKSPACE)  # the refusal kept the entry open
    finish(engine, after)
    assert run_status(engine, run.id) == "succeeded"


def test_redrive_does_not_count_an_upstream_twice_for_a_failure_handler(engine: Engine) -> None:
    """a (tolerated) dies, x stops the run, h1 (one_failed) runs, h2 (all_done) waits for a and h1.
    Before the fix the run was failed with h1 still ready and h2 pending, a redrive re-counted
    only the reset tasks, and a's success then took h2 to ready before h1 had run."""
    engine.create_pipeline(WORKSPACE, {"id": "handlers", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"},
        {"id": "x", "task": "fail"},
        {"id": "h1", "task": "echo", "depends": ["x"], "trigger_rule": "one_failed"},
        {"id": "h2", "task": "echo", "depends": ["a", "h1"], "trigger_rule": "all_done"},
    ]})
    run = engine.trigger_run(WORKSPACE, "handlers", dispatch_now=False)
    first = claim(engine)
    finish(engine, first["a"], ok=False)
    finish(engine, first["x"], ok=False)
    assert books(engine) == []  # the run is failing, not failed: h1 and h2 are still to settle
    with contextlib.suppress(Conflict):  # a run that has not ended cannot be redriven
        operations.redrive_run(engine.db, WORKSPACE, run.id)
    assert books(engine) == []
    for _ in range(5):
        for task in claim(engine).values():
            assert task["node_id"] != "h2" or statuses(engine, run.id)["h1"] == "succeeded"
            finish(engine, task)
            assert books(engine) == []
    assert run_status(engine, run.id) == "failed"
    assert statuses(engine, run.id) == {"a": "failed", "x": "failed", "h1": "succeeded", "h2": "succeeded"}
    operations.redrive_run(engine.db, WORKSPACE, run.id)
    assert books(engine) == []
    assert drive_to_the_end(engine, run.id) == "succeeded"


# --- defect 2: a repair racing an in-flight completion --------------------------------------


class PauseBeforeCommit(Database):
    """A database whose transactions stop after their work, before COMMIT, until released."""

    def __init__(self, url: str) -> None:
        super().__init__(url, max_size=2)
        self.reached = threading.Event()
        self.go = threading.Event()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with super().transaction() as conn:
            yield conn
            self.reached.set()
            self.go.wait(20)


def test_a_repair_racing_an_in_flight_completion_strands_nothing(engine: Engine, database_url: str) -> None:
    """u's callback has updated u and not committed; the dead-letter retry of the stopping
    failure redrives the run (resetting d from skipped to pending and recounting it) and is held
    before its commit while u's callback advances and commits. Before the fix the recount saw u
    running and the callback saw d skipped: d pending forever, the run never ends."""
    engine.create_pipeline(WORKSPACE, {"id": "racy", "nodes": [
        {"id": "x", "task": "fail"},
        {"id": "u", "task": "echo"},
        {"id": "d", "task": "echo", "depends": ["u"]},
    ]})
    run = engine.trigger_run(WORKSPACE, "racy", dispatch_now=False)
    first = claim(engine)
    finish(engine, first["x"], ok=False)  # stops the run: d skipped while u is out
    assert statuses(engine, run.id)["d"] == "skipped"
    entry = dead_letter_of(engine, first["x"]["id"])

    updated, release_u = threading.Event(), threading.Event()

    def hold(conn: Connection, row: Row) -> None:
        updated.set()
        release_u.wait(20)

    u = first["u"]
    callback: list[Any] = []

    def complete_u() -> None:
        def work(conn: Connection) -> AttemptResult:
            return finish_attempt(conn, u["id"], u["attempt"], u["claim_token"], succeeded=True,
                                  output={"key": "k/u"}, on_succeeded=hold)
        callback.append(engine.db.run_in_transaction(work))

    repair_db = PauseBeforeCommit(database_url)
    repaired: list[Any] = []
    t1 = threading.Thread(target=complete_u)
    t1.start()
    assert updated.wait(20)
    t2 = threading.Thread(target=lambda: repaired.append(operations.retry_dead_letter(repair_db, WORKSPACE, entry)))
    t2.start()
    # The repair either waits for u's lock (the fix) or reaches its commit first (before the fix).
    poll(lambda: repair_db.reached.is_set() or waiting_backends(database_url) > 0, "the repair neither ran nor waited")
    release_u.set()
    t1.join(20)
    repair_db.go.set()
    t2.join(20)
    repair_db.close()
    assert callback and callback[0].accepted and repaired
    assert books(engine) == []
    assert drive_to_the_end(engine, run.id) == "succeeded"
    assert statuses(engine, run.id)["d"] == "succeeded"


# --- defect 4: the tick and a pipeline update take pipeline then schedule ---------------------


def test_the_tick_never_deadlocks_with_a_pipeline_update_nor_loses_the_slot(engine: Engine, database_url: str) -> None:
    set_clock(engine, at("2026-03-02T09:59:30Z"))
    # overlap: skip makes the tick read the pipeline's open runs under the pipeline's lock
    engine.create_pipeline(WORKSPACE, {"id": "minutely", "schedule": "* * * * *",
                                       "schedule_options": {"overlap": "skip"},
                                       "nodes": [{"id": "n", "task": "echo"}]})
    set_clock(engine, at("2026-03-02T10:00:10Z"))  # the 10:00 slot is due

    updater = connect(database_url, autocommit=False)
    try:
        # A pipeline update in progress: pipeline row, then (below) its schedules.
        pipeline_store.lock_pipeline(updater, WORKSPACE, "minutely")
        ticked: list[Any] = []
        tick = threading.Thread(target=lambda: ticked.append(engine.tick()))
        tick.start()
        # Before the fix the tick held the schedule and waited for the pipeline; the update's
        # schedule lock below then closed the cycle and the tick, the deadlock victim, recorded
        # the slot as skipped ("error: deadlock detected").
        poll(lambda: bool(ticked) or waiting_backends(database_url) > 0, "the tick neither finished nor waited")
        schedule_store.lock_for_pipeline(updater, WORKSPACE, "minutely")
        updater.commit()
    except psycopg.errors.DeadlockDetected:
        updater.rollback()
    finally:
        updater.close()
    tick.join(30)
    assert ticked
    engine.tick()  # the slot the first tick left to the update is fired now
    with engine.db.connection() as conn:
        skips = conn.execute("SELECT reason FROM schedule_skips").fetchall()
        runs = conn.execute("SELECT scheduled_at FROM runs WHERE pipeline_id = 'minutely'").fetchall()
    assert [r["reason"] for r in skips if "error" in r["reason"]] == []
    assert [r["scheduled_at"] for r in runs] == [at("2026-03-02T10:00:00Z")]


# --- defect 5: cancel_other ends the run the way the API's cancel does -----------------------


def test_overlap_cancel_other_releases_the_orchestrations_downstream(engine: Engine) -> None:
    set_clock(engine, at("2026-03-02T09:00:30Z"))
    engine.create_pipeline(WORKSPACE, {"id": "up", "schedule": "0 * * * *",
                                       "schedule_options": {"overlap": "cancel_other"},
                                       "nodes": [{"id": "n", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "down", "nodes": [{"id": "n", "task": "echo"}],
                                       "depends": [{"pipeline": "up"}]})
    orchestration = engine.trigger_orchestration(WORKSPACE, root="down", include="upstream", dispatch_now=False)
    by_pipeline = {r["pipeline_id"]: r["id"] for r in orchestration.runs}
    assert run_status(engine, by_pipeline["down"]) == "pending"
    set_clock(engine, at("2026-03-02T10:00:05Z"))
    engine.tick()  # the 10:00 slot cancels the open run of `up`
    assert run_status(engine, by_pipeline["up"]) == "cancelled"
    # Before the fix `down` stayed pending forever, waiting for a run that had ended.
    assert run_status(engine, by_pipeline["down"]) == "cancelled"
    assert books(engine) == []


# --- defect 6 and 8: limits hold for every claim; a run's claim stays in its scopes -----------


def test_claims_racing_triggers_never_exceed_max_active_tasks(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "limited", "concurrency": {"max_active_tasks": 1},
                                       "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]}]})
    barrier = threading.Barrier(4)
    over: list[int] = []
    stop = threading.Event()

    def trigger() -> None:
        barrier.wait()
        for _ in range(30):
            engine.trigger_run(WORKSPACE, "limited", dispatch_now=False)

    def claimer() -> None:
        barrier.wait()
        while not stop.is_set():
            with engine.db.transaction() as conn:
                claimed = task_store.claim_ready_tasks(conn, 10)
            with engine.db.connection() as conn:
                row = conn.execute("""SELECT count(*) AS n FROM tasks WHERE pipeline_id = 'limited'
                                      AND status IN ('dispatched', 'running')""").fetchone()
            assert row is not None
            if row["n"] > 1:
                over.append(int(row["n"]))
            for task in claimed:
                finish(engine, task)

    threads = [threading.Thread(target=trigger), threading.Thread(target=claimer),
               threading.Thread(target=claimer), threading.Thread(target=claimer)]
    for t in threads:
        t.start()
    threads[0].join(120)
    stop.set()
    for t in threads[1:]:
        t.join(120)
    assert over == []
    assert books(engine) == []
    with engine.db.connection() as conn:
        for run in conn.execute("SELECT id FROM runs WHERE pipeline_id = 'limited'").fetchall():
            drive_to_the_end(engine, run["id"], rounds=5)
    assert books(engine) == []


def test_a_runs_claim_never_locks_another_tenants_scope(engine: Engine, database_url: str) -> None:
    engine.create_api_key("other", "admin", raw_key="other-admin-key")
    engine.create_pipeline("other", {"id": "theirs", "concurrency": {"max_active_tasks": 2},
                                     "nodes": [{"id": "n", "task": "echo"}]})
    engine.trigger_run("other", "theirs", dispatch_now=False)  # ready work in a limited scope
    engine.create_pipeline(WORKSPACE, {"id": "mine", "nodes": [{"id": "n", "task": "echo"}]})
    mine = engine.trigger_run(WORKSPACE, "mine", dispatch_now=False)

    holder = connect(database_url, autocommit=False)
    try:
        pipeline_store.lock_pipeline(holder, "other", "theirs")  # the other tenant is busy with its row
        claimed: list[dict[str, Row]] = []
        worker = threading.Thread(target=lambda: claimed.append(claim(engine, mine.id)))
        worker.start()
        # Before the fix the eager claim for `mine` queued behind the other tenant's row.
        poll(lambda: bool(claimed) or waiting_backends(database_url) > 0, "the claim neither finished nor waited")
        assert claimed and list(claimed[0]) == ["n"], "a run's claim waited for another workspace's scope"
    finally:
        holder.rollback()
        holder.close()
    worker.join(20)
    finish(engine, claimed[0]["n"])
    with engine.db.connection() as conn:
        other = conn.execute("SELECT id FROM runs WHERE workspace_id = 'other'").fetchone()
    assert other is not None
    assert drive_to_the_end(engine, other["id"], workspace="other") == "succeeded"


# --- defect 7: a stopping failure is set-based ---------------------------------------------


class CountingConnection:
    """Counts the statements a transaction sends (the callback's round trips)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return self._conn.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_stopping_failure_in_a_10000_task_run_is_a_handful_of_statements(engine: Engine, database_url: str) -> None:
    nodes: list[dict[str, Any]] = [{"id": "root", "task": "fail"}, {"id": "sibling", "task": "echo"}]
    nodes += [{"id": f"n{i}", "task": "echo", "depends": ["sibling"]} for i in range(2000)]
    nodes += [{"id": "cleanup", "task": "echo", "depends": [f"n{i}" for i in range(0, 2000, 7)],
               "trigger_rule": "all_done"}]
    engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": nodes})
    run = engine.trigger_run(WORKSPACE, "wide", versions=[f"v{i}" for i in range(5)], dispatch_now=False)
    with engine.db.transaction() as conn:
        roots = [t for t in task_store.claim_ready_tasks(conn, 100) if t["node_id"] == "root"]
    root = roots[0]
    with connect(database_url) as raw, raw.transaction():
        counting = CountingConnection(raw)
        result = finish_attempt(counting, root["id"], root["attempt"], root["claim_token"],  # type: ignore[arg-type]
                                succeeded=False, error={"message": "boom"}, retryable=False)
    assert result.accepted and result.task_status == "failed" and result.dead_lettered
    # Before the fix: one round trip per skipped task (10,000 for this run).
    assert counting.statements <= 12, counting.statements
    assert books(engine) == []
    assert run_status(engine, run.id) == "running"  # the other versions' roots and siblings are out


# --- defect 9: a reopened run does not trigger its dependants twice ---------------------------


def test_a_dead_letter_retry_of_a_finished_run_does_not_trigger_dependants_again(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "source", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"}, {"id": "b", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "sink", "nodes": [{"id": "n", "task": "echo"}],
                                       "depends": [{"pipeline": "source", "trigger": "on_complete"}]})
    run = engine.trigger_run(WORKSPACE, "source", dispatch_now=False)
    first = claim(engine, run.id)
    finish(engine, first["a"], ok=False)
    finish(engine, first["b"])
    assert run_status(engine, run.id) == "succeeded"
    engine.tick()  # creates the later-triggered run of `sink`

    def sink_runs() -> int:
        with engine.db.connection() as conn:
            row = conn.execute("SELECT count(*) AS n FROM runs WHERE pipeline_id = 'sink'").fetchone()
        assert row is not None
        return int(row["n"])

    assert sink_runs() == 1
    operations.retry_dead_letter(engine.db, WORKSPACE, dead_letter_of(engine, first["a"]["id"]))
    assert run_status(engine, run.id) == "running"
    finish(engine, claim(engine, run.id)["a"])
    assert run_status(engine, run.id) == "succeeded"
    engine.tick()
    assert sink_runs() == 1  # before the fix: 2
    with engine.db.connection() as conn:
        for row in conn.execute("SELECT id FROM runs WHERE pipeline_id = 'sink'").fetchall():
            drive_to_the_end(engine, row["id"])


# --- defect 12: lock_run locks; a backfill dispatches only its own runs -----------------------


def test_lock_run_takes_the_row_lock(engine: Engine, database_url: str) -> None:
    from orchestrator.store import runs as run_store

    engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [{"id": "n", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "one", dispatch_now=False)
    holder = connect(database_url, autocommit=False)
    try:
        assert run_store.lock_run(holder, WORKSPACE, run.id) is not None
        with connect(database_url) as probe, pytest.raises(psycopg.errors.LockNotAvailable):
            probe.execute("SELECT id FROM runs WHERE id = %s FOR UPDATE NOWAIT", (run.id,))
    finally:
        holder.rollback()
        holder.close()
    drive_to_the_end(engine, run.id)


class Accepting:
    name = "local"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


def test_a_backfill_dispatches_only_its_own_runs(engine: Engine) -> None:
    transport = Accepting()
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = lambda *args, **kwargs: None  # type: ignore[method-assign]
    set_clock(engine, at("2026-03-02T12:00:00Z"))
    engine.create_api_key("other", "admin", raw_key="other-admin-key-2")
    engine.create_pipeline("other", {"id": "theirs", "nodes": [{"id": "n", "task": "echo"}]})
    theirs = engine.trigger_run("other", "theirs", dispatch_now=False)  # ready, in another workspace
    engine.create_pipeline(WORKSPACE, {"id": "hourly", "schedule": "0 * * * *", "nodes": [{"id": "n", "task": "echo"}]})
    result = engine.start_backfill(WORKSPACE, "hourly", start=at("2026-03-02T08:30:00Z"),
                                   end=at("2026-03-02T10:30:00Z"), versions=None, max_active_runs=None,
                                   reprocess="none", dry_run=False, actor="test")
    assert result["runs"] == 2
    assert {m["run_id"] for m in transport.sent} == {str(r) for r in result["run_ids"]}
    with engine.db.connection() as conn:
        row = conn.execute("SELECT status FROM tasks WHERE run_id = %s", (theirs.id,)).fetchone()
    assert row is not None and row["status"] == "ready"  # before the fix: dispatched by another tenant's request
    for message in transport.sent:
        with engine.db.connection() as conn:
            task = conn.execute("SELECT id, attempt, claim_token, node_id, run_id FROM tasks WHERE id = %s",
                                (uuid.UUID(message["task_id"]),)).fetchone()
        assert task is not None
        finish(engine, task)
    drive_to_the_end(engine, theirs.id, workspace="other")


def test_a_limited_scope_that_became_ready_after_the_scope_locks_is_not_claimed_past_its_limit(
    engine: Engine, database_url: str,
) -> None:
    """The claim locks the limited scopes that have ready work, then claims in a later statement.
    A run of `capped` (limit 1, one task already out) starts between the two: its task must wait
    for a claim that holds `capped`'s lock. Before the fix it was claimed with no limit at all."""
    engine.create_pipeline(WORKSPACE, {"id": "capped", "concurrency": {"max_active_tasks": 1},
                                       "nodes": [{"id": "n", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "blocker", "concurrency": {"max_active_tasks": 5},
                                       "nodes": [{"id": "n", "task": "echo"}]})
    first = engine.trigger_run(WORKSPACE, "capped", dispatch_now=False)
    assert list(claim(engine, first.id)) == ["n"]  # capped: 1 of 1 out
    engine.trigger_run(WORKSPACE, "blocker", dispatch_now=False)

    editor = connect(database_url, autocommit=False)  # a pipeline update lifting blocker's limit
    claimed: list[dict[str, Row]] = []
    try:
        editor.execute("UPDATE pipelines SET max_active_tasks = NULL WHERE workspace_id = %s AND id = 'blocker'",
                       (WORKSPACE,))
        claimer = threading.Thread(target=lambda: claimed.append(claim(engine)))
        claimer.start()
        poll(lambda: waiting_backends(database_url) > 0, "the claim did not wait for the scope lock")
        second = engine.trigger_run(WORKSPACE, "capped", dispatch_now=False)  # ready now, after the lock statement began
        editor.commit()
    finally:
        editor.close()
    claimer.join(20)
    assert claimed
    with engine.db.connection() as conn:
        row = conn.execute("""SELECT count(*) AS n FROM tasks WHERE pipeline_id = 'capped'
                              AND status IN ('dispatched', 'running')""").fetchone()
    assert row is not None and row["n"] == 1, f"{row} tasks of capped are out, over its limit of 1"
    assert books(engine) == []
    finish(engine, {**claim_row(engine, first.id)})
    assert drive_to_the_end(engine, second.id) == "succeeded"


def claim_row(engine: Engine, run_id: Any) -> Row:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT id, attempt, claim_token, node_id, run_id FROM tasks WHERE run_id = %s",
                           (run_id,)).fetchone()
    assert row is not None
    return row
