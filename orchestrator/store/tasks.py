"""Task state transitions. Each function is one statement, guarded by the state it expects
(and, for worker-facing ones, by attempt and claim token), returning what changed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row

ACTIVE = ("dispatched", "running")
TERMINAL = ("succeeded", "failed", "skipped", "cancelled")

# The lease: two heartbeats, never past the attempt's hard timeout.
_LEASE = """LEAST(tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                  COALESCE(t.dispatched_at, tw_now()) + make_interval(secs => COALESCE(t.timeout_s, 2147483647)))"""


def claim_ready_tasks(conn: Connection, limit: int, *, run_id: uuid.UUID | None = None) -> list[Row]:
    """Claim up to `limit` ready tasks for dispatch, in one call (tw_claim_ready_tasks,
    migration 0012): dispatched, attempt + 1, a new claim token and lease, the attempt row.

    SKIP LOCKED lets any number of ticks claim at once, each getting disjoint rows; the guard
    `t.status = 'ready'` re-checked after the lock makes a row claimed twice impossible.
    `max_active_tasks` of pipelines and workspaces holds for every task claimed: their rows are
    locked (in key order) before the room under each limit is counted, and a task of a limited
    scope that was not locked is left for the next claim. With `run_id` (the eager claim after a
    callback) only that run's tasks are claimed and only its own scopes are locked.
    """
    return conn.execute(
        "SELECT * FROM tw_claim_ready_tasks(%s::int, %s::uuid)", (limit, run_id)
    ).fetchall()


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
                   dispatch_failures = 0, dispatch_deferrals = 0, not_started_count = 0, not_started_since = NULL,
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
    """End the current attempt: succeeded, failed (attempts used up, or not retryable: the caller
    dead-letters it), or back to ready after a retry delay.

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


# A pending task whose last dependency just finished: its trigger rule, given its failed and
# skipped dependency counts after this transition ({failed} and {skipped} are SQL expressions).
# An expanded map node's last open children finished: it settles, whatever they did (its
# tolerated_failures decides, in orchestrator.engine.mapping), so its rule is not asked again.
_RULE_HOLDS = """(t.map_width IS NOT NULL OR CASE t.trigger_rule
                     WHEN 'all_done' THEN true
                     WHEN 'none_failed' THEN {failed} = 0
                     WHEN 'one_failed' THEN {failed} > 0
                     ELSE {skipped} = 0
                 END)"""
# What a task whose rule holds becomes: a human step waits for its person, a task is ready for
# a worker, a map node is ready to be expanded or settled (in the same transaction).
_READY_STATUS = "CASE WHEN t.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END"
_HUMAN = "t.kind IN ('approval', 'manual')"


@dataclass(frozen=True)
class Advanced:
    """What counting finished upstreams against their successors did: the successors updated
    (id, node_id, status, kind), and the run counts carried to slots completed for joins no
    longer pending (migration 0027), which go to the run with the upstreams' ends."""

    rows: list[Row]
    released: int


