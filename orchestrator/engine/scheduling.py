"""Cron schedules: kept in step with pipeline versions, fired by the tick's first step.

Each due schedule is claimed with FOR UPDATE SKIP LOCKED, its slots are decided by the
catch-up and overlap policies, runs are inserted unique on (schedule, slot), and next_fire_at
advances, all in one transaction: any number of ticks fire each slot once.

Catch-up, for the slots between the last decision and now:
- none: fire the latest slot only if it is on time (within `grace_s` of its slot time); a tick
  outage, a pause, or a start_at in the past skips the slots missed meanwhile;
- latest: fire the most recent missed slot;
- all: fire every missed slot, at most max_catchup_runs, the most recent ones.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.cron import CronSchedule, jitter_offset_s
from orchestrator.engine.operations import cancel_run_in
from orchestrator.engine.runs import create_run, start_queued_runs
from orchestrator.logs import log_event
from orchestrator.model import PipelineDefinition
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import runs as run_store
from orchestrator.store import schedules as schedule_store
from orchestrator.store.schedules import ScheduleSpec

log = logging.getLogger(__name__)

# A slot fired this late is still "on time" under catchup: none (EventBridge fires once a
# minute, and a cold Lambda may add seconds; two missed ticks are an outage).
ON_TIME_GRACE_S = 150
NEXT_FIRE_TIMES = 5


@dataclass
class FireSummary:
    schedules: int = 0
    runs: int = 0
    skipped: int = 0
    started_queued: int = 0
    run_ids: list[uuid.UUID] = field(default_factory=list)


def specs_of(definition: PipelineDefinition) -> list[ScheduleSpec]:
    options = definition.schedule_options
    return [
        ScheduleSpec(
            position=i, cron=cron, timezone=options.timezone, catchup=options.catchup,
            max_catchup_runs=options.max_catchup_runs, overlap=options.overlap, jitter_s=options.jitter_s,
            start_at=options.start_at, end_at=options.end_at,
        )
        for i, cron in enumerate(definition.schedule)
    ]


def _first_slot(spec: ScheduleSpec, after: datetime, schedule_id: str) -> tuple[datetime | None, datetime | None]:
    """(next slot, its fire time: slot + its jitter) strictly after `after`, or (None, None) past end_at."""
    cron = CronSchedule.parse(spec.cron, spec.timezone)
    slot = cron.next_after(after)
    if spec.end_at is not None and slot > spec.end_at:
        return None, None
    return slot, slot + timedelta(seconds=jitter_offset_s(schedule_id, slot, spec.jitter_s))


def sync_schedules(conn: Connection, workspace_id: str, pipeline_id: str, definition: PipelineDefinition) -> None:
    """Make the schedule rows match the pipeline's current `schedule` (by position).

    An unchanged schedule keeps its next slot and history; a changed one is recomputed from now
    (or from start_at when that is later); a removed one is deleted (its runs keep their slot).
    """
    now = schedule_store.db_now(conn)
    pipeline = pipeline_store.lock_pipeline(conn, workspace_id, pipeline_id)
    paused = bool(pipeline and pipeline["paused"])
    existing = {row["position"]: row for row in schedule_store.lock_for_pipeline(conn, workspace_id, pipeline_id)}
    wanted = specs_of(definition)
    for spec in wanted:
        row = existing.get(spec.position)
        if row is not None and _same_spec(row, spec):
            continue
        if spec.start_at is None:
            after = now
        elif row is None or spec.start_at > now:
            # A new schedule whose start_at is past has missed slots: the catch-up policy decides
            # them at the next tick. An edited one is not re-run over its past.
            after = spec.start_at - timedelta(microseconds=1)
        else:
            after = now
        schedule_id = row["id"] if row is not None else uuid.uuid4()
        slot, fire_at = _first_slot(spec, after, str(schedule_id))
        state = "ended" if slot is None else ("paused" if paused else "active")
        if row is None:
            schedule_store.insert_schedule(conn, schedule_id, workspace_id, pipeline_id, spec, state=state,
                                           next_slot=slot, next_fire_at=fire_at)
        else:
            schedule_store.update_schedule(conn, row["id"], spec, state=state, next_slot=slot, next_fire_at=fire_at)
    schedule_store.delete_schedules(
        conn, [row["id"] for pos, row in existing.items() if pos >= len(wanted)]
    )


def _same_spec(row: Row, spec: ScheduleSpec) -> bool:
    return (row["cron"], row["timezone"], row["catchup"], row["max_catchup_runs"], row["overlap"],
            row["jitter_s"], row["start_at"], row["end_at"]) == (
        spec.cron, spec.timezone, spec.catchup, spec.max_catchup_runs, spec.overlap, spec.jitter_s,
        spec.start_at, spec.end_at)


def slots_to_fire(schedule: Row, now: datetime) -> tuple[list[datetime], datetime | None]:
    """The slots the catch-up policy fires now, and the latest slot it let pass (if any)."""
    cron = CronSchedule.parse(schedule["cron"], schedule["timezone"])
    upper = now if schedule["end_at"] is None else min(now, schedule["end_at"])
    limit = schedule["max_catchup_runs"] if schedule["catchup"] == "all" else 1
    due = cron.latest_at_or_before(upper, not_before=schedule["next_slot"], limit=limit)
    if not due:
        return [], None
    if schedule["catchup"] == "none" and (now - due[-1]).total_seconds() > ON_TIME_GRACE_S:
        return [], due[-1]
    return due, None


def fire_due_schedules(db: Database, settings: Settings, limit: int) -> FireSummary:
    """One batch: claim due schedules and fire their slots, in one transaction."""

    def work(conn: Connection) -> FireSummary:
        summary = FireSummary()
        now = schedule_store.db_now(conn)
        for schedule in schedule_store.claim_due(conn, limit):
            summary.schedules += 1
            try:
                with conn.transaction():  # a savepoint: one broken schedule does not stall the rest
                    _fire_one(conn, settings, schedule, now, summary)
            except psycopg.OperationalError:
                # A deadlock, a serialization failure or a lost connection is not a broken
                # schedule: the whole transaction is replayed (run_in_transaction), and no slot
                # is recorded as skipped for it.
                raise
            except Exception as exc:
                log.exception("schedule %s failed to fire", schedule["id"])
                with conn.transaction():
                    schedule_store.record_skip(conn, schedule["id"], schedule["next_slot"], f"error: {exc}"[:500])
                    _advance(conn, schedule, now, fired=None)
        return summary

    return db.run_in_transaction(work)


def _fire_one(conn: Connection, settings: Settings, schedule: Row, now: datetime, summary: FireSummary) -> None:
    slots, missed = slots_to_fire(schedule, now)
    if missed is not None:
        schedule_store.record_skip(conn, schedule["id"], missed, "missed (catchup: none)")
        _log_skip(schedule, missed, "missed (catchup: none)")
        summary.skipped += 1
    fired: datetime | None = None
    workspace_id, pipeline_id = schedule["workspace_id"], schedule["pipeline_id"]
    for slot in slots:
        current = pipeline_store.get_current(conn, workspace_id, pipeline_id)
        assert current is not None  # schedules are deleted with their pipeline's schedule entry
        queue_limit = None
        overlap = schedule["overlap"]
        if overlap != "allow":
            pipeline_store.lock_pipeline(conn, workspace_id, pipeline_id)
            open_runs = run_store.open_runs(conn, workspace_id, pipeline_id)
            if open_runs and overlap == "skip":
                schedule_store.record_skip(conn, schedule["id"], slot, "overlap: a run is still active")
                _log_skip(schedule, slot, "overlap: a run is still active")
                summary.skipped += 1
                continue
            if open_runs and overlap == "buffer_one":
                if any(r["status"] == "pending" for r in open_runs):
                    schedule_store.record_skip(conn, schedule["id"], slot, "overlap: buffer_one already holds a run")
                    _log_skip(schedule, slot, "overlap: buffer_one already holds a run")
                    summary.skipped += 1
                    continue
                queue_limit = 1
            if open_runs and overlap == "cancel_other":
                for run in open_runs:
                    # The API's cancel path: what follows a run's end (its orchestration's
                    # waiting runs) happens here too.
                    cancel_run_in(conn, run["id"], f"cancelled by the schedule slot {slot.isoformat()} "
                                                   "(overlap: cancel_other)",
                                  workspace_id=workspace_id, pipeline_id=pipeline_id)
        run_id = create_run(
            conn, settings, workspace_id, current, versions=None, params={}, trigger="schedule",
            triggered_by=f"schedule:{schedule['position']}", scheduled_at=slot, schedule_id=schedule["id"],
            queue_limit=queue_limit,
        )
        if run_id is not None:
            summary.runs += 1
            summary.run_ids.append(run_id)
            log_event(log, "schedule.fired", workspace_id=workspace_id, pipeline_id=pipeline_id, run_id=run_id,
                      schedule_id=schedule["id"], slot=slot, lag_s=round((now - slot).total_seconds(), 3))
        fired = slot
    _advance(conn, schedule, now, fired=fired)


def _log_skip(schedule: Row, slot: datetime, reason: str) -> None:
    log_event(log, "schedule.slot_skipped", workspace_id=schedule["workspace_id"], pipeline_id=schedule["pipeline_id"],
              schedule_id=schedule["id"], slot=slot, reason=reason)


def _advance(conn: Connection, schedule: Row, now: datetime, fired: datetime | None) -> None:
    spec = ScheduleSpec(
        position=schedule["position"], cron=schedule["cron"], timezone=schedule["timezone"],
        catchup=schedule["catchup"], max_catchup_runs=schedule["max_catchup_runs"], overlap=schedule["overlap"],
        jitter_s=schedule["jitter_s"], start_at=schedule["start_at"], end_at=schedule["end_at"],
    )
    slot, fire_at = _first_slot(spec, max(now, schedule["next_slot"]), str(schedule["id"]))
    schedule_store.advance(conn, schedule["id"], next_slot=slot, next_fire_at=fire_at, fired_slot=fired,
                           ended=slot is None)


def next_fire_times(schedule: Row, now: datetime, count: int = NEXT_FIRE_TIMES) -> list[datetime]:
    """The next nominal slots of an active schedule (none when paused or ended)."""
    if schedule["state"] != "active" or schedule["next_slot"] is None:
        return []
    cron = CronSchedule.parse(schedule["cron"], schedule["timezone"])
    first: datetime = schedule["next_slot"]
    times = [first, *cron.next_n(first, count - 1)] if first > now else cron.next_n(now, count)
    if schedule["end_at"] is not None:
        times = [t for t in times if t <= schedule["end_at"]]
    return times[:count]


def start_queued(
    db: Database, limit: int, *, after: tuple[str, str] | None = None,
) -> tuple[list[uuid.UUID], tuple[str, str] | None]:
    """Start queued runs wherever their pipeline has room (the safety net after run ends), on
    one page of at most `limit` pipelines after `after`. The runs started, and the key of the
    page's last pipeline when the page was full (there may be more), else None."""
    with db.connection() as conn:
        pipelines = run_store.pipelines_with_queued_runs(conn, limit, after)
    started: list[uuid.UUID] = []
    for row in pipelines:
        workspace_id, pipeline_id = str(row["workspace_id"]), str(row["pipeline_id"])

        def work(conn: Connection, workspace_id: str = workspace_id, pipeline_id: str = pipeline_id) -> list[uuid.UUID]:
            return start_queued_runs(conn, workspace_id, pipeline_id)

        started += db.run_in_transaction(work)
    last = (str(pipelines[-1]["workspace_id"]), str(pipelines[-1]["pipeline_id"])) if len(pipelines) >= limit else None
    return started, last
