"""Idle tick latency as the database grows: `finished` finished task rows, then 0, 10,000 and
100,000 schedules (none due), and nothing ready. An idle tick must cost O(due work), not
O(rows): its latency should stay flat. Every statement one tick sends is then shown with its
plan (EXPLAIN ANALYZE, rolled back), at the largest size.

The rows are written with plain INSERT ... SELECT from one real run and schedule-free pipeline
(loading them through the engine would take minutes and is not what is measured).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from bench.server import Server
from bench.suite import SINGLE, WORKSPACE, RecordingCursor, Suite, noop_engine
from orchestrator.engine.service import Engine

LOAD_BATCH = 250_000


@dataclass(frozen=True)
class IdleLevel:
    schedules: int
    finished_tasks: int
    finished_runs: int
    ticks: int
    median_ms: float
    p95_ms: float
    max_ms: float
    statements_per_tick: float


@dataclass(frozen=True)
class PlannedQuery:
    query: str
    plan: str


@dataclass
class IdleReport:
    levels: list[IdleLevel] = field(default_factory=list)
    plans: list[PlannedQuery] = field(default_factory=list)


def _load_finished_tasks(url: str, engine: Engine, count: int, per_run: int) -> None:
    """`count` succeeded tasks in runs of `per_run` tasks (all succeeded), copied from one real
    run of the one-node pipeline."""
    seed = engine.trigger_run(WORKSPACE, SINGLE, versions=["seed"], dispatch_now=False).id
    runs = max(1, count // per_run)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = tw_now() WHERE run_id = %s", (seed,))
        conn.execute("UPDATE runs SET status = 'succeeded', unfinished_tasks = 0, finished_at = tw_now() "
                     "WHERE id = %s", (seed,))
        conn.execute(
            """INSERT INTO runs
               SELECT (jsonb_populate_record(r, jsonb_build_object('id', gen_random_uuid()))).*
               FROM runs r, generate_series(2, %s::int) WHERE r.id = %s""",
            (runs, seed),
        )
        run_ids = [row[0] for row in conn.execute("SELECT id FROM runs ORDER BY id")]
        seed_task = conn.execute("SELECT id FROM tasks WHERE run_id = %s", (seed,)).fetchone()
        assert seed_task is not None
        step = max(1, LOAD_BATCH // per_run)
        for start in range(0, len(run_ids), step):
            conn.execute(
                """INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind,
                                      task_name, params, transport, status, attempt, max_attempts, retry,
                                      timeout_s, heartbeat_s, on_failure, trigger_rule, unfinished_deps,
                                      output, dispatched_at, started_at, finished_at)
                   SELECT gen_random_uuid(), r.id, t.workspace_id, t.pipeline_id, t.node_id, 'f' || g,
                          t.position, t.kind, t.task_name, t.params, t.transport, 'succeeded', 1,
                          t.max_attempts, t.retry, t.timeout_s, t.heartbeat_s, t.on_failure, t.trigger_rule, 0,
                          jsonb_build_object('key', 'out/' || g), tw_now(), tw_now(), tw_now()
                   FROM tasks t, unnest(%s::uuid[]) r(id), generate_series(1, %s::int) g
                   WHERE t.id = %s""",
                (run_ids[start:start + step], per_run, seed_task[0]),
            )


def _add_schedules(url: str, have: int, want: int) -> None:
    """Active schedules of one pipeline, next fire a day or more away: none is due."""
    if want <= have:
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO schedules (workspace_id, pipeline_id, position, cron, timezone, catchup,
                                      max_catchup_runs, overlap, state, next_slot, next_fire_at)
               SELECT %s, %s, g, '0 3 * * *', 'UTC', 'none', 10, 'allow', 'active',
                      tw_now() + interval '1 day' + g * interval '1 second',
                      tw_now() + interval '1 day' + g * interval '1 second'
               FROM generate_series(%s::int, %s::int) g""",
            (WORKSPACE, SINGLE, have, want - 1),
        )
        conn.execute("VACUUM ANALYZE schedules")


