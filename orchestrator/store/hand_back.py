"""Handing an attempt back: the worker that holds it stops before it finishes (`make dev`
shutting down), and the task goes back to `ready` to run again, without spending an attempt.

Kept apart from tasks.py so the transition reads on its own; one guarded statement per table,
like `record_dispatch_failure`, whose bookkeeping it shares (max_attempts grows by one so the
attempt history stays one row per delivery)."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


def hand_back_attempt(conn: Connection, task_id: uuid.UUID, attempt: int, error: dict[str, Any]) -> Row | None:
    """Back to ready now, if `attempt` is still the task's current, unfinished attempt; None
    otherwise (it finished, or a newer attempt owns the task: nothing to hand back). Its late
    heartbeats and callback are then refused like any stale attempt's."""
    row = conn.execute(
        """UPDATE tasks SET status = 'ready', claim_token = NULL, lease_expires_at = NULL,
                  max_attempts = max_attempts + 1, available_at = tw_now(), error = %(error)s,
                  progress = NULL, message = %(message)s
           WHERE id = %(id)s AND attempt = %(attempt)s AND status IN ('dispatched', 'running')
           RETURNING id, run_id, node_id, version, status, attempt, workspace_id, pipeline_id""",
        {"error": Jsonb(error), "message": str(error.get("message", ""))[:500], "id": task_id,
         "attempt": attempt},
    ).fetchone()
    if row is not None:
        # The attempt ended without an outcome: `cancelled` is the attempt status for that;
        # the error's code says why (`handed_back`).
        conn.execute(
            """UPDATE task_attempts SET status = 'cancelled', finished_at = tw_now(), error = %s
               WHERE task_id = %s AND attempt = %s AND status IN ('dispatched', 'running')""",
            (Jsonb(error), task_id, attempt),
        )
    return row
