"""Task state transitions. Each function is one statement, guarded by the state it expects
(and, for worker-facing ones, by attempt and claim token), returning what changed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row

ACTIVE = ("dispatched", "running")
TERMINAL = ("succeeded", "failed", "skipped", "cancelled", "dead")

# Columns a dispatch needs; shared by the claim statements.
_CLAIMED_COLUMNS = """t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
    t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s, t.timeout_s,
    t.lease_expires_at, t.dispatched_at"""

# The lease: two heartbeats, never past the attempt's hard timeout.
_LEASE = """LEAST(tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                  COALESCE(t.dispatched_at, tw_now()) + make_interval(secs => COALESCE(t.timeout_s, 2147483647)))"""


def lock_limited_scopes(conn: Connection) -> tuple[list[Row], list[Row]]:
    """Lock the workspaces and pipelines that have a max_active_tasks and ready tasks (in key
    order), so that claims for them queue; then count their active tasks in a statement that
    starts after the locks were granted, so the count includes every earlier claim. Unlimited
    work is not serialized: it is claimed with SKIP LOCKED alone.

    Returns (workspace rows, pipeline rows), each with `remaining`: the room left under its limit.
    """
    workspaces = conn.execute(
        """SELECT w.id AS workspace_id, w.max_active_tasks FROM workspaces w
           WHERE w.max_active_tasks IS NOT NULL
             AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = w.id AND t.status = 'ready')
           ORDER BY w.id FOR UPDATE OF w"""
    ).fetchall()
    pipelines = conn.execute(
        """SELECT p.workspace_id, p.id AS pipeline_id, p.max_active_tasks FROM pipelines p
           WHERE p.max_active_tasks IS NOT NULL
             AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = p.workspace_id AND t.pipeline_id = p.id
                                                 AND t.status = 'ready')
           ORDER BY p.workspace_id, p.id FOR UPDATE OF p"""
    ).fetchall()
    if not workspaces and not pipelines:
        return [], []
    active = conn.execute(
        """SELECT workspace_id, pipeline_id, count(*) AS n FROM tasks
           WHERE status IN ('dispatched', 'running') AND workspace_id = ANY(%s)
           GROUP BY workspace_id, pipeline_id""",
        (list({r["workspace_id"] for r in workspaces} | {r["workspace_id"] for r in pipelines}),),
    ).fetchall()
    for w in workspaces:
        w["remaining"] = max(0, w["max_active_tasks"] - sum(a["n"] for a in active if a["workspace_id"] == w["workspace_id"]))
    for p in pipelines:
        p["remaining"] = max(0, p["max_active_tasks"] - sum(
            a["n"] for a in active if (a["workspace_id"], a["pipeline_id"]) == (p["workspace_id"], p["pipeline_id"])))
    return workspaces, pipelines


def claim_ready_tasks(conn: Connection, limit: int, *, run_id: uuid.UUID | None = None) -> list[Row]:
    """Claim up to `limit` ready tasks for dispatch, in one statement.

    SKIP LOCKED lets any number of ticks claim at once, each getting disjoint rows; the guard
    `t.status = 'ready'` re-checked after the lock makes a row claimed twice impossible.
    Pipeline and workspace `max_active_tasks` are applied with the room counted by
    lock_limited_scopes: full scopes are left out of the candidates (their tasks do not block
    others), the rest are ranked within their scope and kept while they fit. The attempt row is
    written by the same statement.

    Usually no limited scope has ready work: then tw_claim_ready_tasks (migration 0010) takes
    the scope locks and claims in one round trip, with plans cached per session. Otherwise it
    claims nothing and says so, and the limited path below runs.
    """
    rows = conn.execute(
        "SELECT * FROM tw_claim_ready_tasks(%s::int, %s::uuid)", (limit, run_id)
    ).fetchall()
    if not rows or not rows[0]["limited"]:
        for row in rows:
            del row["limited"]
        return rows
    return _claim_limited(conn, limit, run_id)


def _claim_limited(conn: Connection, limit: int, run_id: uuid.UUID | None) -> list[Row]:
    """The claim when some workspace or pipeline with max_active_tasks has ready tasks."""
    workspaces, pipelines = lock_limited_scopes(conn)
    params: dict[str, Any] = {
        "limit": limit, "run_id": run_id,
        "full_ws": [w["workspace_id"] for w in workspaces if w["remaining"] == 0],
        "full_p_ws": [p["workspace_id"] for p in pipelines if p["remaining"] == 0],
        "full_p": [p["pipeline_id"] for p in pipelines if p["remaining"] == 0],
        "room_ws": [w["workspace_id"] for w in workspaces], "room_ws_n": [w["remaining"] for w in workspaces],
        "room_p_ws": [p["workspace_id"] for p in pipelines], "room_p": [p["pipeline_id"] for p in pipelines],
        "room_p_n": [p["remaining"] for p in pipelines],
    }
    return _claim(conn, params, _LIMITED if workspaces or pipelines else _UNLIMITED)


# No limit applies to any ready task: the plain claim.
_UNLIMITED = """
            , allowed AS (SELECT id FROM candidates)"""

# Candidates ranked within their pipeline and workspace, kept while the rank fits the room.
_LIMITED = """
            , ranked AS (
                SELECT c.id, c.workspace_id, c.pipeline_id,
                       row_number() OVER (PARTITION BY c.workspace_id, c.pipeline_id
                                          ORDER BY c.priority DESC, c.available_at) AS rank_in_pipeline,
                       row_number() OVER (PARTITION BY c.workspace_id
                                          ORDER BY c.priority DESC, c.available_at) AS rank_in_workspace
                FROM candidates c
            ), room_p AS (
                SELECT * FROM unnest(%(room_p_ws)s::text[], %(room_p)s::text[], %(room_p_n)s::int[])
                    AS r(workspace_id, pipeline_id, n)
            ), room_ws AS (
                SELECT * FROM unnest(%(room_ws)s::text[], %(room_ws_n)s::int[]) AS r(workspace_id, n)
            ), allowed AS (
                SELECT r.id FROM ranked r
                LEFT JOIN room_p p ON p.workspace_id = r.workspace_id AND p.pipeline_id = r.pipeline_id
                LEFT JOIN room_ws w ON w.workspace_id = r.workspace_id
                WHERE (p.n IS NULL OR r.rank_in_pipeline <= p.n) AND (w.n IS NULL OR r.rank_in_workspace <= w.n)
            )"""


def _claim(conn: Connection, params: dict[str, Any], allowed: str) -> list[Row]:
    rows = conn.execute(
        f"""WITH candidates AS (
                SELECT id, workspace_id, pipeline_id, priority, available_at FROM tasks
                WHERE status = 'ready' AND available_at <= tw_now()
                  AND (%(run_id)s::uuid IS NULL OR run_id = %(run_id)s::uuid)
                  AND NOT (workspace_id = ANY(%(full_ws)s::text[]))
                  AND (workspace_id, pipeline_id) NOT IN (
                      SELECT * FROM unnest(%(full_p_ws)s::text[], %(full_p)s::text[]))
                ORDER BY priority DESC, available_at
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            ){allowed}, claimed AS (
                UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
                       claim_token = gen_random_uuid(), dispatched_at = tw_now(),
                       lease_expires_at = LEAST(
                           tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                           tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
                       progress = NULL, message = NULL
                FROM allowed c
                WHERE t.id = c.id AND t.status = 'ready'
                RETURNING {_CLAIMED_COLUMNS}
            ), attempts AS (
                INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
                SELECT id, attempt, claim_token, 'dispatched', dispatched_at FROM claimed
            )
            SELECT * FROM claimed""",
        params,
    ).fetchall()
    return rows


def upstream_outputs(conn: Connection, task_ids: Sequence[uuid.UUID]) -> list[Row]:
    """Output references of the succeeded upstream tasks of each task (for dispatch `inputs`)."""
    if not task_ids:
        return []
    return conn.execute(
        """SELECT e.downstream_task_id AS task_id, u.node_id, u.output
           FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
           WHERE e.downstream_task_id = ANY(%s) AND u.status = 'succeeded' AND u.output ? 'key'""",
        (list(task_ids),),
    ).fetchall()


def mark_running(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID,
    progress: float | None, message: str | None,
) -> Row | None:
    """A heartbeat of the current attempt: running, lease extended (capped by the timeout)."""
    row = conn.execute(
        f"""UPDATE tasks t SET status = 'running', started_at = COALESCE(t.started_at, tw_now()),
                   dispatch_failures = 0,
                   lease_expires_at = {_LEASE},
                   progress = COALESCE(%s, t.progress), message = COALESCE(%s, t.message)
            WHERE t.id = %s AND t.attempt = %s AND t.claim_token = %s AND t.status IN ('dispatched', 'running')
            RETURNING t.id, t.status, t.lease_expires_at""",
        (progress, message, task_id, attempt, claim_token),
    ).fetchone()
    if row is not None:
        conn.execute(
            """UPDATE task_attempts SET status = 'running', started_at = COALESCE(started_at, tw_now())
               WHERE task_id = %s AND attempt = %s AND status IN ('dispatched', 'running')""",
            (task_id, attempt),
        )
    return row


def finish_attempt(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID, *,
    succeeded: bool, output: dict[str, Any] | None, error: dict[str, Any] | None, retryable: bool,
) -> Row | None:
    """End the current attempt: succeeded, dead (attempts used up, or not retryable), or back to
    ready after a retry delay.

    The retry delay is computed here from the node's policy so that the decision and the
    transition are one statement: exponential `base * 2^(attempt-1)` capped at `max_delay_s`,
    times a uniform random factor under `jitter: full`.
    """
    # tw_finish_attempt (migration 0010) is this one guarded UPDATE ... RETURNING, in PL/pgSQL so
    # that its plan is cached per session without server-side prepared statements. The row
    # returned carries output_names too, for persisting the outputs of a success.
    return conn.execute(
        """SELECT * FROM tw_finish_attempt(%(task_id)s::uuid, %(attempt)s::int, %(claim_token)s::uuid,
                                           %(ok)s::boolean, %(retryable)s::boolean, %(output)s::jsonb,
                                           %(error)s::jsonb)""",
        {
            "ok": succeeded, "retryable": retryable, "task_id": task_id, "attempt": attempt,
            "claim_token": claim_token, "output": Jsonb(output) if output is not None else None,
            "error": Jsonb(error) if error is not None else None,
        },
    ).fetchone()


def record_attempt_end(
    conn: Connection, task_id: uuid.UUID, attempt: int, status: str, error: dict[str, Any] | None
) -> None:
    """The attempt row's end, if it is still open (tw_record_attempt_end, migration 0010: one
    guarded UPDATE with a cached plan)."""
    conn.execute(
        "SELECT tw_record_attempt_end(%s::uuid, %s::int, %s::text, %s::jsonb)",
        (task_id, attempt, status, Jsonb(error) if error is not None else None),
    )


def get_fence(conn: Connection, task_id: uuid.UUID) -> Row | None:
    """What a refused callback is told: the task's current status, attempt and token."""
    return conn.execute(
        "SELECT id, status, attempt, claim_token, workspace_id FROM tasks WHERE id = %s", (task_id,)
    ).fetchone()


