"""Cron scheduling against the real database, with database time moved through tw_clock."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from orchestrator.db.connection import Connection, Database
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.scheduling import fire_due_schedules, start_queued
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def set_clock(engine: Engine, instant: datetime) -> None:
    """Database time becomes `instant` (then flows on in real time) for every connection."""
    with engine.db.connection() as conn:
        conn.execute(
            """INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::timestamptz - now())
               ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """,
            (instant,),
        )


def fire(engine: Engine) -> Any:
    return fire_due_schedules(engine.db, engine.settings, 100)


def pipeline(pid: str, schedule: Any, **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": pid, "schedule": schedule, "nodes": [{"id": "a", "task": "echo"}]}
    if options:
        body["schedule_options"] = options
    return body


def runs_of(engine: Engine, pid: str) -> list[dict[str, Any]]:
    return sorted(engine.list_runs(WORKSPACE, pipeline_id=pid, limit=500), key=lambda r: (r["scheduled_at"], r["created_at"]))


def slots(engine: Engine, pid: str) -> list[datetime]:
    return [r["scheduled_at"] for r in runs_of(engine, pid)]


def schedule_row(engine: Engine, pid: str, position: int = 0) -> dict[str, Any]:
    return next(s for s in engine.list_schedules(WORKSPACE, [pid]) if s["position"] == position)


def finish_run(engine: Engine, run_id: Any) -> None:
    with engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 100, run_id=run_id)
    finish_run_claimed(engine, claimed)


def test_a_due_slot_fires_once_and_the_schedule_advances(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:01:00"))
    engine.create_pipeline(WORKSPACE, pipeline("every5", "*/5 * * * *"))
    row = schedule_row(engine, "every5")
    assert row["next_slot"] == at("2026-01-01T00:05:00") and row["state"] == "active"
    assert row["next_fire_times"][:3] == [at("2026-01-01T00:05:00"), at("2026-01-01T00:10:00"), at("2026-01-01T00:15:00")]
    assert fire(engine).runs == 0  # not yet due

    set_clock(engine, at("2026-01-01T00:05:20"))
    summary = fire(engine)
    assert (summary.schedules, summary.runs) == (1, 1)
    assert fire(engine).runs == 0  # the same slot never fires twice
    (run,) = runs_of(engine, "every5")
    assert run["trigger"] == "schedule" and run["scheduled_at"] == at("2026-01-01T00:05:00")
    row = schedule_row(engine, "every5")
    assert row["last_fired_slot"] == at("2026-01-01T00:05:00") and row["next_slot"] == at("2026-01-01T00:10:00")


@pytest.mark.parametrize(("catchup", "expected"), [
    ("none", []),
    ("latest", ["2026-01-01T02:05:00"]),
    ("all", ["2026-01-01T01:55:00", "2026-01-01T02:00:00", "2026-01-01T02:05:00"]),
])
def test_catchup_after_an_outage(engine: Engine, catchup: str, expected: list[str]) -> None:
    set_clock(engine, at("2026-01-01T00:01:00"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "*/5 * * * *", catchup=catchup, max_catchup_runs=3))
    set_clock(engine, at("2026-01-01T02:08:00"))  # two hours without ticks; 02:05 is 3 minutes late
    fire(engine)
    assert slots(engine, "p") == [at(s) for s in expected]
    assert schedule_row(engine, "p")["next_slot"] == at("2026-01-01T02:10:00")
    if catchup == "none":
        assert schedule_row(engine, "p")["skipped_slots"] == 1  # the missed slot is recorded


def test_catchup_none_still_fires_a_slightly_late_tick(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:01:00"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "*/5 * * * *"))
    set_clock(engine, at("2026-01-01T00:06:30"))  # 90 s late: an ordinary EventBridge delay
    fire(engine)
    assert slots(engine, "p") == [at("2026-01-01T00:05:00")]


def test_overlap_skip_records_the_skipped_slot(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "* * * * *", overlap="skip"))
    set_clock(engine, at("2026-01-01T00:01:05"))
    fire(engine)
    set_clock(engine, at("2026-01-01T00:02:05"))
    assert fire(engine).skipped == 1
    assert slots(engine, "p") == [at("2026-01-01T00:01:00")]
    with psycopg.connect(engine.settings.database_url) as conn:
        skips = conn.execute("SELECT slot, reason FROM schedule_skips").fetchall()
    assert skips == [(at("2026-01-01T00:02:00"), "overlap: a run is still active")]


def test_overlap_buffer_one_keeps_one_pending_run(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "* * * * *", overlap="buffer_one"))
    for minute in (1, 2, 3):
        set_clock(engine, at(f"2026-01-01T00:0{minute}:05"))
        fire(engine)
    runs = runs_of(engine, "p")
    assert [(r["scheduled_at"].minute, r["status"]) for r in runs] == [(1, "running"), (2, "pending")]
    assert schedule_row(engine, "p")["skipped_slots"] == 1  # 00:03: the buffer was full
    finish_run(engine, runs[0]["id"])
    assert start_queued(engine.db, 10) == ([runs[1]["id"]], None)
    assert [r["status"] for r in runs_of(engine, "p")] == ["succeeded", "running"]


def test_overlap_cancel_other_cancels_the_active_run(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "* * * * *", overlap="cancel_other"))
    set_clock(engine, at("2026-01-01T00:01:05"))
    fire(engine)
    set_clock(engine, at("2026-01-01T00:02:05"))
    fire(engine)
    first, second = runs_of(engine, "p")
    assert (first["status"], second["status"]) == ("cancelled", "running")
    _, tasks = engine.get_run(WORKSPACE, first["id"])
    assert {t["status"] for t in tasks} == {"cancelled"}


def test_max_active_runs_queues_manual_triggers_too(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "one-at-a-time", "concurrency": {"max_active_runs": 1},
                                       "nodes": [{"id": "a", "task": "echo"}]})
    first = engine.trigger_run(WORKSPACE, "one-at-a-time", dispatch_now=False)
    second = engine.trigger_run(WORKSPACE, "one-at-a-time", dispatch_now=False)
    assert engine.get_run(WORKSPACE, second.id)[0]["status"] == "pending"
    with engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 10)
    assert {t["run_id"] for t in claimed} == {first.id}  # the queued run's roots are held back
    finish_run_claimed(engine, claimed)
    assert start_queued(engine.db, 10) == ([second.id], None)
    assert engine.get_run(WORKSPACE, second.id)[0]["status"] == "running"


def finish_run_claimed(engine: Engine, claimed: list[Any]) -> None:
    for task in claimed:
        def work(conn: Connection, task: Any = task) -> Any:
            return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                                  output={"key": "k"})
        engine.db.run_in_transaction(work)


def test_pause_and_resume_applies_the_catchup_policy(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "*/10 * * * *", catchup="latest"))
    engine.set_paused(WORKSPACE, "p", True)
    assert schedule_row(engine, "p")["state"] == "paused" and schedule_row(engine, "p")["next_fire_times"] == []
    set_clock(engine, at("2026-01-01T01:05:00"))
    assert fire(engine).runs == 0
    engine.set_paused(WORKSPACE, "p", False)
    fire(engine)
    assert slots(engine, "p") == [at("2026-01-01T01:00:00")]  # the most recent missed slot only


def test_start_at_and_end_at_bound_the_slots(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "*/10 * * * *", start_at="2026-01-01T00:25:00Z",
                                               end_at="2026-01-01T00:45:00Z"))
    assert schedule_row(engine, "p")["next_fire_times"] == [at("2026-01-01T00:30:00"), at("2026-01-01T00:40:00")]
    for clock in ("00:20:10", "00:30:10", "00:40:10", "00:50:10"):
        set_clock(engine, at(f"2026-01-01T{clock}"))
        fire(engine)
    assert slots(engine, "p") == [at("2026-01-01T00:30:00"), at("2026-01-01T00:40:00")]
    assert schedule_row(engine, "p")["state"] == "ended"


def test_a_new_schedule_with_start_at_in_the_past_catches_up(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T03:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("p", "0 * * * *", start_at="2026-01-01T00:00:00Z",
                                               catchup="all", max_catchup_runs=10))
    fire(engine)
    assert slots(engine, "p") == [at(f"2026-01-01T0{h}:00:00") for h in range(4)]


def test_a_list_of_crons_and_updates_keep_rows_in_step(engine: Engine) -> None:
    set_clock(engine, at("2026-01-05T00:00:30"))  # a Monday
    engine.create_pipeline(WORKSPACE, pipeline("p", ["0 3 * * *", "0 15 * * 1"]))
    assert [s["cron"] for s in engine.list_schedules(WORKSPACE, ["p"])] == ["0 3 * * *", "0 15 * * 1"]
    set_clock(engine, at("2026-01-05T15:00:10"))
    fire(engine)
    # 03:00 was 12 hours late (catchup: none skips it); the Monday 15:00 slot is on time
    assert slots(engine, "p") == [at("2026-01-05T15:00:00")]
    engine.update_pipeline(WORKSPACE, "p", pipeline("p", ["30 4 * * *"], timezone="Europe/Berlin"))
    (only,) = engine.list_schedules(WORKSPACE, ["p"])
    assert (only["cron"], only["timezone"]) == ("30 4 * * *", "Europe/Berlin")
    assert only["next_slot"] == at("2026-01-06T03:30:00")
    engine.update_pipeline(WORKSPACE, "p", {"id": "p", "nodes": [{"id": "a", "task": "echo"}]})
    assert engine.list_schedules(WORKSPACE, ["p"]) == []
    assert len(runs_of(engine, "p")) == 1  # the history stays


@pytest.mark.parametrize(("zone", "cron", "start", "expected"), [
    # spring forward: 02:30 does not exist; it fires once, at 03:30 local (the gap's length later)
    ("Europe/Berlin", "30 2 * * *", "2025-03-29T12:00:00",
     ["2025-03-30T01:30:00", "2025-03-31T00:30:00"]),
    ("America/New_York", "30 2 * * *", "2025-03-08T12:00:00",
     ["2025-03-09T07:30:00", "2025-03-10T06:30:00"]),
    # fall back: 01:30 happens twice; it fires once, at the first (summer-time) occurrence
    ("America/New_York", "30 1 * * *", "2025-11-01T12:00:00",
     ["2025-11-02T05:30:00", "2025-11-03T06:30:00"]),
    ("Europe/Berlin", "30 2 * * *", "2025-10-25T12:00:00",
     ["2025-10-26T00:30:00", "2025-10-27T01:30:00"]),
])
def test_dst_transitions_fire_each_daily_slot_once(engine: Engine, zone: str, cron: str, start: str,
                                                    expected: list[str]) -> None:
    set_clock(engine, at(start))
    engine.create_pipeline(WORKSPACE, pipeline("dst", cron, timezone=zone))
    assert schedule_row(engine, "dst")["next_fire_times"][:2] == [at(e) for e in expected]
    for instant in expected:
        set_clock(engine, at(instant) + timedelta(seconds=20))
        fire(engine)
        fire(engine)
    assert slots(engine, "dst") == [at(e) for e in expected]


def test_eight_ticks_racing_over_500_due_schedules_fire_each_slot_once(engine: Engine) -> None:
    set_clock(engine, at("2026-01-01T00:00:30"))
    for i in range(1, 501):
        engine.create_pipeline(WORKSPACE, pipeline(f"p{i}", "* * * * *"))
    set_clock(engine, at("2026-01-01T00:01:10"))

    barrier = threading.Barrier(8)
    fired: list[int] = []
    errors: list[BaseException] = []

    def tick() -> None:
        db = Database(engine.settings.database_url, max_size=1)
        try:
            barrier.wait()
            while True:
                summary = fire_due_schedules(db, engine.settings, 20)
                fired.append(summary.runs)
                if summary.schedules == 0:
                    return
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=tick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sum(fired) == 500
    with psycopg.connect(engine.settings.database_url) as conn:
        per_slot = conn.execute("SELECT schedule_id, scheduled_at, count(*) FROM runs GROUP BY 1, 2").fetchall()
        due_left = conn.execute("SELECT count(*) FROM schedules WHERE next_fire_at <= tw_now()").fetchone()
    assert len(per_slot) == 500 and Counter(n for _, _, n in per_slot) == {1: 500}
    assert {slot for _, slot, _ in per_slot} == {at("2026-01-01T00:01:00")}
    assert due_left == (0,)


def test_idle_tick_over_100000_schedules_uses_the_due_index(engine: Engine) -> None:
    with engine.db.transaction() as conn:
        conn.execute("""INSERT INTO pipelines (workspace_id, id, current_version)
                        SELECT %s, 'idle' || g, 1 FROM generate_series(1, 100000) g""", (WORKSPACE,))
        conn.execute("""INSERT INTO schedules (workspace_id, pipeline_id, position, cron, timezone, catchup,
                                               max_catchup_runs, overlap, state, next_slot, next_fire_at)
                        SELECT %s, 'idle' || g, 0, '0 3 * * *', 'UTC', 'none', 10, 'allow', 'active',
                               tw_now() + make_interval(mins => g), tw_now() + make_interval(mins => g)
                        FROM generate_series(1, 100000) g""", (WORKSPACE,))
        conn.execute("ANALYZE schedules")
        plan = conn.execute("""EXPLAIN (FORMAT JSON) SELECT id FROM schedules
                               WHERE state = 'active' AND next_fire_at <= tw_now()
                               ORDER BY next_fire_at LIMIT 100 FOR UPDATE SKIP LOCKED""").fetchone()
    text = str(plan)
    assert "schedules_due_idx" in text and "Seq Scan" not in text
    assert fire(engine).schedules == 0
    # the claim's look-up of pipelines with task limits is an index probe too, not a scan of 100,000
    with engine.db.connection() as conn:
        conn.execute("ANALYZE pipelines")
        limited = str(conn.execute("""EXPLAIN (FORMAT JSON) SELECT p.workspace_id, p.id FROM pipelines p
                                      WHERE p.max_active_tasks IS NOT NULL ORDER BY 1, 2""").fetchone())
    assert "pipelines_limited_idx" in limited and "Seq Scan" not in limited


def test_jitter_delays_each_slot_by_a_deterministic_offset(engine: Engine) -> None:
    from orchestrator.engine.cron import jitter_offset_s

    set_clock(engine, at("2026-01-01T00:00:30"))
    engine.create_pipeline(WORKSPACE, pipeline("jittery", "*/5 * * * *", jitter_s=120))
    row = schedule_row(engine, "jittery")
    offset = jitter_offset_s(str(row["id"]), row["next_slot"], 120)
    assert row["next_fire_at"] == row["next_slot"] + timedelta(seconds=offset) and 0 <= offset <= 120
    set_clock(engine, row["next_slot"] + timedelta(seconds=offset) - timedelta(seconds=2))
    assert fire(engine).runs == 0  # the slot has come, its jittered fire time not yet
    set_clock(engine, row["next_slot"] + timedelta(seconds=offset) + timedelta(seconds=1))
    fire(engine)
    (run,) = runs_of(engine, "jittery")
    assert run["scheduled_at"] == at("2026-01-01T00:05:00")  # the run records the nominal slot
    following = schedule_row(engine, "jittery")
    assert following["next_fire_at"] - following["next_slot"] == timedelta(
        seconds=jitter_offset_s(str(row["id"]), following["next_slot"], 120))