def _time_ticks(engine: Engine, ticks: int) -> tuple[list[float], int]:
    from bench.measure import TALLY

    for _ in range(3):  # warm: connections, caches
        engine.tick()
    TALLY.reset()
    samples: list[float] = []
    for _ in range(ticks):
        started = time.perf_counter()
        summary = engine.tick()
        samples.append((time.perf_counter() - started) * 1000)
        if summary.claimed or summary.schedules_fired:
            raise RuntimeError(f"the tick was not idle: {summary.to_dict()}")
    return samples, TALLY.snapshot()[0]


def _query_text(query: object, conn: psycopg.Connection[tuple[object, ...]]) -> str:
    if isinstance(query, bytes):
        return query.decode()
    if isinstance(query, sql.Composable):
        return query.as_string(conn)
    return str(query)


def _function_statements(conn: psycopg.Connection[tuple[object, ...]], text: str,
                         params: object) -> list[tuple[str, object]]:
    """The statements inside a PL/pgSQL function the tick calls (its own EXPLAIN shows only a
    Function Scan): the claim's scope locks (the sub-selects locking limited workspaces and
    pipelines, with no run given) and the global claim's fair candidate statement, with
    `p_limit` bound to the call's limit."""
    if "tw_claim_ready_tasks" not in text or not isinstance(params, (list, tuple)):
        return []
    row = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'tw_claim_ready_tasks'").fetchone()
    if row is None:
        return []
    found: list[tuple[str, object]] = []
    for chunk in str(row[0]).split(";"):
        if "INTO locked_" in chunk and "FOR UPDATE" in chunk:
            inner = chunk[chunk.index("FROM (") + len("FROM ("):chunk.rindex(") x")]
            # the tick's claim is for no particular run
            found.append((inner.replace("v_ws", "NULL::text").replace("v_p", "NULL::text")
                          .replace("p_run_id", "NULL::uuid"), None))
        elif "WITH RECURSIVE ready_runs" in chunk:
            # the global claim's candidates (fair order), computed without locks
            statement = chunk[chunk.index("WITH RECURSIVE"):].replace(" INTO cand", "").replace("p_limit", "%(limit)s")
            found.append((statement, {"limit": params[0]}))
    return found


def explain_tick(engine: Engine, url: str) -> list[PlannedQuery]:
    """Each distinct statement of one idle tick, with EXPLAIN (ANALYZE, BUFFERS) run in a
    transaction that is rolled back."""
    RecordingCursor.recorded = []
    try:
        engine.tick()
        recorded = list(RecordingCursor.recorded)
    finally:
        RecordingCursor.recorded = None
    plans: list[PlannedQuery] = []
    seen: set[str] = set()
    with psycopg.connect(url, autocommit=True) as conn:
        for query, params in recorded:
            text = _query_text(query, conn)
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            inner = _function_statements(conn, text, params)
            for label, statement, bound in [("", text, params)] + [("inside tw_claim_ready_tasks: ", q, p)
                                                                     for q, p in inner]:
                with conn.transaction(force_rollback=True):
                    rows = conn.execute(  # type: ignore[call-overload]
                        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, bound
                    ).fetchall()
                plans.append(PlannedQuery(label + " ".join(statement.split()), "\n".join(str(r[0]) for r in rows)))
    return plans


def run_idle(server: Server, suite: Suite, *, schedule_levels: Sequence[int], finished: int,
             ticks: int, tasks_per_run: int = 100) -> IdleReport:
    database = "bench_idle_tick"
    url = suite.copy(database)
    engine, _ = noop_engine(url, pool=1, keep=False)
    report = IdleReport()
    try:
        _load_finished_tasks(url, engine, finished, tasks_per_run)
        server.vacuum_analyze(database)
        have = 0
        for level in schedule_levels:
            _add_schedules(url, have, level)
            have = max(have, level)
            samples, statements = _time_ticks(engine, ticks)
            ordered = sorted(samples)
            report.levels.append(IdleLevel(
                schedules=level, finished_tasks=finished, finished_runs=max(1, finished // tasks_per_run), ticks=ticks, median_ms=statistics.median(samples),
                p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], max_ms=ordered[-1],
                statements_per_tick=statements / ticks,
            ))
        report.plans = explain_tick(engine, url)
    finally:
        engine.close()
        server.drop(database)
    return report
