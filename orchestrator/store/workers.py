"""Worker registrations, task routing and the code history of task names."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


def upsert_worker(
    conn: Connection, workspace_id: str, service: str, version: str, transport: str, endpoint: str
) -> None:
    conn.execute(
        """INSERT INTO workers (workspace_id, service, version, transport, endpoint)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (workspace_id, service) DO UPDATE SET version = EXCLUDED.version,
               transport = EXCLUDED.transport, endpoint = EXCLUDED.endpoint,
               registered_at = tw_now(), last_seen_at = tw_now()""",
        (workspace_id, service, version, transport, endpoint),
    )


def route_task(
    conn: Connection, workspace_id: str, task_name: str, service: str, code_hash: str,
    input_schema: dict[str, Any] | None,
) -> None:
    conn.execute(
        """INSERT INTO worker_tasks (workspace_id, task_name, service, code_hash, input_schema)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (workspace_id, task_name) DO UPDATE SET service = EXCLUDED.service,
               code_hash = EXCLUDED.code_hash, input_schema = EXCLUDED.input_schema, registered_at = tw_now()""",
        (workspace_id, task_name, service, code_hash, Jsonb(input_schema) if input_schema is not None else None),
    )


def record_code_version(
    conn: Connection, workspace_id: str, task_name: str, code_hash: str, service: str, service_version: str
) -> bool:
    """True when this hash is new for the task name (a new code version)."""
    row = conn.execute(
        """INSERT INTO task_code_versions (workspace_id, task_name, code_hash, service, service_version)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (workspace_id, task_name, code_hash) DO NOTHING RETURNING task_name""",
        (workspace_id, task_name, code_hash, service, service_version),
    ).fetchone()
    return row is not None


def note_seen(conn: Connection, workspace_id: str, task_names: Sequence[str], every_s: float) -> int:
    """The workers serving these task names were heard from now; a worker seen within the last
    `every_s` seconds is left as it is (no write: at most one per worker per `every_s`, whatever
    the number of API processes). Returns the workers updated."""
    rows = conn.execute(
        """UPDATE workers w SET last_seen_at = tw_now()
           FROM (SELECT DISTINCT service FROM worker_tasks WHERE workspace_id = %s AND task_name = ANY(%s)) t
           WHERE w.workspace_id = %s AND w.service = t.service
             AND w.last_seen_at < tw_now() - make_interval(secs => %s)
           RETURNING w.service""",
        (workspace_id, list(task_names), workspace_id, every_s),
    ).fetchall()
    return len(rows)


def list_workers(conn: Connection, workspace_id: str, stale_after_s: int) -> list[Row]:
    """Registered workers with their health: "stale" when not heard from (registration,
    heartbeat, callback) for more than `stale_after_s` seconds, by database time."""
    return conn.execute(
        """SELECT w.service, w.version, w.transport, w.endpoint, w.registered_at, w.last_seen_at,
                  CASE WHEN w.last_seen_at >= tw_now() - make_interval(secs => %s) THEN 'healthy' ELSE 'stale' END
                      AS health,
                  COALESCE(jsonb_agg(jsonb_build_object('name', t.task_name, 'code_hash', t.code_hash,
                                                        'input_schema', t.input_schema)
                                     ORDER BY t.task_name) FILTER (WHERE t.task_name IS NOT NULL),
                           '[]'::jsonb) AS tasks
           FROM workers w LEFT JOIN worker_tasks t ON t.workspace_id = w.workspace_id AND t.service = w.service
           WHERE w.workspace_id = %s
           GROUP BY w.workspace_id, w.service ORDER BY w.service""",
        (stale_after_s, workspace_id),
    ).fetchall()


def code_history(conn: Connection, workspace_id: str, task_name: str) -> list[Row]:
    return conn.execute(
        """SELECT code_hash, service, service_version, first_seen_at FROM task_code_versions
           WHERE workspace_id = %s AND task_name = %s ORDER BY first_seen_at, code_hash""",
        (workspace_id, task_name),
    ).fetchall()


def routes_for(conn: Connection, keys: Sequence[tuple[str, str]]) -> list[Row]:
    """Registered routes of (workspace, task name) pairs: transport, endpoint and code hash."""
    if not keys:
        return []
    return conn.execute(
        """SELECT t.workspace_id, t.task_name, t.code_hash, w.transport, w.endpoint
           FROM worker_tasks t JOIN workers w ON w.workspace_id = t.workspace_id AND w.service = t.service
           WHERE (t.workspace_id, t.task_name) IN (SELECT * FROM unnest(%s::text[], %s::text[]))""",
        ([k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()


def record_dispatched_code(conn: Connection, code: Sequence[tuple[uuid.UUID, int, str]]) -> None:
    """The code version each claimed attempt goes to, on the task and on its attempt row."""
    if not code:
        return
    ids, attempts, hashes = [c[0] for c in code], [c[1] for c in code], [c[2] for c in code]
    conn.execute(
        """UPDATE tasks t SET code_version = c.code
           FROM unnest(%s::uuid[], %s::text[]) AS c(id, code) WHERE t.id = c.id""",
        (ids, hashes),
    )
    conn.execute(
        """UPDATE task_attempts a SET code_version = c.code
           FROM unnest(%s::uuid[], %s::int[], %s::text[]) AS c(id, attempt, code)
           WHERE a.task_id = c.id AND a.attempt = c.attempt""",
        (ids, attempts, hashes),
    )
