"""The peer: PgQueuer (`pip install pgqueuer`), a Postgres job queue for Python, on the same
server. Importing this module fails when PgQueuer is absent; the benchmark then says the peer
was skipped. Its psycopg driver is always measured; its asyncpg driver (the one PgQueuer's
docs recommend for throughput) too when asyncpg is installed (`pip install asyncpg`).

Consumers are PgQueuer's own QueueManager in drain mode, one connection each, all in one
asyncio loop as PgQueuer's own benchmark runs them; the job does nothing, so what is timed is
dequeue (FOR UPDATE SKIP LOCKED, in batches) and completion (recorded in batches).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pgqueuer import AsyncpgDriver, Job, PsycopgDriver, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

from bench.measure import TALLY, Outcome
from bench.server import Server

__all__ = ["PGQUEUER_VERSION", "ConsumeCase", "EnqueueCase", "drivers", "prepare_template"]

PGQUEUER_VERSION = importlib.metadata.version("pgqueuer")
TEMPLATE = "bench_pgqueuer_template"
ENTRYPOINT = "bench"
Closer = Callable[[], Awaitable[None]]


def drivers(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """The wanted drivers that can run here, and a reason for each that cannot."""
    usable: list[str] = []
    skipped: list[str] = []
    for name in wanted:
        if name == "asyncpg" and importlib.util.find_spec("asyncpg") is None:
            skipped.append("pgqueuer asyncpg driver skipped: asyncpg is not installed (`pip install asyncpg`)")
        elif name not in ("psycopg", "asyncpg"):
            skipped.append(f"pgqueuer driver {name!r} skipped: unknown (psycopg or asyncpg)")
        else:
            usable.append(name)
    return usable, skipped


class _CountingPsycopgDriver(PsycopgDriver):
    """PgQueuer's psycopg driver, counting each statement (all autocommit: one round trip each)."""

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        TALLY.add(statements=1)
        return await super().fetch(query, *args)

    async def execute(self, query: str, *args: object) -> str:
        TALLY.add(statements=1)
        return await super().execute(query, *args)


class _CountingAsyncpgDriver(AsyncpgDriver):
    """PgQueuer's asyncpg driver, counting each statement (its notify bypasses execute)."""

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        TALLY.add(statements=1)
        return await super().fetch(query, *args)

    async def execute(self, query: str, *args: object) -> str:
        TALLY.add(statements=1)
        return await super().execute(query, *args)

    async def notify(self, channel: str, payload: str) -> None:
        TALLY.add(statements=1)
        await super().notify(channel, payload)


async def _open(driver: str, url: str) -> tuple[PsycopgDriver | AsyncpgDriver, Closer]:
    if driver == "asyncpg":
        import asyncpg  # type: ignore[import-untyped]

        # Our URLs may be libpq keyword strings, which asyncpg does not parse: pass the parts.
        info = psycopg.conninfo.conninfo_to_dict(url)
        apg = await asyncpg.connect(
            host=info.get("host"), port=int(str(info["port"])) if info.get("port") else None,
            user=info.get("user"), password=info.get("password") or None, database=info.get("dbname"),
        )
        return _CountingAsyncpgDriver(apg), apg.close
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)  # PgQueuer requires autocommit
    return _CountingPsycopgDriver(conn), conn.close


async def _install(url: str) -> None:
    driver, close = await _open("psycopg", url)
    try:
        await Queries(driver).install()
    finally:
        await close()


def prepare_template(server: Server) -> None:
    asyncio.run(_install(server.fresh_database(TEMPLATE)))


async def _enqueue(queries: Queries, jobs: int, batch: int) -> None:
    """`jobs` jobs through PgQueuer's batch enqueue: one INSERT per `batch` jobs."""
    for start in range(0, jobs, batch):
        count = min(batch, jobs - start)
        await queries.enqueue([ENTRYPOINT] * count, [str(start + i).encode() for i in range(count)], [0] * count)


@dataclass
class Completion:
    """Jobs whose completion PgQueuer has recorded (its log statement deletes them from the queue)."""

    target: int
    recorded: int = 0
    at: float | None = None

    def add(self, count: int) -> None:
        self.recorded += count
        if self.at is None and self.recorded >= self.target:
            self.at = time.perf_counter()


@dataclass
class _TimedQueries(Queries):
    """PgQueuer's queries, noting when the last job's completion was recorded: the timed window
    ends there, not when drain mode has finished polling an empty queue to decide to stop."""

    completion: Completion | None = None

    async def log_jobs(self, job_status: Any) -> None:
        await super().log_jobs(job_status)
        if self.completion is not None:
            self.completion.add(len(job_status))


@dataclass
class _PeerCase:
    server: Server
    driver: str
    clients: int
    jobs: int
    batch: int
    name: str = ""
    system: str = ""
    database: str = ""
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    drivers: list[PsycopgDriver | AsyncpgDriver] = field(default_factory=list)
    closers: list[Closer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.system = f"pgqueuer/{self.driver}"

    def _create(self, slug: str) -> str:
        self.database = f"bench_pq_{self.driver}_{slug}_{self.clients}"
        return self.server.fresh_database(self.database, template=TEMPLATE)

    def _connect(self, url: str, count: int) -> None:
        for _ in range(count):
            driver, close = self.loop.run_until_complete(_open(self.driver, url))
            self.drivers.append(driver)
            self.closers.append(close)

    def teardown(self) -> None:
        for close in self.closers:
            self.loop.run_until_complete(close())
        self.loop.close()
        self.server.drop(self.database)


@dataclass
class EnqueueCase(_PeerCase):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = f"enqueue (batch {self.batch})"

    def setup(self) -> None:
        self._connect(self._create("enqueue"), 1)

    def run(self) -> Outcome:
        self.loop.run_until_complete(_enqueue(Queries(self.drivers[0]), self.jobs, self.batch))
        return Outcome(items=self.jobs)


@dataclass
class ConsumeCase(_PeerCase):
    """Dequeue + complete `jobs` queued jobs with `clients` QueueManagers, batch `batch`."""

    enqueue_batch: int = 1000
    executed: int = 0
    completion: Completion = field(init=False)
    managers: list[QueueManager] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name = "dequeue+complete"
        self.completion = Completion(self.jobs)

    def setup(self) -> None:
        url = self._create("consume")
        self._connect(url, self.clients)
        self.loop.run_until_complete(_enqueue(Queries(self.drivers[0]), self.jobs, self.enqueue_batch))
        self.server.vacuum_analyze(self.database)
        self.managers = [self._manager(driver) for driver in self.drivers]

    def _manager(self, driver: PsycopgDriver | AsyncpgDriver) -> QueueManager:
        manager = QueueManager(_TimedQueries(driver, completion=self.completion))

        @manager.entrypoint(ENTRYPOINT)
        async def work(job: Job) -> None:
            self.executed += 1

        return manager

    async def _drain(self) -> None:
        await asyncio.gather(*(m.run(batch_size=self.batch, mode=QueueExecutionMode.drain) for m in self.managers))

    def run(self) -> Outcome:
        started = time.perf_counter()
        self.loop.run_until_complete(self._drain())
        if self.completion.at is None or self.executed != self.jobs:
            raise RuntimeError(f"PgQueuer ran {self.executed} and recorded {self.completion.recorded} "
                               f"of {self.jobs} jobs")
        return Outcome(items=self.jobs, seconds=self.completion.at - started)
