"""Aggregates for GET /api/metrics: read-only, one workspace, one window.

The window selects a cohort of runs: those created at or after `since` (and optionally of one
pipeline). Every statement starts from that cohort through `runs_workspace_created_idx`
(`runs_pipeline_created_idx` with a pipeline), and reaches tasks by their (run_id, ...) unique
index and attempts by their (task_id, attempt) primary key: the cost is the window's work, not
the table's size. Durations are seconds (float), percentiles `percentile_cont` (interpolated).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrator.db.connection import Connection, Row
from orchestrator.store.tasks import DEAD_LETTERED

# The cohort predicate on `runs r`. The pipeline test is added only when a pipeline is given, so
# the planner sees `pipeline_id = $x` and can use the (workspace, pipeline, created_at) index.
_COHORT = "r.workspace_id = %(ws)s AND r.created_at >= %(since)s"
_COHORT_PIPELINE = _COHORT + " AND r.pipeline_id = %(pipeline)s"

_QUANTILES = "ARRAY[0.5, 0.95, 0.99]::float8[]"


def _cohort(pipeline_id: str | None) -> str:
    return _COHORT_PIPELINE if pipeline_id is not None else _COHORT


def _params(workspace_id: str, since: datetime, pipeline_id: str | None) -> dict[str, Any]:
    return {"ws": workspace_id, "since": since, "pipeline": pipeline_id}


def window_bounds(conn: Connection, window_s: int) -> Row:
    """Database time now and the window's start (`tw_now()` is the only clock)."""
    row = conn.execute(
        "SELECT tw_now() AS now, tw_now() - make_interval(secs => %s) AS since", (window_s,)
    ).fetchone()
    assert row is not None
    return row


