"""Schedules: rows kept in step with a pipeline's `schedule`, claimed by the tick when due."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from orchestrator.db.connection import Connection, Row

_COLUMNS = """id, workspace_id, pipeline_id, position, cron, timezone, catchup, max_catchup_runs, overlap,
    jitter_s, start_at, end_at, state, next_slot, next_fire_at, last_fired_slot, last_fired_at,
    created_at, updated_at"""


@dataclass(frozen=True)
class ScheduleSpec:
    position: int
    cron: str
    timezone: str
    catchup: str
    max_catchup_runs: int
    overlap: str
    jitter_s: int
    start_at: datetime | None
    end_at: datetime | None


def db_now(conn: Connection) -> datetime:
    row = conn.execute("SELECT tw_now() AS now").fetchone()
    assert row is not None
    now: datetime = row["now"]
    return now


def lock_for_pipeline(conn: Connection, workspace_id: str, pipeline_id: str) -> list[Row]:
    return conn.execute(
        f"SELECT {_COLUMNS} FROM schedules WHERE workspace_id = %s AND pipeline_id = %s ORDER BY position FOR UPDATE",
        (workspace_id, pipeline_id),
    ).fetchall()


def insert_schedule(
    conn: Connection, schedule_id: uuid.UUID, workspace_id: str, pipeline_id: str, spec: ScheduleSpec, *, state: str,
    next_slot: datetime | None, next_fire_at: datetime | None,
) -> None:
    conn.execute(
        """INSERT INTO schedules (id, workspace_id, pipeline_id, position, cron, timezone, catchup, max_catchup_runs,
                                  overlap, jitter_s, start_at, end_at, state, next_slot, next_fire_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (schedule_id, workspace_id, pipeline_id, spec.position, spec.cron, spec.timezone, spec.catchup, spec.max_catchup_runs,
         spec.overlap, spec.jitter_s, spec.start_at, spec.end_at, state, next_slot, next_fire_at),
    )


def update_schedule(
    conn: Connection, schedule_id: uuid.UUID, spec: ScheduleSpec, *, state: str,
    next_slot: datetime | None, next_fire_at: datetime | None,
) -> None:
    conn.execute(
        """UPDATE schedules SET cron = %s, timezone = %s, catchup = %s, max_catchup_runs = %s, overlap = %s,
                  jitter_s = %s, start_at = %s, end_at = %s, state = %s, next_slot = %s, next_fire_at = %s,
                  updated_at = tw_now()
           WHERE id = %s""",
        (spec.cron, spec.timezone, spec.catchup, spec.max_catchup_runs, spec.overlap, spec.jitter_s,
         spec.start_at, spec.end_at, state, next_slot, next_fire_at, schedule_id),
    )


def delete_schedules(conn: Connection, ids: Sequence[uuid.UUID]) -> None:
    if ids:
        conn.execute("DELETE FROM schedules WHERE id = ANY(%s)", (list(ids),))


def claim_due(conn: Connection, limit: int) -> list[Row]:
    """Due schedules, locked with their pipeline rows; concurrent ticks skip each other's rows.

    Lock order: a pipeline row before its schedule rows, as a pipeline update or pause takes
    them (pipeline, then its schedules). Taking both here with SKIP LOCKED means the tick never
    waits for a pipeline while holding one of its schedules: a schedule whose pipeline is being
    updated is simply fired by the next tick, instead of a deadlock."""
    columns = ", ".join(f"s.{c.strip()}" for c in _COLUMNS.split(","))
    return conn.execute(
        f"""SELECT {columns} FROM schedules s
            JOIN pipelines p ON p.workspace_id = s.workspace_id AND p.id = s.pipeline_id
            -- A deleted pipeline has no schedules left (its delete removed them under the same
            -- row locks); the filter is the guard, and costs nothing: p is read by primary key.
            WHERE s.state = 'active' AND s.next_fire_at <= tw_now() AND p.deleted_at IS NULL
            ORDER BY s.next_fire_at
            LIMIT %s
            FOR UPDATE OF p, s SKIP LOCKED""",
        (limit,),
    ).fetchall()


def advance(
    conn: Connection, schedule_id: uuid.UUID, *, next_slot: datetime | None, next_fire_at: datetime | None,
    fired_slot: datetime | None, ended: bool,
) -> None:
    conn.execute(
        """UPDATE schedules SET next_slot = %s, next_fire_at = %s,
                  last_fired_slot = COALESCE(%s, last_fired_slot),
                  last_fired_at = CASE WHEN %s::timestamptz IS NULL THEN last_fired_at ELSE tw_now() END,
                  state = CASE WHEN %s THEN 'ended' ELSE state END, updated_at = tw_now()
           WHERE id = %s AND state = 'active'""",
        (next_slot, next_fire_at, fired_slot, fired_slot, ended, schedule_id),
    )


def record_skip(conn: Connection, schedule_id: uuid.UUID, slot: datetime, reason: str) -> None:
    conn.execute(
        """INSERT INTO schedule_skips (schedule_id, slot, reason) VALUES (%s, %s, %s)
           ON CONFLICT (schedule_id, slot) DO NOTHING""",
        (schedule_id, slot, reason),
    )


def set_pipeline_paused(conn: Connection, workspace_id: str, pipeline_id: str, paused: bool) -> Row | None:
    """Pause or resume a pipeline and its schedules; resumed schedules keep their overdue
    next_fire_at, so the next tick applies their catch-up policy to the slots missed meanwhile."""
    row = conn.execute(
        """UPDATE pipelines SET paused = %s, updated_at = tw_now()
           WHERE workspace_id = %s AND id = %s AND deleted_at IS NULL RETURNING id, paused""",
        (paused, workspace_id, pipeline_id),
    ).fetchone()
    if row is not None:
        conn.execute(
            """UPDATE schedules SET state = %s, updated_at = tw_now()
               WHERE workspace_id = %s AND pipeline_id = %s AND state = %s""",
            ("paused" if paused else "active", workspace_id, pipeline_id, "active" if paused else "paused"),
        )
    return row


def delete_for_pipeline(conn: Connection, workspace_id: str, pipeline_id: str) -> int:
    """A deleted pipeline's schedules go (their skips with them; its runs keep trigger=schedule
    and scheduled_at, their schedule_id is set NULL by the foreign key)."""
    rows = conn.execute(
        "DELETE FROM schedules WHERE workspace_id = %s AND pipeline_id = %s RETURNING id",
        (workspace_id, pipeline_id),
    ).fetchall()
    return len(rows)


def list_schedules(conn: Connection, workspace_id: str, pipeline_ids: Sequence[str] | None = None) -> list[Row]:
    return conn.execute(
        f"""SELECT {_COLUMNS},
                   (SELECT count(*) FROM schedule_skips k WHERE k.schedule_id = s.id) AS skipped_slots
            FROM schedules s
            WHERE workspace_id = %s AND (%s::text[] IS NULL OR pipeline_id = ANY(%s::text[]))
            ORDER BY pipeline_id, position""",
        (workspace_id, pipeline_ids, pipeline_ids),
    ).fetchall()


def list_skips(conn: Connection, schedule_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        "SELECT slot, reason, recorded_at FROM schedule_skips WHERE schedule_id = %s ORDER BY slot", (schedule_id,)
    ).fetchall()