def advance_successors(conn: Connection, upstream_task_ids: Sequence[uuid.UUID], outcome: str) -> Advanced:
    """Count finished upstreams (all with the same `outcome`) against each pending successor;
    the update that reaches zero unfinished dependencies applies the successor's trigger rule
    and makes it ready (waiting, for a human step) or skipped.

    `outcome` is succeeded | failed (tolerated by on_failure: continue) | skipped. Successors are
    locked in id order so two parents finishing at once cannot deadlock on shared children. A
    whole wave of upstreams (every task a stopping failure skipped) is one statement.

    A join counted through slots (migration 0027) is counted here on its own row, as any
    successor, and each end takes 1 off its slot's `remaining` first (slot rows before successor
    rows, the lock order of the callback statement); a slot this completes is applied to the
    join with it (what the callback statement counted and carried there).
    """
    if not upstream_task_ids:
        return Advanced([], 0)
    failed = 1 if outcome == "failed" else 0
    skipped = 1 if outcome == "skipped" else 0
    ups = list(upstream_task_ids)
    completed = conn.execute(
        """WITH hits AS (
               SELECT e.downstream_task_id AS id, e.slot, count(*)::int AS n FROM task_edges e
               WHERE e.upstream_task_id = ANY(%(ups)s::uuid[]) AND e.slot IS NOT NULL
               GROUP BY e.downstream_task_id, e.slot
           ), locked AS (
               SELECT s.task_id, s.slot, h.n FROM join_slots s JOIN hits h ON h.id = s.task_id AND h.slot = s.slot
               ORDER BY s.task_id, s.slot FOR UPDATE OF s
           )
           UPDATE join_slots s SET remaining = s.remaining - l.n
           FROM locked l WHERE s.task_id = l.task_id AND s.slot = l.slot
           RETURNING s.task_id, s.remaining, s.arrived, s.carried""",
        {"ups": ups},
    ).fetchall()
    done = [r for r in completed if r["remaining"] == 0 and (r["arrived"] or r["carried"])]
    holds = _RULE_HOLDS.format(failed="t.failed_deps + l.n * %(failed)s", skipped="t.skipped_deps + l.n * %(skipped)s")
    rows = conn.execute(
        f"""WITH hits AS (
                SELECT e.downstream_task_id AS id, count(*)::int AS n FROM task_edges e
                WHERE e.upstream_task_id = ANY(%(ups)s::uuid[]) GROUP BY e.downstream_task_id
            ), slots AS (
                SELECT x.id, sum(x.arrived)::int AS arrived, sum(x.carried)::int AS carried
                FROM unnest(%(slot_ids)s::uuid[], %(slot_arrived)s::int[], %(slot_carried)s::int[])
                     AS x(id, arrived, carried)
                GROUP BY x.id
            ), locked AS (
                SELECT t.id, COALESCE(h.n, 0) AS n, COALESCE(s.arrived, 0) AS arrived,
                       COALESCE(s.carried, 0) AS carried
                FROM (SELECT id FROM hits UNION SELECT id FROM slots) k JOIN tasks t ON t.id = k.id
                LEFT JOIN hits h ON h.id = t.id LEFT JOIN slots s ON s.id = t.id
                WHERE t.status = 'pending'
                ORDER BY t.id FOR UPDATE OF t
            )
            UPDATE tasks t SET
                unfinished_deps = t.unfinished_deps - l.n - l.arrived,
                failed_deps = t.failed_deps + l.n * %(failed)s,
                skipped_deps = t.skipped_deps + l.n * %(skipped)s,
                carried_tasks = t.carried_tasks + l.carried,
                status = CASE WHEN t.unfinished_deps - l.n - l.arrived > 0 THEN 'pending'
                              WHEN {holds} THEN {_READY_STATUS}
                              ELSE 'skipped' END,
                -- unchanged while pending: an update of the counters alone stays in place (HOT)
                available_at = CASE WHEN t.unfinished_deps - l.n - l.arrived > 0 THEN t.available_at ELSE tw_now() END,
                wait_expires_at = CASE WHEN t.unfinished_deps - l.n - l.arrived = 0 AND {holds} AND {_HUMAN}
                                            AND t.timeout_s IS NOT NULL
                                       THEN tw_now() + make_interval(secs => t.timeout_s) END,
                finished_at = CASE WHEN t.unfinished_deps - l.n - l.arrived = 0 AND NOT {holds} THEN tw_now() END
            FROM locked l WHERE t.id = l.id AND t.status = 'pending'
            RETURNING t.id, t.node_id, t.status, t.kind, l.carried""",
        {"ups": ups, "failed": failed, "skipped": skipped, "slot_ids": [r["task_id"] for r in done],
         "slot_arrived": [r["arrived"] for r in done], "slot_carried": [r["carried"] for r in done]},
    ).fetchall()
    # A slot completed for a join no longer pending: its carried count has nowhere to go but the run.
    released = sum(int(r["carried"]) for r in done) - sum(int(r["carried"]) for r in rows)
    return Advanced(rows, released)


