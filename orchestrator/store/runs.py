"""Runs: creation with their tasks and edges, listing, and the counter that finishes a run."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


@dataclass(frozen=True)
class NewTask:
    id: uuid.UUID
    node_id: str
    version: str
    position: int
    kind: str
    task_name: str | None
    params: dict[str, Any]
    transport: str
    priority: int
    max_attempts: int
    retry: dict[str, Any]
    timeout_s: int | None
    heartbeat_s: int
    on_failure: str
    trigger_rule: str
    unfinished_deps: int


@dataclass(frozen=True)
class NewRun:
    id: uuid.UUID
    workspace_id: str
    pipeline_id: str
    pipeline_version: int
    trigger: str
    triggered_by: str | None
    idempotency_key: str | None
    params: dict[str, Any]
    versions: list[str]
    scheduled_at: datetime | None = None
    trigger_source_execution_id: uuid.UUID | None = None
    trigger_source_pipeline_id: str | None = None


def insert_run(conn: Connection, run: NewRun, task_count: int) -> uuid.UUID | None:
    """Insert a running run; None when its idempotency key was used before (see find_by_idempotency_key)."""
    row = conn.execute(
        """INSERT INTO runs (id, workspace_id, pipeline_id, pipeline_version, status, trigger,
                             trigger_source_execution_id, trigger_source_pipeline_id, scheduled_at,
                             triggered_by, idempotency_key, params, versions, unfinished_tasks, started_at)
           VALUES (%s, %s, %s, %s, 'running', %s, %s, %s, %s, %s, %s, %s, %s, %s, tw_now())
           ON CONFLICT (workspace_id, pipeline_id, idempotency_key) WHERE idempotency_key IS NOT NULL
           DO NOTHING
           RETURNING id""",
        (run.id, run.workspace_id, run.pipeline_id, run.pipeline_version, run.trigger,
         run.trigger_source_execution_id, run.trigger_source_pipeline_id, run.scheduled_at,
         run.triggered_by, run.idempotency_key, Jsonb(run.params), run.versions, task_count),
    ).fetchone()
    return None if row is None else row["id"]


def find_by_idempotency_key(conn: Connection, workspace_id: str, pipeline_id: str, key: str) -> Row | None:
    return conn.execute(
        "SELECT id FROM runs WHERE workspace_id = %s AND pipeline_id = %s AND idempotency_key = %s",
        (workspace_id, pipeline_id, key),
    ).fetchone()


def insert_tasks(conn: Connection, run: NewRun, tasks: Sequence[NewTask]) -> None:
    """All tasks of a run in one statement (unnest of column arrays): a 10,000-node run is one round trip."""
    conn.execute(
        """INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind, task_name,
                              params, transport, status, priority, max_attempts, retry, timeout_s,
                              heartbeat_s, on_failure, trigger_rule, unfinished_deps)
           SELECT t.id, %s, %s, %s, t.node_id, t.version, t.position, t.kind, t.task_name, t.params, t.transport,
                  CASE WHEN t.unfinished_deps = 0 THEN 'ready' ELSE 'pending' END,
                  t.priority, t.max_attempts, t.retry, t.timeout_s, t.heartbeat_s, t.on_failure,
                  t.trigger_rule, t.unfinished_deps
           FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::jsonb[], %s::text[],
                       %s::int[], %s::int[], %s::jsonb[], %s::int[], %s::int[], %s::text[], %s::text[],
                       %s::int[])
             AS t(id, node_id, version, position, kind, task_name, params, transport, priority, max_attempts, retry,
                  timeout_s, heartbeat_s, on_failure, trigger_rule, unfinished_deps)""",
        (
            run.id, run.workspace_id, run.pipeline_id,
            [t.id for t in tasks], [t.node_id for t in tasks], [t.version for t in tasks], [t.position for t in tasks],
            [t.kind for t in tasks], [t.task_name for t in tasks], [Jsonb(t.params) for t in tasks],
            [t.transport for t in tasks], [t.priority for t in tasks], [t.max_attempts for t in tasks],
            [Jsonb(t.retry) for t in tasks], [t.timeout_s for t in tasks], [t.heartbeat_s for t in tasks],
            [t.on_failure for t in tasks], [t.trigger_rule for t in tasks], [t.unfinished_deps for t in tasks],
        ),
    )


def insert_edges(conn: Connection, edges: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> None:
    if not edges:
        return
    conn.execute(
        """INSERT INTO task_edges (upstream_task_id, downstream_task_id)
           SELECT * FROM unnest(%s::uuid[], %s::uuid[])""",
        ([e[0] for e in edges], [e[1] for e in edges]),
    )


def finish_tasks_of_run(
    conn: Connection, run_id: uuid.UUID, *, finished: int, failed: int, stop: bool, error: str | None
) -> Row | None:
    """Count `finished` terminal tasks (of which `failed` untolerated) against the run.

    The statement that takes `unfinished_tasks` to 0 decides the final status; `stop` fails the
    run at once (its remaining tasks were skipped in the same transaction). A run already
    terminal keeps its status. Returns its status and unfinished count after.
    """
    return conn.execute(
        """UPDATE runs r SET
               unfinished_tasks = r.unfinished_tasks - %(finished)s,
               failed_tasks = r.failed_tasks + %(failed)s,
               status = CASE
                   WHEN r.status IN ('succeeded', 'failed', 'cancelled') THEN r.status
                   WHEN %(stop)s THEN 'failed'
                   WHEN r.unfinished_tasks - %(finished)s = 0 THEN
                       CASE WHEN r.failed_tasks + %(failed)s > 0 THEN 'failed' ELSE 'succeeded' END
                   ELSE r.status END,
               finished_at = CASE
                   WHEN r.finished_at IS NULL AND (%(stop)s OR r.unfinished_tasks - %(finished)s = 0)
                   THEN tw_now() ELSE r.finished_at END,
               error = COALESCE(r.error, %(error)s)
           WHERE r.id = %(run_id)s
           RETURNING r.status, r.unfinished_tasks""",
        {"finished": finished, "failed": failed, "stop": stop, "error": error, "run_id": run_id},
    ).fetchone()


def get_run(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """SELECT id, workspace_id, pipeline_id, pipeline_version, status, trigger,
                  trigger_source_execution_id, trigger_source_pipeline_id, scheduled_at, triggered_by,
                  idempotency_key, params, versions, unfinished_tasks, failed_tasks, error,
                  created_at, started_at, finished_at
           FROM runs WHERE workspace_id = %s AND id = %s""",
        (workspace_id, run_id),
    ).fetchone()


def list_runs(
    conn: Connection, workspace_id: str, *, pipeline_id: str | None, status: str | None, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """Newest first, keyset-paginated on (created_at, id)."""
    before_at, before_id = before if before else (None, None)
    return conn.execute(
        """SELECT id, pipeline_id, pipeline_version, status, trigger, scheduled_at, triggered_by,
                  versions, unfinished_tasks, failed_tasks, error, created_at, started_at, finished_at
           FROM runs
           WHERE workspace_id = %s
             AND (%s::text IS NULL OR pipeline_id = %s)
             AND (%s::text IS NULL OR status = %s)
             AND (%s::timestamptz IS NULL OR (created_at, id) < (%s, %s::uuid))
           ORDER BY created_at DESC, id DESC
           LIMIT %s""",
        (workspace_id, pipeline_id, pipeline_id, status, status, before_at, before_at, before_id, limit),
    ).fetchall()
