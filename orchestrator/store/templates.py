"""Templates, their immutable versions, and the template versions pipeline versions resolved."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row


def insert_template(
    conn: Connection, *, workspace_id: str, template_id: str, sha256: str, body: dict[str, Any],
    created_by: str | None,
) -> bool:
    """Create a template at version 1; False if the id is taken in this workspace."""
    created = conn.execute(
        """INSERT INTO templates (workspace_id, id, current_version) VALUES (%s, %s, 1)
           ON CONFLICT (workspace_id, id) DO NOTHING RETURNING id""",
        (workspace_id, template_id),
    ).fetchone()
    if created is None:
        return False
    insert_version(conn, workspace_id=workspace_id, template_id=template_id, version=1, sha256=sha256,
                   body=body, created_by=created_by)
    return True


def insert_version(
    conn: Connection, *, workspace_id: str, template_id: str, version: int, sha256: str, body: dict[str, Any],
    created_by: str | None,
) -> None:
    conn.execute(
        """INSERT INTO template_versions (workspace_id, template_id, version, sha256, body, created_by)
           VALUES (%s, %s, %s, %s, %s, %s)""",
        (workspace_id, template_id, version, sha256, Jsonb(body), created_by),
    )


def lock_current(conn: Connection, workspace_id: str, template_id: str) -> Row | None:
    """The template row with its current version's sha256, locked against concurrent updates."""
    return conn.execute(
        """SELECT t.id, t.current_version, v.sha256
           FROM templates t
           JOIN template_versions v
             ON v.workspace_id = t.workspace_id AND v.template_id = t.id AND v.version = t.current_version
           WHERE t.workspace_id = %s AND t.id = %s
           FOR UPDATE OF t""",
        (workspace_id, template_id),
    ).fetchone()


def advance_version(conn: Connection, workspace_id: str, template_id: str) -> int:
    """Move current_version one up; the caller holds the row lock from `lock_current`."""
    row = conn.execute(
        """UPDATE templates SET current_version = current_version + 1, updated_at = tw_now()
           WHERE workspace_id = %s AND id = %s RETURNING current_version""",
        (workspace_id, template_id),
    ).fetchone()
    assert row is not None  # locked by the caller, so it exists
    return int(row["current_version"])


_CURRENT = """SELECT t.id, t.current_version AS version, t.created_at, t.updated_at, v.sha256, v.body,
                     v.body->>'description' AS description, v.body->>'task' AS task,
                     COALESCE(u.used_by, ARRAY[]::text[]) AS used_by
              FROM templates t
              JOIN template_versions v
                ON v.workspace_id = t.workspace_id AND v.template_id = t.id AND v.version = t.current_version
              LEFT JOIN LATERAL (
                  -- Pipelines whose current version uses any version of this template.
                  SELECT array_agg(DISTINCT r.pipeline_id ORDER BY r.pipeline_id) AS used_by
                  FROM pipeline_template_refs r
                  JOIN pipelines p
                    ON p.workspace_id = r.workspace_id AND p.id = r.pipeline_id
                   AND p.current_version = r.pipeline_version AND p.deleted_at IS NULL
                  WHERE r.workspace_id = t.workspace_id AND r.template_id = t.id
              ) u ON true"""


def get_current(conn: Connection, workspace_id: str, template_id: str) -> Row | None:
    return conn.execute(
        _CURRENT + " WHERE t.workspace_id = %s AND t.id = %s", (workspace_id, template_id)
    ).fetchone()


def list_current(conn: Connection, workspace_id: str, *, limit: int, after_id: str | None) -> list[Row]:
    return conn.execute(
        _CURRENT + """ WHERE t.workspace_id = %s AND (%s::text IS NULL OR t.id > %s)
                       ORDER BY t.id LIMIT %s""",
        (workspace_id, after_id, after_id, limit),
    ).fetchall()


def current_bodies(conn: Connection, workspace_id: str, template_ids: Iterable[str]) -> dict[str, Row]:
    """The current version (`version`, `sha256`, `body`) of each named template that exists."""
    rows = conn.execute(
        """SELECT t.id, t.current_version AS version, v.sha256, v.body
           FROM templates t
           JOIN template_versions v
             ON v.workspace_id = t.workspace_id AND v.template_id = t.id AND v.version = t.current_version
           WHERE t.workspace_id = %s AND t.id = ANY(%s)""",
        (workspace_id, sorted(set(template_ids))),
    ).fetchall()
    return {str(row["id"]): row for row in rows}


def record_resolution(
    conn: Connection, *, workspace_id: str, pipeline_id: str, pipeline_version: int,
    source_definition: dict[str, Any], refs: dict[str, tuple[str, int]],
) -> None:
    """Attach to a just-inserted pipeline version what it was written as and what it resolved.

    `refs` maps node id to (template id, template version).
    """
    conn.execute(
        """UPDATE pipeline_versions SET source_definition = %s
           WHERE workspace_id = %s AND pipeline_id = %s AND version = %s""",
        (Jsonb(source_definition), workspace_id, pipeline_id, pipeline_version),
    )
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO pipeline_template_refs
                   (workspace_id, pipeline_id, pipeline_version, node_id, template_id, template_version)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            [(workspace_id, pipeline_id, pipeline_version, node_id, template_id, version)
             for node_id, (template_id, version) in sorted(refs.items())],
        )


def pipeline_resolution(conn: Connection, workspace_id: str, pipeline_id: str) -> Row | None:
    """The current version's source definition and template refs ({node: {template, version}})."""
    return conn.execute(
        """SELECT p.current_version AS version, v.source_definition,
                  COALESCE((SELECT jsonb_object_agg(r.node_id,
                                   jsonb_build_object('template', r.template_id, 'version', r.template_version))
                            FROM pipeline_template_refs r
                            WHERE r.workspace_id = p.workspace_id AND r.pipeline_id = p.id
                              AND r.pipeline_version = p.current_version), '{}'::jsonb) AS templates
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           WHERE p.workspace_id = %s AND p.id = %s""",
        (workspace_id, pipeline_id),
    ).fetchone()