def skip_unstarted_tasks(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """A stopping failure: every task of the run not yet started is skipped (in id order), except
    tasks whose trigger rule reacts to failures (`all_done`, `one_failed`): those are left to
    their dependency counts, so a cleanup or alert step still runs. An expanded map node is left
    too: its children not yet started are skipped here, and it settles (skipped) when the ones
    out with workers are done, so it never ends before its children."""
    rows = conn.execute(
        """WITH locked AS (
               SELECT id FROM tasks WHERE run_id = %s AND status IN ('pending', 'ready', 'waiting')
                 AND trigger_rule NOT IN ('all_done', 'one_failed') AND map_width IS NULL
                 -- the items of a mapped failure handler run, as the handler does
                 AND NOT EXISTS (SELECT 1 FROM tasks m WHERE m.id = tasks.map_parent_id
                                 AND m.trigger_rule IN ('all_done', 'one_failed'))
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
    an exponential delay; past `max_failures` consecutive failures it has failed (and the caller
    dead-letters it)."""
    row = conn.execute(
        """UPDATE tasks SET
               dispatch_failures = dispatch_failures + 1,
               status = CASE WHEN dispatch_failures + 1 >= %(max)s THEN 'failed' ELSE 'ready' END,
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


def release_claims(
    conn: Connection, claims: Sequence[tuple[uuid.UUID, int, uuid.UUID, float, str]], *, base_delay_s: float,
    max_delay_s: float,
) -> list[Row]:
    """Dispatches that never left because the worker target pushed back (throttled, or held back
    under its capacity): each claim is given back as if it never happened, in one statement.
    The attempt number is restored and the attempt row removed (no worker was reached, so no
    attempt was spent and none is in the history), no dispatch failure is counted, and the task
    is ready again after `base_delay_s` doubling per deferral in a row (`dispatch_deferrals`),
    at most `max_delay_s`, jittered over its upper half so that a throttled batch does not come
    back as one; and never before the claim's own minimum (`claims`: id, attempt, claim token,
    minimum delay in seconds: the target's rest, or the Retry-After it sent; and the reason, the
    task's error (code `throttled`) while it waits)."""
    if not claims:
        return []
    return conn.execute(
        """WITH c AS (
               SELECT * FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(tokens)s::uuid[], %(mins)s::float8[],
                                    %(reasons)s::text[])
                   AS c(id, attempt, token, min_delay, reason)
           ), released AS (
               UPDATE tasks t SET status = 'ready', attempt = t.attempt - 1, claim_token = NULL,
                      lease_expires_at = NULL, dispatch_deferrals = t.dispatch_deferrals + 1,
                      error = jsonb_build_object('code', 'throttled', 'message', c.reason, 'retryable', true),
                      available_at = tw_now() + make_interval(secs => GREATEST(c.min_delay,
                          LEAST(%(max)s::float8, %(base)s * power(2, LEAST(t.dispatch_deferrals, 30)))
                          * (0.5 + random() / 2)))
               FROM c
               WHERE t.id = c.id AND t.attempt = c.attempt AND t.claim_token = c.token AND t.status = 'dispatched'
               RETURNING t.id, t.attempt + 1 AS released_attempt, t.dispatch_deferrals, t.available_at
           ), gone AS (
               DELETE FROM task_attempts a USING released r
               WHERE a.task_id = r.id AND a.attempt = r.released_attempt AND a.status = 'dispatched'
           )
           SELECT id, dispatch_deferrals, available_at FROM released""",
        {"ids": [c[0] for c in claims], "attempts": [c[1] for c in claims], "tokens": [c[2] for c in claims],
         "mins": [c[3] for c in claims], "reasons": [c[4] for c in claims], "base": base_delay_s,
         "max": max_delay_s},
    ).fetchall()


def extend_start_leases(
    conn: Connection, claims: Sequence[tuple[uuid.UUID, int, uuid.UUID]], window_s: int,
) -> int:
    """Tasks handed to a transport that may hold them before a worker starts them (Lambda's
    asynchronous queue keeps an event up to its maximum event age): while still `dispatched`,
    their lease covers that window plus two heartbeats (the worker's first one), never past the
    attempt's timeout. A worker's first heartbeat brings the lease back to two heartbeats."""
    if not claims:
        return 0
    rows = conn.execute(
        """UPDATE tasks t SET lease_expires_at = GREATEST(t.lease_expires_at, LEAST(
                  tw_now() + make_interval(secs => %(window)s + 2 * t.heartbeat_s),
                  COALESCE(t.dispatched_at, tw_now()) + make_interval(secs => COALESCE(t.timeout_s, 2147483647))))
           FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(tokens)s::uuid[]) AS c(id, attempt, token)
           WHERE t.id = c.id AND t.attempt = c.attempt AND t.claim_token = c.token AND t.status = 'dispatched'
           RETURNING t.id""",
        {"window": window_s, "ids": [c[0] for c in claims], "attempts": [c[1] for c in claims],
         "tokens": [c[2] for c in claims]},
    ).fetchall()
    return len(rows)


def record_not_started(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID, *, base_delay_s: float,
    max_delay_s: float, give_up_s: float, retry_error: dict[str, Any], final_error: dict[str, Any],
) -> Row | None:
    """A task whose lease lapsed while still `dispatched`: no worker started it (the delivery was
    lost, or it waited in the transport's queue past its lease). Not the task's failure: the
    attempt is given back (as for a dispatch failure, its row kept as `dispatch_failed` with the
    reason) and it is ready again: at once the first time (the likeliest cause is a tick that
    died between claim and send), then after `base_delay_s` doubling per further delivery nobody
    started, capped at `max_delay_s` (the transport is backed up: sending more adds to its
    queue). Once `give_up_s` have passed since the first expiry of this streak
    (`not_started_since`, the time it was first found not started), the next expiry fails it
    with `final_error` (code `not_started`; the caller dead-letters it). Counted from that
    expiry, not from the dispatch, so the first expiry never fails a task: after an outage of
    the tick itself, every lapsed delivery is sent again once before any gives up. One
    statement, guarded by the claim."""
    return conn.execute(
        """WITH expired AS (
               UPDATE tasks t SET
                   not_started_since = COALESCE(t.not_started_since, tw_now()),
                   not_started_count = t.not_started_count + 1,
                   status = CASE WHEN t.not_started_since + make_interval(secs => %(give_up)s) <= tw_now()
                                 THEN 'failed' ELSE 'ready' END,
                   max_attempts = t.max_attempts + 1,
                   claim_token = NULL, lease_expires_at = NULL,
                   error = CASE WHEN t.not_started_since + make_interval(secs => %(give_up)s) <= tw_now()
                                THEN %(final)s ELSE %(retry)s END,
                   available_at = tw_now() + make_interval(secs => CASE WHEN t.not_started_count = 0 THEN 0
                       ELSE LEAST(%(max)s::float8, %(base)s * power(2, LEAST(t.not_started_count - 1, 30))) END),
                   finished_at = CASE WHEN t.not_started_since + make_interval(secs => %(give_up)s) <= tw_now()
                                      THEN tw_now() END
               WHERE t.id = %(id)s AND t.attempt = %(attempt)s AND t.claim_token = %(token)s
                 AND t.status = 'dispatched'
               RETURNING t.id, t.run_id, t.node_id, t.version, t.status, t.attempt, t.on_failure, t.workspace_id,
                         t.pipeline_id, t.not_started_count, t.not_started_since, t.available_at, t.error
           ), ended AS (
               UPDATE task_attempts a SET status = 'dispatch_failed', finished_at = tw_now(), error = x.error
               FROM expired x
               WHERE a.task_id = x.id AND a.attempt = x.attempt AND a.status = 'dispatched'
           )
           SELECT * FROM expired""",
        {"give_up": give_up_s, "final": Jsonb(final_error), "retry": Jsonb(retry_error), "max": max_delay_s,
         "base": base_delay_s, "id": task_id, "attempt": attempt, "token": claim_token},
    ).fetchone()


def insert_dead_letter(conn: Connection, task_id: uuid.UUID) -> None:
    """Dead-letter a failed task: its input references, every attempt's error and the code version.
    Only the failures of a worker's attempts or deliveries are dead-lettered (the caller knows
    which: completion.settle_terminal's `dead_letter`); the status alone does not say."""
    conn.execute(
        """INSERT INTO dead_letters (workspace_id, pipeline_id, run_id, task_id, node_id, version, task_name,
                                     inputs, attempts, error, code_version)
           SELECT t.workspace_id, t.pipeline_id, t.run_id, t.id, t.node_id, t.version, t.task_name,
                  COALESCE((SELECT jsonb_object_agg(u.node_id, u.output)
                            FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
                            WHERE e.downstream_task_id = t.id AND u.output IS NOT NULL), '{}'::jsonb)
                  -- a map node's child: its map node's inputs, and its item
                  || CASE WHEN t.map_parent_id IS NULL THEN '{}'::jsonb ELSE
                         COALESCE((SELECT jsonb_object_agg(i->>'node_id', jsonb_build_object('key', i->>'key'))
                                   FROM tasks p CROSS JOIN LATERAL jsonb_array_elements(COALESCE(p.map_inputs, '[]')) i
                                   WHERE p.id = t.map_parent_id), '{}'::jsonb)
                         || jsonb_build_object('map', jsonb_build_object('index', t.map_index, 'item', t.map_item))
                     END,
                  COALESCE((SELECT jsonb_agg(jsonb_build_object(
                                'attempt', a.attempt, 'status', a.status, 'dispatched_at', a.dispatched_at,
                                'finished_at', a.finished_at, 'error', a.error) ORDER BY a.attempt)
                            FROM task_attempts a WHERE a.task_id = t.id), '[]'::jsonb),
                  t.error, 'pipeline version ' || r.pipeline_version || COALESCE(', code ' || t.code_version, '')
           FROM tasks t JOIN runs r ON r.id = t.run_id
           WHERE t.id = %s AND t.status = 'failed'
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


def lock_tasks_of_run(conn: Connection, run_id: uuid.UUID) -> int:
    """Lock every task of a run, in id order, before a repair (redrive, dead-letter retry)
    recounts dependencies. A callback of the run that is being recorded holds its task's lock
    until it commits, so this waits for it; the recount that follows is a new statement, whose
    snapshot includes that outcome (READ COMMITTED), and the callback's own successor update,
    if it comes after, sees the repaired rows."""
    # Counted in the server: a 100,000-task run is locked without sending its ids back.
    row = conn.execute(
        "SELECT count(*) AS n FROM (SELECT id FROM tasks WHERE run_id = %s ORDER BY id FOR UPDATE) locked",
        (run_id,),
    ).fetchone()
    return 0 if row is None else int(row["n"])


def reset_unsuccessful_tasks(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """A redrive: the run's failed, skipped and cancelled tasks go back to pending with a
    fresh attempt budget (succeeded outputs are kept). Their dependency counts are recounted by
    recount_pending_tasks, in the same transaction.

    The items of a map node that ran on an upstream being reset (a failure handler expanded on
    a failure) keep their outcome, as the map node does: they ran on that outcome, and items have
    no upstreams of their own to wait for the new one (`map_nodes_expanded_on_resets` refuses a
    redrive that would have to reset such a map node)."""
    rows = conn.execute(
        """UPDATE tasks t SET status = 'pending', finished_at = NULL, claim_token = NULL, lease_expires_at = NULL,
                  dispatch_failures = 0, escalated_at = NULL, wait_expires_at = NULL,
                  dispatch_deferrals = 0, not_started_count = 0, not_started_since = NULL,
                  max_attempts = t.attempt + COALESCE((t.retry->>'max_attempts')::int, 1)
           WHERE t.run_id = %s AND t.status IN ('failed', 'skipped', 'cancelled')
             AND NOT EXISTS (SELECT 1 FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
                             WHERE e.downstream_task_id = t.map_parent_id AND u.map_parent_id IS NULL
                               AND u.status IN ('failed', 'skipped', 'cancelled'))
           RETURNING t.id""",
        (run_id,),
    ).fetchall()
    return [r["id"] for r in rows]


def map_nodes_expanded_on_resets(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    """Expanded map nodes a redrive would reset (failed, skipped, cancelled) whose node-level
    upstream it would reset too: their items ran on that upstream's outcome and cannot wait for
    a new one."""
    return conn.execute(
        """SELECT DISTINCT m.id, m.node_id, m.version, u.node_id AS upstream
           FROM tasks m JOIN task_edges e ON e.downstream_task_id = m.id JOIN tasks u ON u.id = e.upstream_task_id
           WHERE m.run_id = %s AND m.kind = 'map' AND m.map_width IS NOT NULL
             AND m.status IN ('failed', 'skipped', 'cancelled')
             AND u.map_parent_id IS NULL AND u.status IN ('failed', 'skipped', 'cancelled')
           ORDER BY m.node_id, m.version""",
        (run_id,),
    ).fetchall()


# A downstream task a retried upstream takes back to pending: not started yet, or decided
# (skipped) on the outcome that is being retried. A map node is two things at once. Reached from
# one of its own items (an item retried), it was decided on that item's outcome: once settled it
# settles again, with a new manifest. Reached from a node-level upstream, once expanded it has
# started on that upstream's outcome, like a task out with a worker (its items exist and run):
# it is not reopened, and while its items run the repair is refused.
_DOWN = """WITH RECURSIVE down(id, via_item) AS (
               SELECT e.downstream_task_id, u.map_parent_id IS NOT NULL
               FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
               WHERE e.upstream_task_id = ANY(%(tasks)s::uuid[])
               UNION
               SELECT e.downstream_task_id, false FROM down d JOIN tasks t ON t.id = d.id
               JOIN task_edges e ON e.upstream_task_id = d.id
               WHERE """ + "{reopenable}" + """
           )"""
_EXPANDED = "(t.kind = 'map' AND t.map_width IS NOT NULL)"
_REOPENABLE = (f"((t.status IN ('pending', 'ready', 'waiting', 'skipped') AND NOT ({_EXPANDED} AND NOT d.via_item))"
               f" OR ({_EXPANDED} AND d.via_item AND t.status IN ('succeeded', 'failed')))")


def started_downstream(conn: Connection, task_ids: Sequence[uuid.UUID]) -> list[Row]:
    """Tasks out with workers that already consumed these tasks' outcomes: their successors,
    and theirs through successors not yet started or skipped; and map nodes expanded on them
    whose items are still open (a repair of their own items aside). A repair cannot take these
    back under them (they would have run on an upstream that is running again)."""
    return conn.execute(
        f"""{_DOWN.format(reopenable=_REOPENABLE)}
            SELECT t.id, t.node_id, t.version, t.status
            FROM (SELECT id, bool_or(via_item) AS via_item FROM down GROUP BY id) d JOIN tasks t ON t.id = d.id
            WHERE t.status IN ('dispatched', 'running')
               OR ({_EXPANDED} AND NOT d.via_item AND t.status = 'pending' AND t.id <> ALL(%(tasks)s::uuid[]))
            ORDER BY t.node_id, t.version""",
        {"tasks": list(task_ids)},
    ).fetchall()


def reopen_downstream(conn: Connection, task_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Tasks going back to be run again (a dead letter retried, a redrive): their downstream
    tasks that were decided on the outcome being retried (skipped, or made ready or waiting by a
    rule that accepted it) or not started yet go back to pending, to be recounted; and a settled
    map node one of whose items is retried. Tasks that ran keep their outcome, and so does a map
    node expanded on the upstream retried."""
    rows = conn.execute(
        f"""{_DOWN.format(reopenable=_REOPENABLE)}
            UPDATE tasks t SET status = 'pending', finished_at = NULL, wait_expires_at = NULL, escalated_at = NULL,
                   dispatch_deferrals = 0, not_started_count = 0, not_started_since = NULL
            FROM (SELECT id, bool_or(via_item) AS via_item FROM down GROUP BY id) d
            WHERE t.id = d.id AND {_REOPENABLE} AND t.status <> 'pending'
            RETURNING t.id""",
        {"tasks": list(task_ids)},
    ).fetchall()
    return [r["id"] for r in rows]


def recount_pending_tasks(conn: Connection, run_id: uuid.UUID) -> int:
    """Set every pending task's dependency counters of the run from its upstreams' statuses
    (the definition of the counters; the invariant checker computes the same), and every slot
    of its joins (migration 0027): `remaining` its upstreams not finished, nothing held (the
    join's row counts every end recounted here; the caller recounts the run's count, so what
    slots carried goes with what tasks carried, reopen_run)."""
    counted = conn.execute(
        """UPDATE tasks t SET unfinished_deps = c.unfinished, failed_deps = c.failed, skipped_deps = c.skipped
           FROM (SELECT d.id,
                        count(u.id) FILTER (WHERE u.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))
                            AS unfinished,
                        count(u.id) FILTER (WHERE u.status = 'failed') AS failed,
                        count(u.id) FILTER (WHERE u.status = 'skipped') AS skipped
                 FROM tasks d
                 LEFT JOIN task_edges e ON e.downstream_task_id = d.id
                 LEFT JOIN tasks u ON u.id = e.upstream_task_id
                 WHERE d.run_id = %s AND d.status = 'pending'
                 GROUP BY d.id) c
           WHERE t.id = c.id AND t.status = 'pending'""",
        (run_id,),
    ).rowcount
    conn.execute(
        """UPDATE join_slots s SET remaining = c.open, arrived = 0, carried = 0
           FROM (SELECT j.task_id, j.slot,
                        count(*) FILTER (WHERE u.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))::int
                            AS open
                 FROM join_slots j
                 JOIN task_edges e ON e.downstream_task_id = j.task_id AND e.slot = j.slot
                 JOIN tasks u ON u.id = e.upstream_task_id
                 WHERE j.run_id = %s
                 GROUP BY j.task_id, j.slot) c
           WHERE s.task_id = c.task_id AND s.slot = c.slot""",
        (run_id,),
    )
    return counted


def decide_pending_tasks(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    """Pending tasks of the run with no unfinished dependency: their trigger rule makes them
    ready (waiting, for human steps) or skipped. Returns the decided rows (id, status)."""
    holds = _RULE_HOLDS.format(failed="t.failed_deps", skipped="t.skipped_deps")
    return conn.execute(
        f"""UPDATE tasks t SET
                status = CASE WHEN {holds} THEN {_READY_STATUS}
                              ELSE 'skipped' END,
                available_at = tw_now(),
                wait_expires_at = CASE WHEN {holds} AND {_HUMAN} AND t.timeout_s IS NOT NULL
                                       THEN tw_now() + make_interval(secs => t.timeout_s) END,
                finished_at = CASE WHEN {holds} THEN NULL ELSE tw_now() END
            WHERE t.run_id = %s AND t.status = 'pending' AND t.unfinished_deps = 0
            RETURNING t.id, t.status, t.kind""",
        (run_id,),
    ).fetchall()


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


# --- reads of a run's tasks for the API (issue 17; map nodes, issue 19) ------------------------
#
# A map node (kind 'map') is one row per data version; once expanded its children (map items)
# are rows of the same (run, node, version) with `map_parent_id` naming it and `map_index`
# 0..n-1 (every other task has map_index -1). Children are upstreams of their map node in
# task_edges, so a task's node-level upstreams are its upstreams that are not map items.

# The status a read shows: an expanded map node waiting for its items (its row is 'pending',
# its unfinished_deps counting its open items) is 'running'.
SHOWN_STATUS = ("CASE WHEN t.kind = 'map' AND t.status = 'pending' AND t.map_width IS NOT NULL "
                "THEN 'running' ELSE t.status END")

# Whether a task is in the dead-letter queue: failed, with an open entry (not yet retried or
# purged). Only failed rows probe dead_letters_open_task_idx (the AND stops at a false status).
# For one row or an aggregate; a page of tasks asks for its failed ones apart (dead_lettered),
# so that the page's plan stays an index range with nothing computed before its sort.
DEAD_LETTERED = ("(t.status = 'failed' AND EXISTS (SELECT 1 FROM dead_letters dl "
                 "WHERE dl.task_id = t.id AND dl.retried_at IS NULL))")


def mark_dead_lettered(conn: Connection, rows: Sequence[Row]) -> None:
    """Set `dead_lettered` on each row (tasks with `id` and `status`): one lookup of the open
    entries of the failed ones, none when no row failed."""
    failed = [r["id"] for r in rows if r["status"] == "failed"]
    open_entries: set[Any] = set()
    if failed:
        open_entries = {r["task_id"] for r in conn.execute(
            "SELECT task_id FROM dead_letters WHERE task_id = ANY(%s) AND retried_at IS NULL", (failed,)
        ).fetchall()}
    for row in rows:
        row["dead_lettered"] = row["id"] in open_entries


def upstream_nodes(conn: Connection, run_id: uuid.UUID, tasks: Sequence[Row]) -> dict[uuid.UUID, list[str]]:
    """The node-level upstreams of each of `tasks` of the run (rows with `id`, `node_id`, `kind`
    and `version`), in node id order. A map node's items, which are upstreams of it too, are left
    out; map items have none (leave them out of `tasks`).

    One statement for all of `tasks`, not a subquery per task: in a run with a big map, the
    planner's estimate of edges per task is skewed by the map node's (one per item), and a plan
    chosen for that, run once per task of a page, scans the tasks table each time. A map node's
    upstreams are found from the other side, among the node-level tasks of its version (a probe
    of the edge's primary key each), not by visiting every edge of its items."""
    found: dict[uuid.UUID, list[str]] = {t["id"]: [] for t in tasks}
    plain = [t for t in tasks if t["kind"] != "map"]
    maps = [t for t in tasks if t["kind"] == "map"]
    rows: list[Row] = []
    if plain:
        rows += conn.execute(
            """SELECT d.id, u.node_id
               FROM unnest(%s::uuid[]) AS d(id)
               JOIN task_edges e ON e.downstream_task_id = d.id
               JOIN tasks u ON u.id = e.upstream_task_id""",
            ([t["id"] for t in plain],),
        ).fetchall()
    if maps:
        rows += conn.execute(
            """SELECT m.id, u.node_id
               FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS m(id, node_id, version)
               JOIN tasks u ON u.run_id = %s AND u.version = m.version AND u.map_index = -1
                           AND u.node_id <> m.node_id
               WHERE EXISTS (SELECT 1 FROM task_edges e WHERE e.upstream_task_id = u.id AND e.downstream_task_id = m.id)""",
            ([t["id"] for t in maps], [t["node_id"] for t in maps], [t["version"] for t in maps], run_id),
        ).fetchall()
    for row in rows:
        found[row["id"]].append(str(row["node_id"]))
    for names in found.values():
        names.sort()
    return found


def list_tasks_of_run(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> list[Row]:
    """Every task of the run, map items included (after their map node), with its node-level
    upstreams (`depends`). Unbounded: for tests and small runs; the API pages (`page_tasks_of_run`)."""
    rows = conn.execute(
        """SELECT t.id, t.node_id, t.version, t.kind, t.task_name, t.status, t.attempt, t.max_attempts,
                  t.created_at, t.dispatched_at, t.started_at, t.finished_at, t.lease_expires_at,
                  t.progress, t.message, t.output, t.error, t.map_index, t.map_parent_id, t.map_item, t.map_width
           FROM tasks t WHERE t.workspace_id = %s AND t.run_id = %s
           ORDER BY t.version, t.position, t.map_index""",
        (workspace_id, run_id),
    ).fetchall()
    upstream = upstream_nodes(conn, run_id, [r for r in rows if r["map_parent_id"] is None])
    for row in rows:
        row["depends"] = upstream.get(row["id"], [])
    mark_dead_lettered(conn, rows)
    return rows


def get_task(conn: Connection, workspace_id: str, task_id: uuid.UUID) -> Row | None:
    """A task as stored (its status too: `SHOWN_STATUS` is for what the API shows), and whether
    it is in the dead-letter queue (`dead_lettered`)."""
    return conn.execute(
        f"""SELECT t.id, t.run_id, t.pipeline_id, t.node_id, t.version, t.kind, t.task_name, t.status, t.attempt,
                  t.max_attempts, t.params, t.created_at, t.dispatched_at, t.started_at, t.finished_at,
                  t.lease_expires_at, t.progress, t.message, t.output, t.error, t.code_version,
                  t.map_index, t.map_parent_id, t.map_item, t.map_spec, t.map_width,
                  {DEAD_LETTERED} AS dead_lettered
           FROM tasks t WHERE t.workspace_id = %s AND t.id = %s""",
        (workspace_id, task_id),
    ).fetchone()


def list_attempts(conn: Connection, task_ids: Sequence[uuid.UUID]) -> list[Row]:
    return conn.execute(
        """SELECT task_id, attempt, status, dispatched_at, started_at, finished_at, error, code_version
           FROM task_attempts WHERE task_id = ANY(%s) ORDER BY task_id, attempt""",
        (list(task_ids),),
    ).fetchall()


# Bounded reads: counts, and pages keyset-paginated on the unique index
# (run_id, node_id, version, map_index), so a page costs O(page) however big the run.

_PAGE_COLUMNS = f"""t.id, t.node_id, t.version, t.position, t.kind, t.task_name, {SHOWN_STATUS} AS status,
                  t.attempt, t.max_attempts, t.created_at, t.dispatched_at, t.started_at, t.finished_at,
                  t.lease_expires_at, t.progress, t.message, t.output, t.error,
                  t.map_index, t.map_parent_id, t.map_item, t.map_spec, t.map_width"""


def status_counts_of_run(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    """The run's tasks by shown status and map node (`map_parent_id`: null for the tasks that are
    not map items): one aggregate over the run, which also counts each map node's items."""
    return conn.execute(
        f"""SELECT {SHOWN_STATUS} AS status, t.map_parent_id, count(*)::int AS n
            FROM tasks t WHERE t.run_id = %s GROUP BY 1, 2""",
        (run_id,),
    ).fetchall()


def count_tasks_of_run(conn: Connection, run_id: uuid.UUID) -> dict[str, int]:
    """The run's tasks by shown status, map items included."""
    counts: dict[str, int] = {}
    for row in status_counts_of_run(conn, run_id):
        counts[str(row["status"])] = counts.get(str(row["status"]), 0) + int(row["n"])
    return counts


def node_counts_of_run(conn: Connection, run_id: uuid.UUID, *, after_position: int, limit: int) -> list[Row]:
    """Node-level tasks (map items left out) by node and shown status, for the nodes at positions
    after `after_position`, at most `limit` nodes, in definition order. Every node of a run has a
    task for each of its versions, so the positions are 0..n-1 and a page of nodes is a range of
    them. The groups of a mapped node carry its `map_spec`, the ids of its map nodes (`map_ids`)
    and the sum (`map_width`) and number (`map_expanded`) of their widths where expanded."""
    return conn.execute(
        f"""SELECT t.position, t.node_id, t.kind, t.task_name, {SHOWN_STATUS} AS status, count(*)::int AS n,
                   sum(t.map_width)::int AS map_width, count(t.map_width)::int AS map_expanded,
                   (array_agg(t.map_spec) FILTER (WHERE t.kind = 'map'))[1] AS map_spec,
                   array_agg(t.id) FILTER (WHERE t.kind = 'map') AS map_ids
            FROM tasks t
            WHERE t.run_id = %s AND t.map_index = -1 AND t.position > %s AND t.position <= %s
            GROUP BY 1, 2, 3, 4, 5
            ORDER BY 1, 5""",
        (run_id, after_position, after_position + limit),
    ).fetchall()


def page_tasks_of_run(
    conn: Connection, workspace_id: str, run_id: uuid.UUID, *, status: str | None = None, node: str | None = None,
    after: tuple[str, str, int] | None = None, limit: int, max_depends: int = 100, items: bool = True,
) -> list[Row]:
    """A page of the run's tasks in (node_id, version, map_index) order, after the key `after`: an
    index range of tasks_run_node_version_item_key (with `node`, a range within that node), so a
    map node comes before its items, and its items are in index order. `items=False` leaves map
    items out. `status` is the shown status. Each task lists at most `max_depends` of its
    node-level upstreams (`depends_count` has them all)."""
    where = ["t.workspace_id = %(ws)s", "t.run_id = %(run)s"]
    if status is not None:
        # On the status column, so the planner's estimate is the column's (SHOWN_STATUS spelled out).
        if status == "running":
            where.append("(t.status = 'running' OR (t.status = 'pending' AND t.kind = 'map' AND t.map_width IS NOT NULL))")
        elif status == "pending":
            where.append("t.status = 'pending' AND NOT (t.kind = 'map' AND t.map_width IS NOT NULL)")
        else:
            where.append("t.status = %(status)s")
    if node is not None:
        where.append("t.node_id = %(node)s")
    if not items:
        where.append("t.map_index = -1")
    if after is not None:
        where.append("(t.node_id, t.version, t.map_index) > (%(after_node)s, %(after_version)s, %(after_index)s)")
    rows = conn.execute(
        f"""SELECT {_PAGE_COLUMNS}
            FROM tasks t
            WHERE {" AND ".join(where)}
            ORDER BY t.node_id, t.version, t.map_index
            LIMIT %(limit)s""",
        {"ws": workspace_id, "run": run_id, "status": status, "node": node,
         "after_node": after[0] if after else None, "after_version": after[1] if after else None,
         "after_index": after[2] if after else None, "limit": limit},
    ).fetchall()
    upstream = upstream_nodes(conn, run_id, [r for r in rows if r["map_parent_id"] is None])
    for row in rows:
        names = upstream.get(row["id"], [])
        row["depends"], row["depends_count"] = names[:max_depends], len(names)
    mark_dead_lettered(conn, rows)
    return rows


def map_item_counts(conn: Connection, parent_ids: Sequence[uuid.UUID]) -> list[Row]:
    """The items of each map node of `parent_ids` by status (map_parent_id, status, n)."""
    if not parent_ids:
        return []
    return conn.execute(
        """SELECT map_parent_id, status, count(*)::int AS n FROM tasks
           WHERE map_parent_id = ANY(%s) GROUP BY 1, 2""",
        (list(parent_ids),),
    ).fetchall()


def latest_attempts(conn: Connection, task_ids: Sequence[uuid.UUID], per_task: int) -> list[Row]:
    """The last `per_task` attempts of each task (for a page of tasks), oldest first."""
    if not task_ids:
        return []
    return conn.execute(
        """SELECT a.task_id, a.attempt, a.status, a.dispatched_at, a.started_at, a.finished_at, a.error, a.code_version
           FROM unnest(%s::uuid[]) AS p(task_id)
           CROSS JOIN LATERAL (
               SELECT * FROM task_attempts x WHERE x.task_id = p.task_id ORDER BY x.attempt DESC LIMIT %s
           ) a
           ORDER BY a.task_id, a.attempt""",
        (list(task_ids), per_task),
    ).fetchall()
