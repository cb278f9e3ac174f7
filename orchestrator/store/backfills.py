"""Backfills and the runs they created."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from orchestrator.db.connection import Connection, Row

_COLUMNS = """id, workspace_id, pipeline_id, start_at, end_at, versions, max_active_runs, reprocess, status,
    created_by, created_at, cancelled_at"""


def insert_backfill(
    conn: Connection, backfill_id: uuid.UUID, workspace_id: str, pipeline_id: str, *, start_at: datetime,
    end_at: datetime, versions: list[str] | None, max_active_runs: int | None, reprocess: str,
    created_by: str | None,
) -> None:
    conn.execute(
        """INSERT INTO backfills (id, workspace_id, pipeline_id, start_at, end_at, versions, max_active_runs,
                                  reprocess, status, created_by)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'running', %s)""",
        (backfill_id, workspace_id, pipeline_id, start_at, end_at, versions, max_active_runs, reprocess, created_by),
    )


def slot_outcomes(conn: Connection, workspace_id: str, pipeline_id: str, slots: Sequence[datetime]) -> list[Row]:
    """For each slot that already has runs of the pipeline: whether one succeeded, and whether
    one is still pending or running."""
    if not slots:
        return []
    return conn.execute(
        """SELECT scheduled_at AS slot, bool_or(status = 'succeeded') AS succeeded,
                  bool_or(status IN ('pending', 'running')) AS active
           FROM runs WHERE workspace_id = %s AND pipeline_id = %s AND scheduled_at = ANY(%s)
           GROUP BY scheduled_at""",
        (workspace_id, pipeline_id, list(slots)),
    ).fetchall()


def attach_run(conn: Connection, run_id: uuid.UUID, backfill_id: uuid.UUID) -> None:
    conn.execute("UPDATE runs SET backfill_id = %s WHERE id = %s", (backfill_id, run_id))


def get_backfill(conn: Connection, workspace_id: str, backfill_id: uuid.UUID) -> Row | None:
    return conn.execute(
        f"SELECT {_COLUMNS} FROM backfills WHERE workspace_id = %s AND id = %s", (workspace_id, backfill_id)
    ).fetchone()


def runs_of(conn: Connection, backfill_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT id, scheduled_at, status, created_at, finished_at, failed_task_count AS failed_tasks,
                  (status = 'succeeded' AND failed_task_count > 0) AS succeeded_with_failures
           FROM runs WHERE backfill_id = %s ORDER BY scheduled_at""",
        (backfill_id,),
    ).fetchall()


def mark_cancelled(conn: Connection, workspace_id: str, backfill_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """UPDATE backfills SET status = 'cancelled', cancelled_at = tw_now()
           WHERE workspace_id = %s AND id = %s AND status = 'running' RETURNING id""",
        (workspace_id, backfill_id),
    ).fetchone()


def open_runs_of(conn: Connection, backfill_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        "SELECT id, pipeline_id FROM runs WHERE backfill_id = %s AND status IN ('pending', 'running') ORDER BY id",
        (backfill_id,),
    ).fetchall()