def attempt_outcome(conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID) -> Row | None:
    return conn.execute(
        "SELECT status FROM task_attempts WHERE task_id = %s AND attempt = %s AND claim_token = %s",
        (task_id, attempt, claim_token),
    ).fetchone()


def advance_successors(conn: Connection, upstream_task_id: uuid.UUID, outcome: str) -> list[Row]:
    """Count one finished upstream against each pending successor; the update that reaches zero
    unfinished dependencies applies the successor's trigger rule and makes it ready or skipped.

    `outcome` is succeeded | failed (tolerated by on_failure: continue) | skipped. Rows are locked
    in id order so two parents finishing at once cannot deadlock on shared children.
    """
    failed = 1 if outcome == "failed" else 0
    skipped = 1 if outcome == "skipped" else 0
    # tw_advance_successors (migration 0010): the successors locked in id order and updated, in
    # one statement whose plan is cached per session.
    return conn.execute(
        "SELECT * FROM tw_advance_successors(%(up)s::uuid, %(failed)s::int, %(skipped)s::int)",
        {"up": upstream_task_id, "failed": failed, "skipped": skipped},
    ).fetchall()


def skip_unstarted_tasks(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """A stopping failure: every task of the run not yet started is skipped (in id order), except
    tasks whose trigger rule reacts to failures (`all_done`, `one_failed`): those are left to
    their dependency counts, so a cleanup or alert step still runs."""
    rows = conn.execute(
        """WITH locked AS (
               SELECT id FROM tasks WHERE run_id = %s AND status IN ('pending', 'ready', 'waiting')
                 AND trigger_rule NOT IN ('all_done', 'one_failed')
               ORDER BY id FOR UPDATE
           )
           UPDATE tasks t SET status = 'skipped', finished_at = tw_now(), wait_expires_at = NULL
           FROM locked WHERE t.id = locked.id
           RETURNING t.id""",
        (run_id,),
    ).fetchall()
    return [r["id"] for r in rows]


def record_dispatch_failure(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID, *, base_delay_s: float,
    max_failures: int, error: dict[str, Any],
) -> Row | None:
    """A dispatch that did not reach the worker. The attempt is given back (max_attempts grows by
    one, so the attempt history stays one row per delivery), and the task returns to ready after
    an exponential delay; past `max_failures` consecutive failures it is dead."""
    row = conn.execute(
        """UPDATE tasks SET
               dispatch_failures = dispatch_failures + 1,
               status = CASE WHEN dispatch_failures + 1 >= %(max)s THEN 'dead' ELSE 'ready' END,
               max_attempts = max_attempts + 1,
               claim_token = NULL, lease_expires_at = NULL, error = %(error)s,
               available_at = tw_now() + make_interval(secs => LEAST(300, %(base)s * power(2, dispatch_failures))),
               finished_at = CASE WHEN dispatch_failures + 1 >= %(max)s THEN tw_now() END
           WHERE id = %(id)s AND attempt = %(attempt)s AND claim_token = %(token)s AND status = 'dispatched'
           RETURNING id, run_id, node_id, version, status, attempt, on_failure, workspace_id, pipeline_id""",
        {"max": max_failures, "error": Jsonb(error), "base": base_delay_s, "id": task_id, "attempt": attempt,
         "token": claim_token},
    ).fetchone()
    if row is not None:
        conn.execute(
            """UPDATE task_attempts SET status = 'dispatch_failed', finished_at = tw_now(), error = %s
               WHERE task_id = %s AND attempt = %s""",
            (Jsonb(error), task_id, attempt),
        )
    return row


def insert_dead_letter(conn: Connection, task_id: uuid.UUID) -> None:
    """Record a dead task with its input references, every attempt's error and the code version."""
    conn.execute(
        """INSERT INTO dead_letters (workspace_id, pipeline_id, run_id, task_id, node_id, version, task_name,
                                     inputs, attempts, error, code_version)
           SELECT t.workspace_id, t.pipeline_id, t.run_id, t.id, t.node_id, t.version, t.task_name,
                  COALESCE((SELECT jsonb_object_agg(u.node_id, u.output)
                            FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
                            WHERE e.downstream_task_id = t.id AND u.output IS NOT NULL), '{}'::jsonb),
                  COALESCE((SELECT jsonb_agg(jsonb_build_object(
                                'attempt', a.attempt, 'status', a.status, 'dispatched_at', a.dispatched_at,
                                'finished_at', a.finished_at, 'error', a.error) ORDER BY a.attempt)
                            FROM task_attempts a WHERE a.task_id = t.id), '[]'::jsonb),
                  t.error, 'pipeline version ' || r.pipeline_version || COALESCE(', code ' || t.code_version, '')
           FROM tasks t JOIN runs r ON r.id = t.run_id
           WHERE t.id = %s AND t.status = 'dead'
           ON CONFLICT (task_id) WHERE retried_at IS NULL DO NOTHING""",
        (task_id,),
    )


def decide_waiting(
    conn: Connection, workspace_id: str, task_id: uuid.UUID, kind: str, *, succeeded: bool,
    output: dict[str, Any] | None, error: dict[str, Any] | None,
) -> Row | None:
    """A person's decision on a waiting approval or manual step; only the first decision lands."""
    return conn.execute(
        """UPDATE tasks t SET status = CASE WHEN %s THEN 'succeeded' ELSE 'failed' END,
                  finished_at = tw_now(), output = %s, error = %s, wait_expires_at = NULL
           WHERE t.workspace_id = %s AND t.id = %s AND t.kind = %s AND t.status = 'waiting'
           RETURNING t.id, t.run_id, t.node_id, t.version, t.status, t.attempt, t.on_failure, t.workspace_id,
                     t.pipeline_id""",
        (succeeded, Jsonb(output) if output is not None else None, Jsonb(error) if error is not None else None,
         workspace_id, task_id, kind),
    ).fetchone()


def lock_expired_waits(conn: Connection, limit: int) -> list[Row]:
    return conn.execute(
        """SELECT id, workspace_id, kind, on_timeout, timeout_s FROM tasks
           WHERE status = 'waiting' AND wait_expires_at < tw_now()
           ORDER BY wait_expires_at LIMIT %s FOR UPDATE SKIP LOCKED""",
        (limit,),
    ).fetchall()


def escalate_wait(conn: Connection, task_id: uuid.UUID) -> None:
    conn.execute(
        """UPDATE tasks SET escalated_at = tw_now(), wait_expires_at = NULL,
                  message = 'escalated: the approval timed out and still waits for a decision'
           WHERE id = %s AND status = 'waiting'""",
        (task_id,),
    )


def redrive_run_tasks(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """Reset a run's failed, dead, skipped and cancelled tasks to run again (succeeded outputs are
    kept): a fresh attempt budget, dependency counts recomputed against what succeeded, and
    the ones with nothing left to wait for made ready (or waiting, for human steps)."""
    reset = conn.execute(
        """WITH locked AS (
               SELECT id FROM tasks WHERE run_id = %s AND status IN ('failed', 'dead', 'skipped', 'cancelled')
               ORDER BY id FOR UPDATE
           )
           UPDATE tasks t SET status = 'pending', finished_at = NULL, claim_token = NULL, lease_expires_at = NULL,
                  failed_deps = 0, skipped_deps = 0, dispatch_failures = 0, escalated_at = NULL,
                  max_attempts = t.attempt + COALESCE((t.retry->>'max_attempts')::int, 1)
           FROM locked WHERE t.id = locked.id
           RETURNING t.id""",
        (run_id,),
    ).fetchall()
    ids = [r["id"] for r in reset]
    if not ids:
        return ids
    conn.execute(
        """UPDATE tasks t SET unfinished_deps = (
               SELECT count(*) FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
               WHERE e.downstream_task_id = t.id AND u.status <> 'succeeded')
           WHERE t.id = ANY(%s)""",
        (ids,),
    )
    conn.execute(
        """UPDATE tasks t SET status = CASE WHEN t.kind = 'task' THEN 'ready' ELSE 'waiting' END,
                  available_at = tw_now(),
                  wait_expires_at = CASE WHEN t.kind <> 'task' AND t.timeout_s IS NOT NULL
                                         THEN tw_now() + make_interval(secs => t.timeout_s) END
           WHERE t.id = ANY(%s) AND t.unfinished_deps = 0""",
        (ids,),
    )
    return ids


def lock_expired_leases(conn: Connection, limit: int) -> list[Row]:
    """Active tasks whose lease lapsed (no heartbeat, or past the hard timeout)."""
    return conn.execute(
        """SELECT id, status, attempt, claim_token, timeout_s, dispatched_at,
                  (timeout_s IS NOT NULL AND dispatched_at + make_interval(secs => timeout_s) <= tw_now())
                      AS timed_out
           FROM tasks
           WHERE status IN ('dispatched', 'running') AND lease_expires_at < tw_now()
           ORDER BY lease_expires_at
           LIMIT %s
           FOR UPDATE SKIP LOCKED""",
        (limit,),
    ).fetchall()


def list_tasks_of_run(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT t.id, t.node_id, t.version, t.kind, t.task_name, t.status, t.attempt, t.max_attempts,
                  t.created_at, t.dispatched_at, t.started_at, t.finished_at, t.lease_expires_at,
                  t.progress, t.message, t.output, t.error,
                  COALESCE((SELECT array_agg(u.node_id ORDER BY u.node_id)
                            FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
                            WHERE e.downstream_task_id = t.id), '{}') AS depends
           FROM tasks t WHERE t.workspace_id = %s AND t.run_id = %s
           ORDER BY t.version, t.position""",
        (workspace_id, run_id),
    ).fetchall()


def get_task(conn: Connection, workspace_id: str, task_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """SELECT id, run_id, pipeline_id, node_id, version, kind, task_name, status, attempt,
                  max_attempts, params, created_at, dispatched_at, started_at, finished_at,
                  lease_expires_at, progress, message, output, error, code_version
           FROM tasks WHERE workspace_id = %s AND id = %s""",
        (workspace_id, task_id),
    ).fetchone()


def list_attempts(conn: Connection, task_ids: Sequence[uuid.UUID]) -> list[Row]:
    return conn.execute(
        """SELECT task_id, attempt, status, dispatched_at, started_at, finished_at, error, code_version
           FROM task_attempts WHERE task_id = ANY(%s) ORDER BY task_id, attempt""",
        (list(task_ids),),
    ).fetchall()
