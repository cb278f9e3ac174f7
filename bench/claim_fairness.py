"""What fair claims cost, beside the arrival-order claim they replaced, on one Postgres:
`python -m bench.claim_fairness [--help]`.

For each backlog shape (runs x ready tasks per run, all in one workspace, plus one small run
queued last and one run of another workspace), on a database of its own: the median time of
one claim of `--batch` tasks (rolled back, so every sample sees the same backlog) with the fair
function (migration 0014, as the claim of migration 0017 keeps it with map limits) and with the arrival-order function of migration 0012, loaded into
the same database in turn; and where the small run and the other workspace's run land in the
first batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from bench.server import Server, postgres_server
from orchestrator.config import Settings
from orchestrator.db.connection import Database, connect
from orchestrator.db.migrate import migrate
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

_MIGRATIONS = Path(__file__).resolve().parent.parent / "orchestrator" / "db" / "migrations"
_SPLIT = "DROP FUNCTION tw_claim_ready_tasks(integer, uuid);"


def _function(migration: str) -> str:
    return (_MIGRATIONS / migration).read_text().split(_SPLIT)[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.claim_fairness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="claim batch size (default 100)")
    parser.add_argument("--samples", type=int, default=30, help="claims timed per function (default 30)")
    parser.add_argument("--shapes", default="1x10000,100x100,1000x10",
                        help="backlogs as RUNSxTASKS, comma-separated (default 1x10000,100x100,1000x10)")
    return parser.parse_args(argv)


def _shape(server: Server, runs: int, per_run: int, batch: int, samples: int) -> str:
    name = f"bench_fair_{runs}x{per_run}"
    url = server.fresh_database(name)
    try:
        migrate(url)
        engine = Engine(Settings(database_url=url, local_worker=None), Database(url, max_size=2), transports={})
        engine.create_api_key("tenant-a", "admin")  # creates the workspaces
        engine.create_api_key("tenant-b", "admin")
        engine.create_pipeline("tenant-a", {"id": "backlog", "nodes": [{"id": f"n{i}", "task": "echo"}
                                                                         for i in range(per_run)]})
        for _ in range(runs):
            engine.trigger_run("tenant-a", "backlog", dispatch_now=False)
        engine.create_pipeline("tenant-a", {"id": "small", "nodes": [{"id": "n", "task": "echo"}]})
        small = engine.trigger_run("tenant-a", "small", dispatch_now=False).id
        engine.create_pipeline("tenant-b", {"id": "other", "nodes": [{"id": "n", "task": "echo"}]})
        other = engine.trigger_run("tenant-b", "other", dispatch_now=False).id
        engine.close()
        server.vacuum_analyze(name)
        medians: dict[str, float] = {}
        placed: dict[str, str] = {}
        with connect(url) as admin:
            for label, migration in (("arrival order", "0012_books.sql"), ("fair", "0017_map_concurrency.sql")):
                admin.execute(_SPLIT)
                admin.execute(_function(migration))  # type: ignore[call-overload]
                conn = connect(url, autocommit=False)
                timings = []
                for i in range(samples + 1):
                    started = time.perf_counter()
                    claimed = task_store.claim_ready_tasks(conn, batch)
                    elapsed = (time.perf_counter() - started) * 1000
                    if i == 0:  # the first call plans; its batch shows the order
                        ids = [r["run_id"] for r in claimed]
                        placed[label] = (f"small run {'in' if small in ids else 'NOT in'} batch, "
                                         f"other workspace {'in' if other in ids else 'NOT in'} batch")
                    else:
                        timings.append(elapsed)
                    conn.rollback()
                conn.close()
                medians[label] = statistics.median(timings)
        fifo, fair = medians["arrival order"], medians["fair"]
        return (f"| {runs} x {per_run} | {fifo:.1f} | {fair:.1f} | {fair / fifo:.2f} | "
                f"{placed['arrival order']} | {placed['fair']} |")
    finally:
        server.drop(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(f"claim of {args.batch} ready tasks, median of {args.samples} (ms), each rolled back")
    print("| backlog (runs x tasks) | arrival order ms | fair ms | fair / arrival | arrival order: first batch | "
          "fair: first batch |")
    print("| --- | --- | --- | --- | --- | --- |")
    with postgres_server() as server:
        for runs, per_run in shapes:
            print(_shape(server, runs, per_run, args.batch, args.samples), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
