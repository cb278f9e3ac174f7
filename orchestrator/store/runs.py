"""Runs: creation with their tasks and edges, listing, and the counter that finishes a run."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
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
    on_timeout: str | None = None
    output_names: list[str] | None = None  # the pipeline outputs this node produces
    map_spec: dict[str, Any] | None = None  # a map node's `map:` (kind 'map')
    map_max_concurrency: int | None = None
    map_targets: list[dict[str, Any]] | None = None  # map nodes mapping over this task: [{parent, path, over}]


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
    schedule_id: uuid.UUID | None = None
    status: str = "running"  # or "pending": queued behind max_active_runs / overlap: buffer_one
    max_active_runs: int | None = None
    orchestration_id: uuid.UUID | None = None
    blocked_upstreams: int = 0  # upstream runs of its orchestration still to complete
    request_sha256: str | None = None  # fingerprint of the request its idempotency key names


def insert_run(conn: Connection, run: NewRun, task_count: int) -> uuid.UUID | None:
    """Insert a run; None when its idempotency key, or its schedule slot, was taken before.

    No conflict target: the two unique indexes that can refuse a run are each only ever hit by
    their own kind of trigger (a scheduled run has no idempotency key, a manual one no slot).
    """
    row = conn.execute(
        """INSERT INTO runs (id, workspace_id, pipeline_id, pipeline_version, status, trigger,
                             trigger_source_execution_id, trigger_source_pipeline_id, scheduled_at,
                             triggered_by, idempotency_key, params, versions, unfinished_tasks, started_at,
                             schedule_id, max_active_runs, orchestration_id, blocked_upstreams, request_sha256)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                   CASE WHEN %s = 'running' THEN tw_now() END, %s, %s, %s, %s, %s)
           ON CONFLICT DO NOTHING
           RETURNING id""",
        (run.id, run.workspace_id, run.pipeline_id, run.pipeline_version, run.status, run.trigger,
         run.trigger_source_execution_id, run.trigger_source_pipeline_id, run.scheduled_at,
         run.triggered_by, run.idempotency_key, Jsonb(run.params), run.versions, task_count,
         run.status, run.schedule_id, run.max_active_runs, run.orchestration_id, run.blocked_upstreams,
         run.request_sha256),
    ).fetchone()
    return None if row is None else row["id"]


def find_by_idempotency_key(conn: Connection, workspace_id: str, pipeline_id: str, key: str) -> Row | None:
    return conn.execute(
        "SELECT id, request_sha256 FROM runs WHERE workspace_id = %s AND pipeline_id = %s AND idempotency_key = %s",
        (workspace_id, pipeline_id, key),
    ).fetchone()


def release_expired_idempotency_key(
    conn: Connection, workspace_id: str, pipeline_id: str, key: str, ttl_s: int
) -> None:
    """A key older than its time to live no longer names its run, so it may start a new one."""
    conn.execute(
        """UPDATE runs SET idempotency_key = NULL
           WHERE workspace_id = %s AND pipeline_id = %s AND idempotency_key = %s
             AND created_at <= tw_now() - make_interval(secs => %s)""",
        (workspace_id, pipeline_id, key, ttl_s),
    )


def insert_tasks(conn: Connection, run: NewRun, tasks: Sequence[NewTask]) -> None:
    """All tasks of a run in one statement (unnest of column arrays): a 10,000-node run is one round trip."""
    conn.execute(
        """INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind, task_name,
                              params, transport, status, priority, max_attempts, retry, timeout_s,
                              heartbeat_s, on_failure, trigger_rule, unfinished_deps, on_timeout, wait_expires_at,
                              output_names, map_spec, map_max_concurrency, map_targets)
           SELECT t.id, %(run_id)s, %(workspace_id)s, %(pipeline_id)s, t.node_id, t.version, t.position, t.kind, t.task_name, t.params, t.transport,
                  CASE WHEN t.unfinished_deps > 0 OR NOT %(start)s THEN 'pending'
                       WHEN t.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END,
                  t.priority, t.max_attempts, t.retry, t.timeout_s, t.heartbeat_s, t.on_failure,
                  t.trigger_rule, t.unfinished_deps, t.on_timeout,
                  CASE WHEN t.unfinished_deps = 0 AND %(start)s AND t.kind IN ('approval', 'manual')
                            AND t.timeout_s IS NOT NULL
                       THEN tw_now() + make_interval(secs => t.timeout_s) END,
                  CASE WHEN t.output_names IS NULL THEN NULL
                       ELSE ARRAY(SELECT jsonb_array_elements_text(t.output_names)) END,
                  t.map_spec, t.map_max_concurrency, t.map_targets
           FROM unnest(%(id)s::uuid[], %(node_id)s::text[], %(version)s::text[], %(position)s::int[],
                       %(kind)s::text[], %(task_name)s::text[], %(params)s::jsonb[], %(transport)s::text[],
                       %(priority)s::int[], %(max_attempts)s::int[], %(retry)s::jsonb[], %(timeout_s)s::int[],
                       %(heartbeat_s)s::int[], %(on_failure)s::text[], %(trigger_rule)s::text[],
                       %(unfinished_deps)s::int[], %(on_timeout)s::text[], %(output_names)s::jsonb[],
                       %(map_spec)s::jsonb[], %(map_max_concurrency)s::int[], %(map_targets)s::jsonb[])
             AS t(id, node_id, version, position, kind, task_name, params, transport, priority, max_attempts, retry,
                  timeout_s, heartbeat_s, on_failure, trigger_rule, unfinished_deps, on_timeout, output_names,
                  map_spec, map_max_concurrency, map_targets)""",
        {
            "run_id": run.id, "workspace_id": run.workspace_id, "pipeline_id": run.pipeline_id,
            "start": run.status == "running",
            "id": [t.id for t in tasks], "node_id": [t.node_id for t in tasks],
            "version": [t.version for t in tasks], "position": [t.position for t in tasks],
            "kind": [t.kind for t in tasks], "task_name": [t.task_name for t in tasks],
            "params": [Jsonb(t.params) for t in tasks], "transport": [t.transport for t in tasks],
            "priority": [t.priority for t in tasks], "max_attempts": [t.max_attempts for t in tasks],
            "retry": [Jsonb(t.retry) for t in tasks], "timeout_s": [t.timeout_s for t in tasks],
            "heartbeat_s": [t.heartbeat_s for t in tasks], "on_failure": [t.on_failure for t in tasks],
            "trigger_rule": [t.trigger_rule for t in tasks], "unfinished_deps": [t.unfinished_deps for t in tasks],
            "on_timeout": [t.on_timeout for t in tasks],
            "output_names": [None if t.output_names is None else Jsonb(t.output_names) for t in tasks],
            "map_spec": [None if t.map_spec is None else Jsonb(t.map_spec) for t in tasks],
            "map_max_concurrency": [t.map_max_concurrency for t in tasks],
            "map_targets": [None if t.map_targets is None else Jsonb(t.map_targets) for t in tasks],
        },
    )


# A join with at least JOIN_SLOTS_FROM upstreams is counted down through slots (migration 0027):
# about JOIN_SLOT_SIZE upstreams each, at most MAX_JOIN_SLOTS, dealt in upstream id order (the
# order a claim takes them in, so ends arriving together fall into different slots). A join of
# 1,000 then has its row written 64 times, not 1,000. A map node's upstreams are not dealt into
# slots here; its items are, when it expands (store/maps.py insert_children).
JOIN_SLOTS_FROM = 8
JOIN_SLOT_SIZE = 4
MAX_JOIN_SLOTS = 64


def join_slot_count(width: int) -> int | None:
    """How many slots a join of `width` upstreams is counted through (None: on its own row)."""
    if width < JOIN_SLOTS_FROM:
        return None
    return min(MAX_JOIN_SLOTS, max(2, width // JOIN_SLOT_SIZE))


def insert_edges(
    conn: Connection, run_id: uuid.UUID, edges: Sequence[tuple[uuid.UUID, uuid.UUID]], *,
    map_nodes: Collection[uuid.UUID] = (),
) -> None:
    """A run's edges (upstream, downstream), with the slots of its wide joins (not `map_nodes`,
    which count their items on their row) and their join_slots rows."""
    if not edges:
        return
    conn.execute(
        """WITH e AS (
               SELECT x.u, x.d, count(*) OVER (PARTITION BY x.d) AS width,
                      row_number() OVER (PARTITION BY x.d ORDER BY x.u) - 1 AS rank
               FROM unnest(%(ups)s::uuid[], %(downs)s::uuid[]) AS x(u, d)
           ), inserted AS (
               INSERT INTO task_edges (upstream_task_id, downstream_task_id, slot)
               SELECT e.u, e.d,
                      CASE WHEN e.width >= %(from)s AND e.d <> ALL(%(maps)s::uuid[])
                           THEN (e.rank %% LEAST(%(most)s, GREATEST(2, e.width / %(size)s)))::smallint END
               FROM e
               RETURNING downstream_task_id, slot
           )
           INSERT INTO join_slots (task_id, slot, run_id, remaining)
           SELECT i.downstream_task_id, i.slot, %(run)s, count(*)::int
           FROM inserted i WHERE i.slot IS NOT NULL
           GROUP BY i.downstream_task_id, i.slot""",
        {"ups": [e[0] for e in edges], "downs": [e[1] for e in edges], "maps": list(map_nodes), "run": run_id,
         "from": JOIN_SLOTS_FROM, "size": JOIN_SLOT_SIZE, "most": MAX_JOIN_SLOTS},
    )


def finish_tasks_of_run(
    conn: Connection, run_id: uuid.UUID, *, finished: Sequence[uuid.UUID], failed: int, error: str | None,
    failures: int = 0, released: int = 0,
) -> Row | None:
    """Count the tasks `finished` (which this transaction took to a terminal state and holds
    locked; of them `failures` failed, and `failed` are stopping failures) against the run, with
    what the callback statement carried to them (tasks.carried_tasks, migration 0026: the
    engine's paths never carry, they take the carried count off the run with the task), and
    `released`: counts carried to slots of joins that were no longer pending when their slot
    completed (migration 0027).

    The statement that takes `unfinished_tasks` to 0 decides the final status: failed when any
    stopping failure was counted, else succeeded. A stopping failure does not end the run by
    itself: its unstarted tasks were skipped in the same transaction, and the run ends when the
    attempts still out with workers and the failure handlers (`all_done`, `one_failed`) have
    settled, so a finished run never has a task left open. A run already terminal keeps its
    status. Returns its status and unfinished count after, and the status before (a run that
    became terminal here has `previous_status` 'running').

    `failed_task_count` (every failed task, tolerated or not, map items included: what the API
    shows as `failed_tasks`) is kept here, by the statement that counts every task's end: a
    failure always ends on this path (the callback statement records successes only).
    """
    return conn.execute(
        """WITH ended AS (
               SELECT cardinality(%(ids)s::uuid[]) + %(released)s::int
                      + COALESCE((SELECT sum(t.carried_tasks) FROM tasks t WHERE t.id = ANY(%(ids)s::uuid[])), 0)
                      AS n
           )
           UPDATE runs r SET
               unfinished_tasks = r.unfinished_tasks - ended.n,
               failed_tasks = r.failed_tasks + %(failed)s,
               failed_task_count = r.failed_task_count + %(failures)s,
               status = CASE
                   WHEN r.status IN ('succeeded', 'failed', 'cancelled') THEN r.status
                   WHEN r.unfinished_tasks - ended.n = 0 THEN
                       CASE WHEN r.failed_tasks + %(failed)s > 0 THEN 'failed' ELSE 'succeeded' END
                   ELSE r.status END,
               finished_at = CASE
                   WHEN r.finished_at IS NULL AND r.unfinished_tasks - ended.n = 0
                   THEN tw_now() ELSE r.finished_at END,
               error = COALESCE(r.error, %(error)s)
           FROM (SELECT id, status FROM runs WHERE id = %(run_id)s FOR NO KEY UPDATE) AS before, ended
           WHERE r.id = before.id
           RETURNING r.status, r.unfinished_tasks, before.status AS previous_status""",
        {"ids": list(finished), "released": released, "failed": failed, "failures": failures, "error": error, "run_id": run_id},
    ).fetchone()


# What a run answer shows of its failures: `failed_tasks`, the run's tasks that failed (items
# included, tolerated or not; the stored counter, not a count per request), and whether it
# succeeded with tolerated failures. (The column runs.failed_tasks, the stopping failures still
# standing, is the engine's; answers do not show it.)
FAILURES = """failed_task_count AS failed_tasks,
              (status = 'succeeded' AND failed_task_count > 0) AS succeeded_with_failures"""


def get_run(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> Row | None:
    return conn.execute(
        f"""SELECT id, workspace_id, pipeline_id, pipeline_version, status, trigger,
                  trigger_source_execution_id, trigger_source_pipeline_id, scheduled_at, triggered_by, event_id,
                  idempotency_key, params, versions, unfinished_tasks, {FAILURES}, error, schedule_id,
                  backfill_id, orchestration_id, blocked_upstreams, created_at, started_at, finished_at
           FROM runs WHERE workspace_id = %s AND id = %s""",
        (workspace_id, run_id),
    ).fetchone()


def run_outcome(conn: Connection, run_id: uuid.UUID) -> Row | None:
    """What follows a run's end needs: its status, versions, pinned version and orchestration."""
    return conn.execute(
        """SELECT id, workspace_id, pipeline_id, pipeline_version, status, versions, orchestration_id
           FROM runs WHERE id = %s""",
        (run_id,),
    ).fetchone()


def list_runs(
    conn: Connection, workspace_id: str, *, pipeline_id: str | None, status: str | None, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """Newest first, keyset-paginated on (created_at, id)."""
    before_at, before_id = before if before else (None, None)
    return conn.execute(
        f"""SELECT id, pipeline_id, pipeline_version, status, trigger, scheduled_at, triggered_by, event_id,
                  schedule_id, versions, unfinished_tasks, {FAILURES}, error, created_at, started_at, finished_at
           FROM runs
           WHERE workspace_id = %s
             AND (%s::text IS NULL OR pipeline_id = %s)
             AND (%s::text IS NULL OR status = %s)
             AND (%s::timestamptz IS NULL OR (created_at, id) < (%s, %s::uuid))
           ORDER BY created_at DESC, id DESC
           LIMIT %s""",
        (workspace_id, pipeline_id, pipeline_id, status, status, before_at, before_at, before_id, limit),
    ).fetchall()


def open_runs(conn: Connection, workspace_id: str, pipeline_id: str) -> list[Row]:
    """Running and queued runs of a pipeline, oldest first."""
    return conn.execute(
        """SELECT id, status, max_active_runs, blocked_upstreams, created_at FROM runs
           WHERE workspace_id = %s AND pipeline_id = %s AND status IN ('pending', 'running')
           ORDER BY created_at, id""",
        (workspace_id, pipeline_id),
    ).fetchall()


def start_queued_run(conn: Connection, run_id: uuid.UUID) -> bool:
    """A queued run starts: running, and its root tasks ready."""
    row = conn.execute(
        """UPDATE runs SET status = 'running', started_at = tw_now()
           WHERE id = %s AND status = 'pending' RETURNING id""",
        (run_id,),
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        """UPDATE tasks SET status = CASE WHEN kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END,
                  available_at = tw_now(),
                  wait_expires_at = CASE WHEN kind IN ('approval', 'manual') AND timeout_s IS NOT NULL
                                         THEN tw_now() + make_interval(secs => timeout_s) END
           WHERE run_id = %s AND status = 'pending' AND unfinished_deps = 0""",
        (run_id,),
    )
    return True


def reopen_run(conn: Connection, run_id: uuid.UUID, from_statuses: tuple[str, ...]) -> Row | None:
    """A run resumes after a repair (redrive, dead-letter retry): running, its counters recounted
    from its tasks (unfinished: not terminal; failed: stopping failures still standing; the
    failed task count: every failure still standing), its error kept only while a stopping
    failure stands. The caller holds every task of the run (lock_tasks_of_run): what was carried
    to its tasks (tasks.carried_tasks, migration 0026) is set to 0, the recount standing for it,
    so a task taken back from finished brings no spent count back."""
    return conn.execute(
        """WITH uncarried AS (
               UPDATE tasks SET carried_tasks = 0
               WHERE run_id = %(run)s AND carried_tasks > 0
                 AND EXISTS (SELECT 1 FROM runs WHERE id = %(run)s AND status = ANY(%(from)s))
           ), counts AS (
               SELECT count(*) FILTER (WHERE t.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))
                          AS unfinished,
                      count(*) FILTER (WHERE t.status = 'failed' AND t.on_failure = 'stop') AS failed,
                      count(*) FILTER (WHERE t.status = 'failed') AS failures
               FROM tasks t WHERE t.run_id = %(run)s
           )
           UPDATE runs r SET status = 'running', finished_at = NULL,
                  error = CASE WHEN c.failed > 0 THEN r.error END,
                  failed_tasks = c.failed, unfinished_tasks = c.unfinished, failed_task_count = c.failures
           FROM counts c
           WHERE r.id = %(run)s AND r.status = ANY(%(from)s)
           RETURNING r.id, r.status, r.unfinished_tasks, r.failed_tasks""",
        {"run": run_id, "from": list(from_statuses)},
    ).fetchone()


def run_counters(conn: Connection, run_id: uuid.UUID) -> Row | None:
    """A running run's counters as this transaction left them (None once it ended)."""
    return conn.execute(
        "SELECT id, status, unfinished_tasks, failed_tasks FROM runs WHERE id = %s AND status = 'running'", (run_id,)
    ).fetchone()


def run_state(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> Row | None:
    """A run's status, unlocked: the first look of a repair, before it locks tasks then the run."""
    return conn.execute(
        "SELECT id, status, pipeline_id, failed_tasks FROM runs WHERE workspace_id = %s AND id = %s",
        (workspace_id, run_id),
    ).fetchone()


def lock_run(conn: Connection, workspace_id: str, run_id: uuid.UUID) -> Row | None:
    """The run row, locked. Lock order: a run's tasks before its run row (every finisher counts
    against the run last), so take this after any task locks the transaction needs."""
    return conn.execute(
        "SELECT id, status, pipeline_id, failed_tasks FROM runs WHERE workspace_id = %s AND id = %s FOR UPDATE",
        (workspace_id, run_id),
    ).fetchone()


def cancel_run(conn: Connection, run_id: uuid.UUID, reason: str) -> bool:
    """Cancel a pending or running run and every unfinished task of it (tasks first, then the
    run: the lock order of every finisher). Later callbacks of its tasks are refused."""
    cancelled = conn.execute(
        """WITH locked AS (
               SELECT id FROM tasks WHERE run_id = %s
                 AND status IN ('pending', 'ready', 'dispatched', 'running', 'waiting')
               ORDER BY id FOR UPDATE
           )
           UPDATE tasks t SET status = 'cancelled', finished_at = tw_now(), claim_token = NULL,
                  lease_expires_at = NULL, wait_expires_at = NULL
           FROM locked WHERE t.id = locked.id
           RETURNING t.id, t.attempt""",
        (run_id,),
    ).fetchall()
    if cancelled:
        # A statement of its own, so a new snapshot: a callback that committed while the lock
        # above waited may have claimed tasks (their attempt rows inserted then); the locked
        # update followed those tasks to their new attempt, and a data-modifying CTE of the
        # same statement would not see the new attempt rows (they would stay 'dispatched').
        conn.execute(
            """UPDATE task_attempts a SET status = 'cancelled', finished_at = tw_now()
               FROM unnest(%s::uuid[], %s::int[]) AS c(id, attempt)
               WHERE a.task_id = c.id AND a.attempt = c.attempt AND a.status IN ('dispatched', 'running')""",
            ([r["id"] for r in cancelled], [r["attempt"] for r in cancelled]),
        )
    row = conn.execute(
        """UPDATE runs SET status = 'cancelled', unfinished_tasks = 0, finished_at = tw_now(),
                  error = COALESCE(error, %s)
           WHERE id = %s AND status IN ('pending', 'running') RETURNING id""",
        (reason, run_id),
    ).fetchone()
    return row is not None


def pipelines_with_queued_runs(conn: Connection, limit: int, after: tuple[str, str] | None = None) -> list[Row]:
    """Pipelines with queued runs, in key order after `after` (the last of the previous page): a
    page of pipelines all at their limit does not hide the ones after it (runs_pipeline_open_idx
    gives the order)."""
    if after is None:
        return conn.execute(
            """SELECT DISTINCT workspace_id, pipeline_id FROM runs
               WHERE status = 'pending' AND blocked_upstreams = 0
               ORDER BY workspace_id, pipeline_id LIMIT %s""",
            (limit,),
        ).fetchall()
    return conn.execute(
        """SELECT DISTINCT workspace_id, pipeline_id FROM runs
           WHERE status = 'pending' AND blocked_upstreams = 0 AND (workspace_id, pipeline_id) > (%s, %s)
           ORDER BY workspace_id, pipeline_id LIMIT %s""",
        (after[0], after[1], limit),
    ).fetchall()
