"""The dead-letter queue: tasks that ran out of attempts, kept for a person to retry or purge."""

from __future__ import annotations

import uuid
from datetime import datetime

from orchestrator.db.connection import Connection, Row

_COLUMNS = """id, workspace_id, pipeline_id, run_id, task_id, node_id, version, task_name, inputs, attempts,
    error, code_version, created_at, retried_at"""


def list_dead_letters(
    conn: Connection, workspace_id: str, *, pipeline_id: str | None, include_retried: bool, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    before_at, before_id = before if before else (None, None)
    return conn.execute(
        f"""SELECT {_COLUMNS} FROM dead_letters
            WHERE workspace_id = %s AND (%s::text IS NULL OR pipeline_id = %s)
              AND (%s OR retried_at IS NULL)
              AND (%s::timestamptz IS NULL OR (created_at, id) < (%s, %s::uuid))
            ORDER BY created_at DESC, id DESC LIMIT %s""",
        (workspace_id, pipeline_id, pipeline_id, include_retried, before_at, before_at, before_id, limit),
    ).fetchall()


def mark_retried(conn: Connection, workspace_id: str, entry_id: uuid.UUID) -> Row | None:
    """Close an open entry; only one of two racing retries gets the row back."""
    return conn.execute(
        f"""UPDATE dead_letters SET retried_at = tw_now()
            WHERE workspace_id = %s AND id = %s AND retried_at IS NULL RETURNING {_COLUMNS}""",
        (workspace_id, entry_id),
    ).fetchone()


def get_entry(conn: Connection, workspace_id: str, entry_id: uuid.UUID) -> Row | None:
    return conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters WHERE workspace_id = %s AND id = %s", (workspace_id, entry_id)
    ).fetchone()


def purge_older_than(conn: Connection, workspace_id: str, days: int) -> int:
    rows = conn.execute(
        """DELETE FROM dead_letters WHERE workspace_id = %s AND created_at < tw_now() - make_interval(days => %s)
           RETURNING id""",
        (workspace_id, days),
    ).fetchall()
    return len(rows)


def purge_expired(conn: Connection, retention_days: int, limit: int) -> int:
    """The tick's retention: at most `limit` entries older than `retention_days`, oldest first,
    whatever their workspace (dead_letters_created_idx). SKIP LOCKED: two ticks purge different
    entries, and an entry being retried is left for the next tick."""
    rows = conn.execute(
        """DELETE FROM dead_letters WHERE id IN (
               SELECT id FROM dead_letters
               WHERE created_at < tw_now() - make_interval(days => %s)
               ORDER BY created_at
               LIMIT %s
               FOR UPDATE SKIP LOCKED)
           RETURNING id""",
        (retention_days, limit),
    ).fetchall()
    return len(rows)


def revive_task(conn: Connection, task_id: uuid.UUID) -> Row | None:
    """A dead-lettered task gets one more attempt: ready again, with its dispatch-failure count
    cleared. The caller closed its open entry first (mark_retried): a failed task with no open
    entry (a rejected approval, say) is never revived here."""
    return conn.execute(
        """UPDATE tasks SET status = 'ready', available_at = tw_now(), finished_at = NULL, dispatch_failures = 0,
                  dispatch_deferrals = 0, not_started_count = 0, not_started_since = NULL, max_attempts = attempt + 1
           WHERE id = %s AND status = 'failed'
           RETURNING id, run_id""",
        (task_id,),
    ).fetchone()


def close_for_tasks(conn: Connection, task_ids: list[uuid.UUID]) -> None:
    """Tasks redriven as part of their run: their open entries are settled by that retry."""
    if task_ids:
        conn.execute(
            "UPDATE dead_letters SET retried_at = tw_now() WHERE task_id = ANY(%s) AND retried_at IS NULL",
            (task_ids,),
        )
