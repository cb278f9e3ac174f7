"""The second peer: Procrastinate (`pip install procrastinate`), a Postgres task queue for Python
on psycopg 3, on the same server. Importing this module fails when it is absent; the benchmark
then says the peer was skipped.

Its schema is applied to a template database of its own; each case gets a copy. Jobs are
deferred in batches (`batch_defer_async`); a drain is one worker (`run_worker_async`) with
`concurrency` job slots and a pool of as many connections, `wait=False` so it returns once the
queue is empty. The job does nothing. Procrastinate keeps finished jobs (its default,
`delete_jobs="never"`), as Tickweave keeps finished tasks.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from procrastinate import App, PsycopgConnector

from bench.measure import TALLY, Outcome
from bench.server import Server

__all__ = ["PROCRASTINATE_VERSION", "DeferCase", "DrainCase", "prepare_template"]

PROCRASTINATE_VERSION = importlib.metadata.version("procrastinate")
TEMPLATE = "bench_procrastinate_template"
TASK_NAME = "bench_noop"


class _CountingConnector(PsycopgConnector):
    """Procrastinate's psycopg connector, counting each statement (autocommit: one round trip each)."""

    async def execute_query_async(self, query: Any, **arguments: Any) -> None:
        TALLY.add(statements=1)
        await super().execute_query_async(query, **arguments)

    async def execute_query_one_async(self, query: Any, **arguments: Any) -> dict[str, Any]:
        TALLY.add(statements=1)
        row: dict[str, Any] = await super().execute_query_one_async(query, **arguments)
        return row

    async def execute_query_all_async(self, query: Any, **arguments: Any) -> list[dict[str, Any]]:
        TALLY.add(statements=1)
        rows: list[dict[str, Any]] = await super().execute_query_all_async(query, **arguments)
        return rows


def _app(url: str, pool: int) -> App:
    app = App(connector=_CountingConnector(conninfo=url, min_size=pool, max_size=pool))

    @app.task(name=TASK_NAME)
    async def noop(n: int) -> None:
        return None

    return app


async def _apply_schema(url: str) -> None:
    app = _app(url, 1)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def prepare_template(server: Server) -> None:
    asyncio.run(_apply_schema(server.fresh_database(TEMPLATE)))


async def _defer(app: App, jobs: int, batch: int) -> None:
    task = app.tasks[TASK_NAME]
    for start in range(0, jobs, batch):
        kwargs: list[dict[str, Any]] = [{"n": start + i} for i in range(min(batch, jobs - start))]
        await task.batch_defer_async(*kwargs)


@dataclass
class _ProcrastinateCase:
    server: Server
    clients: int
    jobs: int
    batch: int = 1000
    system: str = "procrastinate"
    name: str = ""
    database: str = ""
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    app: App | None = None

    def _open(self, slug: str) -> App:
        self.database = f"bench_pc_{slug}_{self.clients}"
        url = self.server.fresh_database(self.database, template=TEMPLATE)
        # One connection per job slot, plus the one its LISTEN takes.
        self.app = _app(url, self.clients + 1)
        self.loop.run_until_complete(self.app.open_async())
        return self.app

    def teardown(self) -> None:
        if self.app is not None:
            self.loop.run_until_complete(self.app.close_async())
        self.loop.close()
        self.server.drop(self.database)


@dataclass
class DeferCase(_ProcrastinateCase):
    def __post_init__(self) -> None:
        self.name = f"enqueue (batch {self.batch})"

    def setup(self) -> None:
        self._open("defer")

    def run(self) -> Outcome:
        assert self.app is not None
        self.loop.run_until_complete(_defer(self.app, self.jobs, self.batch))
        return Outcome(items=self.jobs)


@dataclass
class DrainCase(_ProcrastinateCase):
    """One worker with `clients` concurrent job slots draining `jobs` deferred jobs."""

    def __post_init__(self) -> None:
        self.name = "dequeue+complete"

    def setup(self) -> None:
        app = self._open("drain")
        self.loop.run_until_complete(_defer(app, self.jobs, self.batch))
        self.server.vacuum_analyze(self.database)

    def run(self) -> Outcome:
        assert self.app is not None
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
        self.loop.run_until_complete(self.app.run_worker_async(
            concurrency=self.clients, wait=False, install_signal_handlers=False, delete_jobs="never",
        ))
        with psycopg.connect(self.server.url(self.database)) as conn:
            row = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'").fetchone()
        if row is None or row[0] != self.jobs:
            raise RuntimeError(f"Procrastinate finished {row[0] if row else 0} of {self.jobs} jobs")
        return Outcome(items=self.jobs)

