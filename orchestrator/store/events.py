"""Events posted to the API, the runs they started, and the pipeline definitions events touch."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row

# Arbitrary int4 constant, the first key of the advisory lock that serializes changes to one
# workspace's event-trigger graph (the second key is a hash of the workspace id).
EVENT_GRAPH_LOCK_CLASS = 731_025


def insert_event(
    conn: Connection,
    *,
    workspace_id: str,
    event_id: str,
    name: str,
    payload: dict[str, Any],
    received_by: str | None,
) -> bool:
    """Record an event; False when its id is already taken in this workspace.

    On a concurrent insert of the same id this waits for the other transaction: if it commits,
    the answer is False and later statements of this transaction (read committed) see its rows.
    """
    row = conn.execute(
        """INSERT INTO events (workspace_id, id, name, payload, received_by)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (workspace_id, id) DO NOTHING
           RETURNING id""",
        (workspace_id, event_id, name, Jsonb(payload), received_by),
    ).fetchone()
    return row is not None


def get_event(conn: Connection, workspace_id: str, event_id: str) -> Row | None:
    return conn.execute(
        """SELECT id, name, payload, received_by, received_at FROM events
           WHERE workspace_id = %s AND id = %s""",
        (workspace_id, event_id),
    ).fetchone()


def set_run_event(conn: Connection, workspace_id: str, run_id: uuid.UUID, event_id: str) -> None:
    """Point a run, created in this transaction by the event, at the event record."""
    conn.execute(
        "UPDATE runs SET event_id = %s WHERE workspace_id = %s AND id = %s",
        (event_id, workspace_id, run_id),
    )


def runs_of_event(conn: Connection, workspace_id: str, event_id: str) -> list[Row]:
    """The runs an event started, in the order they were created (pipeline id order)."""
    return conn.execute(
        """SELECT id, pipeline_id, status FROM runs
           WHERE workspace_id = %s AND event_id = %s
           ORDER BY pipeline_id, id""",
        (workspace_id, event_id),
    ).fetchall()


def pipelines_triggered_by(conn: Connection, workspace_id: str, name: str) -> list[Row]:
    """Current versions of the pipelines with a trigger on event `name`, in id order.

    Rows have the columns of `store.pipelines.get_current`, so `engine.runs.create_run` takes
    them as they are. The containment test narrows in SQL; payload filters are applied by the
    caller, which owns the matching rules.
    """
    return conn.execute(
        """SELECT p.id, p.current_version AS version, p.paused, p.created_at, p.updated_at,
                  v.sha256, v.definition
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           WHERE p.workspace_id = %s AND p.deleted_at IS NULL
             AND v.definition->'triggers' @> jsonb_build_array(jsonb_build_object('event', %s::text))
           ORDER BY p.id""",
        (workspace_id, name),
    ).fetchall()


def event_graph_definitions(conn: Connection, workspace_id: str) -> list[Row]:
    """Current definitions of the pipelines that declare triggers or emits (id, definition).

    A definition without either is stored without the keys (see canonical_dict), and cannot
    be part of an event cycle, so it is not read.
    """
    return conn.execute(
        """SELECT p.id, v.definition
           FROM pipelines p
           JOIN pipeline_versions v
             ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
           WHERE p.workspace_id = %s AND p.deleted_at IS NULL
             AND (v.definition ? 'triggers' OR v.definition ? 'emits')
           ORDER BY p.id""",
        (workspace_id,),
    ).fetchall()


def lock_event_graph(conn: Connection, workspace_id: str) -> None:
    """Serialize, until commit, the changes to a workspace's event-trigger graph.

    Two registrations that are each acyclic alone can close a cycle together; checked under
    this lock, the second one sees the first.
    """
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))",
        (EVENT_GRAPH_LOCK_CLASS, workspace_id),
    )


def list_events(
    conn: Connection,
    workspace_id: str,
    *,
    name: str | None,
    limit: int,
    before: tuple[datetime, str] | None,
) -> list[Row]:
    """Newest first, keyset-paginated on (received_at, id), each with the runs it started."""
    before_at, before_id = before if before else (None, None)
    return conn.execute(
        """SELECT e.id, e.name, e.payload, e.received_by, e.received_at,
                  COALESCE(r.runs, '[]'::jsonb) AS runs
           FROM events e
           LEFT JOIN LATERAL (
               SELECT jsonb_agg(jsonb_build_object('id', x.id, 'pipeline_id', x.pipeline_id, 'status', x.status)
                                ORDER BY x.pipeline_id, x.id) AS runs
               FROM runs x WHERE x.workspace_id = e.workspace_id AND x.event_id = e.id
           ) r ON true
           WHERE e.workspace_id = %s
             AND (%s::text IS NULL OR e.name = %s)
             AND (%s::timestamptz IS NULL OR (e.received_at, e.id) < (%s, %s::text))
           ORDER BY e.received_at DESC, e.id DESC
           LIMIT %s""",
        (workspace_id, name, name, before_at, before_at, before_id, limit),
    ).fetchall()
