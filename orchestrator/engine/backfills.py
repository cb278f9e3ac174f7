"""Backfills: one run per schedule slot of a past range, as if the schedule had fired then.

Runs get `trigger=schedule` and `scheduled_at` = the slot, skip slots that already ran
successfully (or, with `reprocess: failed`, only those that did not fail), and are throttled by
`max_active_runs`: over the limit a run is queued and starts, oldest slot first, as room frees.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.cron import CronSchedule
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.operations import cancel_run_in
from orchestrator.engine.runs import check_versions, create_run
from orchestrator.model import PipelineDefinition
from orchestrator.store import backfills as backfill_store
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store.schedules import db_now

MAX_BACKFILL_SLOTS = 1000


@dataclass(frozen=True)
class SlotPlan:
    slot: datetime
    action: str  # run | skip
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "action": self.action, "reason": self.reason}


def slots_in_range(definition: PipelineDefinition, start: datetime, end: datetime) -> list[datetime]:
    """Every slot of every cron of the pipeline with start <= slot <= end, ascending, at most
    MAX_BACKFILL_SLOTS + 1 (one more tells the caller the range is too large)."""
    slots: set[datetime] = set()
    for expression in definition.schedule:
        cron = CronSchedule.parse(expression, definition.schedule_options.timezone)
        slot = cron.next_after(start - timedelta(microseconds=1))
        while slot <= end and len(slots) <= MAX_BACKFILL_SLOTS:
            slots.add(slot)
            slot = cron.next_after(slot)
    return sorted(slots)[: MAX_BACKFILL_SLOTS + 1]


def plan(slots: list[datetime], outcomes: dict[datetime, Row], reprocess: str) -> list[SlotPlan]:
    plans = []
    for slot in slots:
        seen = outcomes.get(slot)
        if seen is not None and seen["active"]:
            plans.append(SlotPlan(slot, "skip", "a run of this slot is still active"))
        elif seen is not None and seen["succeeded"] and reprocess != "all":
            plans.append(SlotPlan(slot, "skip", "already succeeded"))
        elif seen is not None and not seen["succeeded"] and reprocess == "none":
            plans.append(SlotPlan(slot, "skip", "already ran (reprocess: failed or all reruns it)"))
        else:
            plans.append(SlotPlan(slot, "run"))
    return plans


def start_backfill(
    db: Database, settings: Settings, workspace_id: str, pipeline_id: str, *, start: datetime, end: datetime,
    versions: list[str] | None, max_active_runs: int | None, reprocess: str, dry_run: bool, actor: str | None,
) -> dict[str, Any]:
    # Before anything is read or written: a bad name would be stored with the backfill and then
    # fail every run's dispatch (or, repeated, the insert of its tasks).
    check_versions(versions)
    if end <= start:
        raise InvalidInput("end must be after start", details=[{"path": "end", "message": "not after start"}])
    if start.year < 1970 or end.year > 9000:
        # croniter's arithmetic overflows near datetime's limits; no schedule slot lies there.
        raise InvalidInput("start and end must lie between 1970 and 9000",
                           details=[{"path": "start", "message": "out of range"}])

    def work(conn: Connection) -> dict[str, Any]:
        current = pipeline_store.get_current(conn, workspace_id, pipeline_id)
        if current is None:
            raise NotFound(f"pipeline '{pipeline_id}' not found")
        definition = PipelineDefinition.model_validate(current["definition"])
        if not definition.schedule:
            raise InvalidInput(f"pipeline '{pipeline_id}' has no schedule: a backfill replays schedule slots")
        if end > db_now(conn):
            raise InvalidInput("end is in the future: a backfill covers slots that have passed",
                               details=[{"path": "end", "message": "in the future"}])
        slots = slots_in_range(definition, start, end)
        if len(slots) > MAX_BACKFILL_SLOTS:
            raise InvalidInput(f"the range holds more than {MAX_BACKFILL_SLOTS} slots; backfill a shorter range",
                               details=[{"path": "end", "message": "too many slots"}])
        outcomes = {r["slot"]: r for r in backfill_store.slot_outcomes(conn, workspace_id, pipeline_id, slots)}
        plans = plan(slots, outcomes, reprocess)
        result: dict[str, Any] = {"pipeline": pipeline_id, "dry_run": dry_run, "slots": [p.to_dict() for p in plans],
                                  "runs": 0, "skipped": sum(1 for p in plans if p.action == "skip")}
        if dry_run:
            return result
        backfill_id = uuid.uuid4()
        backfill_store.insert_backfill(
            conn, backfill_id, workspace_id, pipeline_id, start_at=start, end_at=end, versions=versions,
            max_active_runs=max_active_runs, reprocess=reprocess, created_by=actor,
        )
        run_ids = []
        for p in plans:
            if p.action != "run":
                continue
            run_id = create_run(
                conn, settings, workspace_id, current, versions=versions, params={}, trigger="schedule",
                triggered_by=f"backfill:{backfill_id}", scheduled_at=p.slot, queue_limit=max_active_runs,
            )
            assert run_id is not None  # no idempotency key and no schedule slot to collide with
            backfill_store.attach_run(conn, run_id, backfill_id)
            run_ids.append(run_id)
        return {**result, "id": backfill_id, "runs": len(run_ids), "run_ids": run_ids}

    return db.run_in_transaction(work)


def get_backfill(db: Database, workspace_id: str, backfill_id: uuid.UUID) -> tuple[Row, list[Row]]:
    with db.connection() as conn:
        row = backfill_store.get_backfill(conn, workspace_id, backfill_id)
        if row is None:
            raise NotFound(f"backfill '{backfill_id}' not found")
        runs = backfill_store.runs_of(conn, backfill_id)
    if row["status"] == "running" and all(r["status"] not in ("pending", "running") for r in runs):
        row["status"] = "completed"
    return row, runs


def cancel_backfill(db: Database, workspace_id: str, backfill_id: uuid.UUID, *, actor: str) -> int:
    """Cancel the backfill and every run of it not finished yet (queued ones included)."""

    def work(conn: Connection) -> int:
        if backfill_store.mark_cancelled(conn, workspace_id, backfill_id) is None:
            if backfill_store.get_backfill(conn, workspace_id, backfill_id) is None:
                raise NotFound(f"backfill '{backfill_id}' not found")
            raise Conflict(f"backfill '{backfill_id}' was already cancelled")
        cancelled = 0
        for run in backfill_store.open_runs_of(conn, backfill_id):
            if cancel_run_in(conn, run["id"], f"backfill cancelled by {actor}", workspace_id=workspace_id,
                             pipeline_id=str(run["pipeline_id"])):
                cancelled += 1
        return cancelled

    return db.run_in_transaction(work)
