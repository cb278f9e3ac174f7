"""Pipelines and their immutable versions."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


def insert_pipeline(
    conn: Connection, *, workspace_id: str, pipeline_id: str, sha256: str, definition: dict[str, Any],
    created_by: str | None,
) -> bool:
    """Create a pipeline at version 1; False if the id is taken in this workspace."""
    created = conn.execute(
        """INSERT INTO pipelines (workspace_id, id, current_version) VALUES (%s, %s, 1)
           ON CONFLICT (workspace_id, id) DO NOTHING RETURNING id""",
        (workspace_id, pipeline_id),
    ).fetchone()
    if created is None:
        return False
    insert_version(conn, workspace_id=workspace_id, pipeline_id=pipeline_id, version=1, sha256=sha256,
                   definition=definition, created_by=created_by)
    return True


def insert_version(
    conn: Connection, *, workspace_id: str, pipeline_id: str, version: int, sha256: str,
    definition: dict[str, Any], created_by: str | None,
) -> None:
    conn.execute(
        """INSERT INTO pipeline_versions (workspace_id, pipeline_id, version, sha256, definition, created_by)
           VALUES (%s, %s, %s, %s, %s, %s)""",
        (workspace_id, pipeline_id, version, sha256, Jsonb(definition), created_by),
    )


def lock_current(conn: Connection, workspace_id: str, pipeline_id: str) -> Row | None:
    """The pipeline row with its current version, locked against concurrent updates."""
    return conn.execute(
        """SELECT p.id, p.current_version, p.paused, v.sha256
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           WHERE p.workspace_id = %s AND p.id = %s
           FOR UPDATE OF p""",
        (workspace_id, pipeline_id),
    ).fetchone()


def set_current_version(conn: Connection, workspace_id: str, pipeline_id: str, expected: int) -> int | None:
    """Advance current_version from `expected`; None if another writer moved it first."""
    row = conn.execute(
        """UPDATE pipelines SET current_version = current_version + 1, updated_at = tw_now()
           WHERE workspace_id = %s AND id = %s AND current_version = %s
           RETURNING current_version""",
        (workspace_id, pipeline_id, expected),
    ).fetchone()
    return None if row is None else int(row["current_version"])


def get_current(conn: Connection, workspace_id: str, pipeline_id: str) -> Row | None:
    return conn.execute(
        """SELECT p.id, p.current_version AS version, p.paused, p.created_at, p.updated_at,
                  v.sha256, v.definition
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           WHERE p.workspace_id = %s AND p.id = %s""",
        (workspace_id, pipeline_id),
    ).fetchone()


def list_with_stats(conn: Connection, workspace_id: str, *, limit: int, after_id: str | None) -> list[Row]:
    """Pipelines in id order with use counts and runs by status (one grouped scan of their runs)."""
    return conn.execute(
        """SELECT p.id, p.current_version AS version, p.paused, p.created_at, p.updated_at, v.sha256,
                  v.definition->>'description' AS description,
                  COALESCE(s.use_count, 0) AS use_count, s.last_used_at,
                  COALESCE(s.by_status, '{}'::jsonb) AS runs_by_status
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           LEFT JOIN LATERAL (
               SELECT sum(n)::int AS use_count, max(last_at) AS last_used_at,
                      jsonb_object_agg(status, n) AS by_status
               FROM (SELECT status, count(*) AS n, max(created_at) AS last_at
                     FROM runs r WHERE r.workspace_id = p.workspace_id AND r.pipeline_id = p.id
                     GROUP BY status) g
           ) s ON true
           WHERE p.workspace_id = %s AND (%s::text IS NULL OR p.id > %s)
           ORDER BY p.id
           LIMIT %s""",
        (workspace_id, after_id, after_id, limit),
    ).fetchall()


def get_version(conn: Connection, workspace_id: str, pipeline_id: str, version: int) -> Row | None:
    return conn.execute(
        """SELECT version, sha256, definition FROM pipeline_versions
           WHERE workspace_id = %s AND pipeline_id = %s AND version = %s""",
        (workspace_id, pipeline_id, version),
    ).fetchone()


def run_stats(conn: Connection, workspace_id: str, pipeline_id: str) -> Row:
    row = conn.execute(
        """SELECT COALESCE(sum(n), 0)::int AS use_count, max(last_at) AS last_used_at,
                  COALESCE(jsonb_object_agg(status, n) FILTER (WHERE status IS NOT NULL), '{}'::jsonb)
                      AS runs_by_status
           FROM (SELECT status, count(*) AS n, max(created_at) AS last_at FROM runs
                 WHERE workspace_id = %s AND pipeline_id = %s GROUP BY status) g""",
        (workspace_id, pipeline_id),
    ).fetchone()
    assert row is not None
    return row


def lock_pipeline(conn: Connection, workspace_id: str, pipeline_id: str) -> Row | None:
    """Serialize decisions that count a pipeline's runs (limits, overlap) on the pipeline row."""
    return conn.execute(
        "SELECT id, paused FROM pipelines WHERE workspace_id = %s AND id = %s FOR UPDATE",
        (workspace_id, pipeline_id),
    ).fetchone()


def set_task_limit(conn: Connection, workspace_id: str, pipeline_id: str, max_active_tasks: int | None) -> None:
    conn.execute(
        "UPDATE pipelines SET max_active_tasks = %s WHERE workspace_id = %s AND id = %s",
        (max_active_tasks, workspace_id, pipeline_id),
    )
