"""The pipeline graph (pipeline-level depends), orchestrations and their run edges, and the
outbox of later triggers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row

# pg_advisory_xact_lock(class, hashtext(workspace)): one class per graph kept acyclic.
PIPELINE_GRAPH_LOCK_CLASS = 7_204_002


def lock_pipeline_graph(conn: Connection, workspace_id: str) -> None:
    """Serialize, until commit, changes to a workspace's pipeline-level dependency graph: two
    registrations that are each acyclic alone could otherwise close a cycle together."""
    conn.execute("SELECT pg_advisory_xact_lock(%s::int, hashtext(%s))", (PIPELINE_GRAPH_LOCK_CLASS, workspace_id))


def sync_dependencies(
    conn: Connection, workspace_id: str, pipeline_id: str, depends: Sequence[tuple[str, list[str], str]],
    declared_outputs: Sequence[str],
) -> None:
    """Make the stored graph edges and declared outputs those of the pipeline's current version."""
    conn.execute(
        """DELETE FROM pipeline_dependencies WHERE workspace_id = %s AND pipeline_id = %s
             AND NOT (upstream_pipeline_id = ANY(%s))""",
        (workspace_id, pipeline_id, [d[0] for d in depends]),
    )
    if depends:
        conn.execute(
            """INSERT INTO pipeline_dependencies (workspace_id, pipeline_id, upstream_pipeline_id, outputs, trigger)
               SELECT %s, %s, d.upstream, ARRAY(SELECT jsonb_array_elements_text(d.outputs)), d.trigger
               FROM unnest(%s::text[], %s::jsonb[], %s::text[]) AS d(upstream, outputs, trigger)
               ON CONFLICT (workspace_id, pipeline_id, upstream_pipeline_id) DO UPDATE
                   SET outputs = EXCLUDED.outputs, trigger = EXCLUDED.trigger""",
            (workspace_id, pipeline_id, [d[0] for d in depends], [Jsonb(d[1]) for d in depends],
             [d[2] for d in depends]),
        )
    conn.execute(
        "UPDATE pipelines SET declared_outputs = %s WHERE workspace_id = %s AND id = %s",
        (list(declared_outputs), workspace_id, pipeline_id),
    )


def workspace_graph(conn: Connection, workspace_id: str) -> tuple[list[Row], list[Row]]:
    """(pipelines with declared outputs, dependency edges) of a workspace's current versions."""
    pipelines = conn.execute(
        "SELECT id, declared_outputs, paused FROM pipelines WHERE workspace_id = %s AND deleted_at IS NULL",
        (workspace_id,),
    ).fetchall()
    edges = conn.execute(
        """SELECT pipeline_id, upstream_pipeline_id, outputs, trigger FROM pipeline_dependencies
           WHERE workspace_id = %s ORDER BY pipeline_id, upstream_pipeline_id""",
        (workspace_id,),
    ).fetchall()
    return pipelines, edges


def dependants_of(conn: Connection, workspace_id: str, pipeline_id: str, triggers: Sequence[str]) -> list[Row]:
    """Unpaused pipelines that depend on `pipeline_id` with one of `triggers`, in id order."""
    return conn.execute(
        """SELECT d.pipeline_id FROM pipeline_dependencies d
           JOIN pipelines p ON p.workspace_id = d.workspace_id AND p.id = d.pipeline_id
           WHERE d.workspace_id = %s AND d.upstream_pipeline_id = %s AND d.trigger = ANY(%s) AND NOT p.paused
           ORDER BY d.pipeline_id""",
        (workspace_id, pipeline_id, list(triggers)),
    ).fetchall()


def dependencies_of(conn: Connection, workspace_id: str, pipeline_id: str) -> list[Row]:
    return conn.execute(
        """SELECT upstream_pipeline_id, outputs, trigger FROM pipeline_dependencies
           WHERE workspace_id = %s AND pipeline_id = %s ORDER BY upstream_pipeline_id""",
        (workspace_id, pipeline_id),
    ).fetchall()


# --- orchestrations ------------------------------------------------------------------------


