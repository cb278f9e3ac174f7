"""Pipelines and their immutable versions."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


def insert_pipeline(
    conn: Connection, *, workspace_id: str, pipeline_id: str, sha256: str, definition: dict[str, Any],
    created_by: str | None,
) -> int | None:
    """Create a pipeline; its version number, or None if a live pipeline has the id.

    A new id starts at version 1. A deleted pipeline's id is revived: the row is live again
    (unpaused, created now) at the next version number, so the versions its old runs pin stay
    where they are."""
    created = conn.execute(
        """INSERT INTO pipelines (workspace_id, id, current_version) VALUES (%s, %s, 1)
           ON CONFLICT (workspace_id, id) DO UPDATE
               SET deleted_at = NULL, paused = false, current_version = pipelines.current_version + 1,
                   created_at = tw_now(), updated_at = tw_now()
               WHERE pipelines.deleted_at IS NOT NULL
           RETURNING current_version""",
        (workspace_id, pipeline_id),
    ).fetchone()
    if created is None:
        return None
    version = int(created["current_version"])
    insert_version(conn, workspace_id=workspace_id, pipeline_id=pipeline_id, version=version, sha256=sha256,
                   definition=definition, created_by=created_by)
    return version


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
           WHERE p.workspace_id = %s AND p.id = %s AND p.deleted_at IS NULL
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
           WHERE p.workspace_id = %s AND p.id = %s AND p.deleted_at IS NULL""",
        (workspace_id, pipeline_id),
    ).fetchone()


def list_with_stats(conn: Connection, workspace_id: str, *, limit: int, after_id: str | None) -> list[Row]:
    """Pipelines in id order with use counts and runs by status (one grouped scan of their runs)."""
    return conn.execute(
        """SELECT p.id, p.current_version AS version, p.paused, p.created_at, p.updated_at, v.sha256,
                  v.definition->>'description' AS description, v.definition->>'name' AS name,
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
           WHERE p.workspace_id = %s AND p.deleted_at IS NULL AND (%s::text IS NULL OR p.id > %s)
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
    """Serialize decisions that count a pipeline's runs (limits, overlap) on the pipeline row.
    None when there is no live pipeline (a deleted one is locked all the same)."""
    return conn.execute(
        """SELECT id, paused, deleted_at FROM pipelines WHERE workspace_id = %s AND id = %s FOR UPDATE""",
        (workspace_id, pipeline_id),
    ).fetchone()


def hold_live(conn: Connection, workspace_id: str, pipeline_id: str) -> bool:
    """Hold the pipeline row against a delete until commit; False when it is deleted (or gone).

    FOR KEY SHARE: triggers of one pipeline do not wait for each other (nor for an update of
    its version or pause), only for a delete, which locks the row FOR UPDATE. A run is
    therefore created either before a delete looks for active runs, or not at all: once the
    delete commits, this re-reads the row and sees deleted_at."""
    return conn.execute(
        """SELECT 1 FROM pipelines WHERE workspace_id = %s AND id = %s AND deleted_at IS NULL FOR KEY SHARE""",
        (workspace_id, pipeline_id),
    ).fetchone() is not None


def lock_for_delete(conn: Connection, workspace_id: str, pipeline_id: str) -> Row | None:
    """The live pipeline row locked FOR UPDATE (waits for triggers holding it, blocks new ones)."""
    return conn.execute(
        """SELECT id, current_version FROM pipelines
           WHERE workspace_id = %s AND id = %s AND deleted_at IS NULL FOR UPDATE""",
        (workspace_id, pipeline_id),
    ).fetchone()


def mark_deleted(conn: Connection, workspace_id: str, pipeline_id: str) -> None:
    """Deleted now: gone from every list and lookup; its schedules and graph edges go with it
    (the caller removes them in the same transaction), its versions stay for its runs."""
    conn.execute(
        """UPDATE pipelines SET deleted_at = tw_now(), updated_at = tw_now(), max_active_tasks = NULL,
                  declared_outputs = '{}'
           WHERE workspace_id = %s AND id = %s AND deleted_at IS NULL""",
        (workspace_id, pipeline_id),
    )


def active_run_ids(conn: Connection, workspace_id: str, pipeline_id: str) -> list[Row]:
    """Pending and running runs of a pipeline, oldest first (runs_pipeline_open_idx)."""
    return conn.execute(
        """SELECT id, status FROM runs
           WHERE workspace_id = %s AND pipeline_id = %s AND status IN ('pending', 'running')
           ORDER BY created_at, id""",
        (workspace_id, pipeline_id),
    ).fetchall()


def dependants(conn: Connection, workspace_id: str, pipeline_id: str) -> list[str]:
    """Live pipelines whose pipeline-level `depends` name this one, in id order."""
    rows = conn.execute(
        """SELECT d.pipeline_id FROM pipeline_dependencies d
           JOIN pipelines p ON p.workspace_id = d.workspace_id AND p.id = d.pipeline_id AND p.deleted_at IS NULL
           WHERE d.workspace_id = %s AND d.upstream_pipeline_id = %s AND d.pipeline_id <> d.upstream_pipeline_id
           ORDER BY d.pipeline_id""",
        (workspace_id, pipeline_id),
    ).fetchall()
    return [str(r["pipeline_id"]) for r in rows]


def delete_dependencies(conn: Connection, workspace_id: str, pipeline_id: str) -> None:
    """The pipeline's own `depends` edges (a revived pipeline stores its new ones)."""
    conn.execute(
        "DELETE FROM pipeline_dependencies WHERE workspace_id = %s AND pipeline_id = %s",
        (workspace_id, pipeline_id),
    )


def set_task_limit(conn: Connection, workspace_id: str, pipeline_id: str, max_active_tasks: int | None) -> None:
    conn.execute(
        "UPDATE pipelines SET max_active_tasks = %s WHERE workspace_id = %s AND id = %s",
        (max_active_tasks, workspace_id, pipeline_id),
    )