def run_counts(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> list[Row]:
    """(pipeline_id, status, n) for the cohort."""
    return conn.execute(
        f"""SELECT r.pipeline_id, r.status, count(*) AS n FROM runs r
            WHERE {_cohort(pipeline_id)}
            GROUP BY r.pipeline_id, r.status""",
        _params(workspace_id, since, pipeline_id),
    ).fetchall()


def run_durations(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> list[Row]:
    """Durations (finished_at - started_at) of the cohort's finished runs (succeeded or failed;
    a cancelled run's length says nothing about the pipeline), per pipeline and overall
    (`pipeline_id` NULL with `overall` true)."""
    return conn.execute(
        f"""SELECT r.pipeline_id, GROUPING(r.pipeline_id) = 1 AS overall, count(*) AS n,
                   sum(d.s) AS sum_s, max(d.s) AS max_s,
                   percentile_cont({_QUANTILES}) WITHIN GROUP (ORDER BY d.s) AS q
            FROM runs r
            CROSS JOIN LATERAL (SELECT extract(epoch FROM r.finished_at - r.started_at)::float8 AS s) d
            WHERE {_cohort(pipeline_id)} AND r.status IN ('succeeded', 'failed')
              AND r.started_at IS NOT NULL AND r.finished_at IS NOT NULL
            GROUP BY GROUPING SETS ((r.pipeline_id), ())""",
        _params(workspace_id, since, pipeline_id),
    ).fetchall()


def task_counts(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> list[Row]:
    """(kind, status, dead_lettered, n) over the tasks of the cohort's runs (`dead_lettered`:
    failed with an open dead-letter entry)."""
    return conn.execute(
        f"""SELECT t.kind, t.status, {DEAD_LETTERED} AS dead_lettered, count(*) AS n
            FROM runs r JOIN tasks t ON t.run_id = r.id AND t.workspace_id = r.workspace_id
            WHERE {_cohort(pipeline_id)}
            GROUP BY 1, 2, 3""",
        _params(workspace_id, since, pipeline_id),
    ).fetchall()


def attempt_stats(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> list[Row]:
    """Per pipeline and overall: attempts, attempts beyond a task's first (retries and
    redeliveries), and the durations (finished_at - dispatched_at) of attempts that reached a
    worker and ended (succeeded, failed, expired)."""
    return conn.execute(
        f"""SELECT r.pipeline_id, GROUPING(r.pipeline_id) = 1 AS overall, count(*) AS attempts,
                   count(*) FILTER (WHERE a.attempt > 1) AS retries,
                   count(d.s) AS n, sum(d.s) AS sum_s, max(d.s) AS max_s,
                   percentile_cont({_QUANTILES}) WITHIN GROUP (ORDER BY d.s) AS q
            FROM runs r
            JOIN tasks t ON t.run_id = r.id AND t.workspace_id = r.workspace_id
            JOIN task_attempts a ON a.task_id = t.id
            CROSS JOIN LATERAL (
                SELECT CASE WHEN a.status IN ('succeeded', 'failed', 'expired') AND a.finished_at IS NOT NULL
                            THEN extract(epoch FROM a.finished_at - a.dispatched_at)::float8 END AS s) d
            WHERE {_cohort(pipeline_id)}
            GROUP BY GROUPING SETS ((r.pipeline_id), ())""",
        _params(workspace_id, since, pipeline_id),
    ).fetchall()


def failures_by_code(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> list[Row]:
    """Failed attempts (failed, expired, dispatch_failed) by their error's code and type."""
    return conn.execute(
        f"""SELECT COALESCE(a.error->>'code', a.error->>'type', 'unknown') AS code, a.error->>'type' AS type,
                   count(*) AS n
            FROM runs r
            JOIN tasks t ON t.run_id = r.id AND t.workspace_id = r.workspace_id
            JOIN task_attempts a ON a.task_id = t.id
            WHERE {_cohort(pipeline_id)} AND a.status IN ('failed', 'expired', 'dispatch_failed')
            GROUP BY 1, 2
            ORDER BY n DESC, code, type NULLS FIRST""",
        _params(workspace_id, since, pipeline_id),
    ).fetchall()


def approval_stats(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> Row:
    """Approval gates of the cohort: how they were decided, and how long a person took.

    A gate waits from `available_at` (set when it became waiting) until its decision
    (`finished_at`); approve sets `succeeded`, reject `failed` with error code `rejected`, a
    timeout `failed` with code `timeout`; an escalated gate has `escalated_at`.
    """
    row = conn.execute(
        f"""SELECT count(*) AS total,
                   count(*) FILTER (WHERE t.status = 'succeeded') AS approved,
                   count(*) FILTER (WHERE t.status = 'failed' AND t.error->>'code' = 'rejected') AS rejected,
                   count(*) FILTER (WHERE t.status = 'failed' AND t.error->>'code' = 'timeout') AS timed_out,
                   count(*) FILTER (WHERE t.escalated_at IS NOT NULL) AS escalated,
                   count(*) FILTER (WHERE t.status = 'waiting') AS waiting,
                   count(d.s) AS decided, sum(d.s) AS sum_s,
                   percentile_cont(ARRAY[0.5, 0.95]::float8[]) WITHIN GROUP (ORDER BY d.s) AS q,
                   max(d.s) AS max_s
            FROM runs r
            JOIN tasks t ON t.run_id = r.id AND t.workspace_id = r.workspace_id
            CROSS JOIN LATERAL (
                SELECT CASE WHEN t.status = 'succeeded'
                                 OR (t.status = 'failed' AND t.error->>'code' = 'rejected')
                            THEN extract(epoch FROM t.finished_at - t.available_at)::float8 END AS s) d
            WHERE {_cohort(pipeline_id)} AND t.kind = 'approval'""",
        _params(workspace_id, since, pipeline_id),
    ).fetchone()
    assert row is not None
    return row


def schedule_lag(conn: Connection, workspace_id: str, since: datetime, pipeline_id: str | None) -> Row:
    """How late scheduled runs were created after their slot (created_at - scheduled_at: the
    tick's delay plus the schedule's jitter). Backfill runs, also `trigger=schedule`, are
    left out: their slots are in the past by design."""
    row = conn.execute(
        f"""SELECT count(d.s) AS n, sum(d.s) AS sum_s, max(d.s) AS max_s,
                   percentile_cont(ARRAY[0.5, 0.95]::float8[]) WITHIN GROUP (ORDER BY d.s) AS q
            FROM runs r
            CROSS JOIN LATERAL (SELECT extract(epoch FROM r.created_at - r.scheduled_at)::float8 AS s) d
            WHERE {_cohort(pipeline_id)} AND r.trigger = 'schedule' AND r.scheduled_at IS NOT NULL
              AND r.backfill_id IS NULL""",
        _params(workspace_id, since, pipeline_id),
    ).fetchone()
    assert row is not None
    return row