def insert_orchestration(
    conn: Connection, *, orchestration_id: uuid.UUID, workspace_id: str, root_pipeline_id: str | None,
    include: str, pipelines: Sequence[str], versions: Sequence[str] | None, params: dict[str, Any],
    idempotency_key: str | None, triggered_by: str | None, request_sha256: str | None = None,
) -> bool:
    """False when the workspace already used the idempotency key."""
    row = conn.execute(
        """INSERT INTO orchestrations (id, workspace_id, root_pipeline_id, include, pipelines, versions, params,
                                       idempotency_key, triggered_by, request_sha256)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT DO NOTHING RETURNING id""",
        (orchestration_id, workspace_id, root_pipeline_id, include, list(pipelines),
         None if versions is None else list(versions), Jsonb(params), idempotency_key, triggered_by,
         request_sha256),
    ).fetchone()
    return row is not None


def find_orchestration_by_key(conn: Connection, workspace_id: str, key: str) -> Row | None:
    return conn.execute(
        "SELECT id, created_at, request_sha256 FROM orchestrations WHERE workspace_id = %s AND idempotency_key = %s",
        (workspace_id, key),
    ).fetchone()


def release_expired_orchestration_key(conn: Connection, workspace_id: str, key: str, ttl_s: int) -> None:
    conn.execute(
        """UPDATE orchestrations SET idempotency_key = NULL
           WHERE workspace_id = %s AND idempotency_key = %s
             AND created_at <= tw_now() - make_interval(secs => %s)""",
        (workspace_id, key, ttl_s),
    )


def get_orchestration(conn: Connection, workspace_id: str, orchestration_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """SELECT id, root_pipeline_id, include, pipelines, versions, params, triggered_by, created_at
           FROM orchestrations WHERE workspace_id = %s AND id = %s""",
        (workspace_id, orchestration_id),
    ).fetchone()


def runs_of_orchestration(conn: Connection, orchestration_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT r.id, r.pipeline_id, r.status, r.versions, r.blocked_upstreams, r.error, r.created_at, r.started_at,
                  r.finished_at, r.failed_task_count AS failed_tasks,
                  (r.status = 'succeeded' AND r.failed_task_count > 0) AS succeeded_with_failures
           FROM runs r JOIN orchestrations o ON o.id = r.orchestration_id
           WHERE r.orchestration_id = %s ORDER BY array_position(o.pipelines, r.pipeline_id)""",
        (orchestration_id,),
    ).fetchall()


def insert_run_dependencies(conn: Connection, edges: Sequence[tuple[uuid.UUID, uuid.UUID, str, str]]) -> None:
    """(downstream run, upstream run, upstream pipeline, trigger) edges of an orchestration."""
    if not edges:
        return
    conn.execute(
        """INSERT INTO run_dependencies (downstream_run_id, upstream_run_id, upstream_pipeline_id, trigger)
           SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[])""",
        ([e[0] for e in edges], [e[1] for e in edges], [e[2] for e in edges], [e[3] for e in edges]),
    )


def release_downstream_runs(conn: Connection, upstream_run_id: uuid.UUID, upstream_succeeded: bool) -> list[Row]:
    """An upstream run of an orchestration completed: each waiting downstream run counts it.

    A downstream that needs the upstream to succeed (`on_success`) and it did not is returned
    with `doomed`; the others have `blocked_upstreams` decremented under their row lock, so the
    last of several upstreams completing at once releases the run exactly once. Each edge is
    released once (`released_at`): an upstream run that is reopened (dead-letter retry) and
    ends again is not counted twice.
    """
    return conn.execute(
        """WITH released AS (
               UPDATE run_dependencies d SET released_at = tw_now()
               WHERE d.upstream_run_id = %s AND d.released_at IS NULL
               RETURNING d.downstream_run_id, d.trigger
           )
           UPDATE runs r SET blocked_upstreams = r.blocked_upstreams - 1
           FROM released d
           WHERE r.id = d.downstream_run_id AND r.status = 'pending' AND r.blocked_upstreams > 0
           RETURNING r.id, r.workspace_id, r.pipeline_id, r.versions, r.blocked_upstreams,
                     (d.trigger = 'on_success' AND NOT %s) AS doomed""",
        (upstream_run_id, upstream_succeeded),
    ).fetchall()


def claim_later_triggers(conn: Connection, run_id: uuid.UUID, succeeded: bool) -> list[str]:
    """Which later triggers a run that just ended still owes: `on_complete` the first time it
    ends, `on_success` the first time it succeeds. A run reopened by a repair and ending again
    does not trigger its dependants twice."""
    row = conn.execute(
        """UPDATE runs r SET complete_triggers_decided = true,
                  success_triggers_decided = r.success_triggers_decided OR %(ok)s
           FROM (SELECT id, complete_triggers_decided, success_triggers_decided FROM runs
                 WHERE id = %(run)s FOR UPDATE) AS before
           WHERE r.id = before.id
           RETURNING before.complete_triggers_decided AS complete_done,
                     before.success_triggers_decided AS success_done""",
        {"ok": succeeded, "run": run_id},
    ).fetchone()
    if row is None:
        return []
    owed = [] if row["complete_done"] else ["on_complete"]
    if succeeded and not row["success_done"]:
        owed.insert(0, "on_success")
    return owed


def orchestration_upstream_runs(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT d.upstream_run_id, d.upstream_pipeline_id, d.trigger, r.status
           FROM run_dependencies d JOIN runs r ON r.id = d.upstream_run_id
           WHERE d.downstream_run_id = %s ORDER BY d.upstream_pipeline_id""",
        (run_id,),
    ).fetchall()


def downstream_runs(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    """Runs started from this one: later triggers, and the downstream runs of its orchestration."""
    return conn.execute(
        """SELECT r.id AS run_id, r.pipeline_id, r.trigger, r.status, 'triggered' AS relation
           FROM runs r WHERE r.trigger_source_execution_id = %(run)s
           UNION ALL
           SELECT r.id, r.pipeline_id, r.trigger, r.status, 'orchestration'
           FROM run_dependencies d JOIN runs r ON r.id = d.downstream_run_id
           WHERE d.upstream_run_id = %(run)s
           ORDER BY 2, 1""",
        {"run": run_id},
    ).fetchall()


def fail_run_before_start(conn: Connection, run_id: uuid.UUID, status: str, error: str) -> bool:
    """A run that cannot start (missing upstream output, failed upstream run) ends as `status`
    with none of its tasks started: they are skipped, the run keeps its reason."""
    conn.execute(
        """UPDATE tasks SET status = 'skipped', finished_at = tw_now(), wait_expires_at = NULL
           WHERE run_id = %s AND status IN ('pending', 'ready', 'waiting')""",
        (run_id,),
    )
    row = conn.execute(
        """UPDATE runs SET status = %s, unfinished_tasks = 0, blocked_upstreams = 0,
                  started_at = COALESCE(started_at, tw_now()), finished_at = tw_now(), error = %s
           WHERE id = %s AND status IN ('pending', 'running') RETURNING id""",
        (status, error, run_id),
    ).fetchone()
    return row is not None


# --- later triggers (outbox) ---------------------------------------------------------------


def add_pipeline_trigger(
    conn: Connection, workspace_id: str, pipeline_id: str, source_run_id: uuid.UUID, source_pipeline_id: str,
    versions: Sequence[str],
) -> bool:
    row = conn.execute(
        """INSERT INTO pipeline_triggers (workspace_id, pipeline_id, source_run_id, source_pipeline_id, versions)
           VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id""",
        (workspace_id, pipeline_id, source_run_id, source_pipeline_id, list(versions)),
    ).fetchone()
    return row is not None


def take_pipeline_trigger(conn: Connection) -> Row | None:
    """The oldest pending later trigger, removed; its transaction creates the run (SKIP LOCKED:
    concurrent ticks take different ones)."""
    return conn.execute(
        """DELETE FROM pipeline_triggers WHERE id = (
               SELECT id FROM pipeline_triggers ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
           RETURNING workspace_id, pipeline_id, source_run_id, source_pipeline_id, versions"""
    ).fetchone()
