"""What every case is measured with: wall and CPU clocks, WAL written, statements sent, and
where the server's backends spent their time (sampled from pg_stat_activity).

A case prepares its data in `setup()` (not timed), does the measured work in `run()`, and
cleans up in `teardown()`; `measure()` wraps the three the same way for every system.
"""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Protocol, Self

import psycopg
from psycopg.abc import Params, Query

from bench.server import Server
from orchestrator.db.connection import Connection, Row, connect

# pg_stat_activity is sampled this often while a case runs: often enough for a few hundred
# samples in a second-long case, rarely enough that the sampler's own queries stay negligible.
SAMPLE_INTERVAL_S = 0.01


class Tally:
    """Statements and explicit transactions sent by the benchmark's own connections.

    Counted in the client rather than with pg_stat_statements, which the embedded server does
    not ship; each explicit transaction adds a BEGIN and a COMMIT round trip to its statements.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statements = 0
        self.transactions = 0
        # Statements that wrote on an autocommit connection: each is its own transaction and
        # commit, with no BEGIN or COMMIT round trip (a callback's tw_complete_attempts).
        self.autocommits = 0

    def add(self, *, statements: int = 0, transactions: int = 0, autocommits: int = 0) -> None:
        with self._lock:
            self.statements += statements
            self.transactions += transactions
            self.autocommits += autocommits

    def reset(self) -> None:
        with self._lock:
            self.statements = self.transactions = self.autocommits = 0

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.statements, self.transactions


TALLY = Tally()


class CountingCursor(psycopg.Cursor[Row]):
    """Counts every statement: `Connection.execute`, which all of Tickweave's store functions
    use, goes through the connection's cursor factory."""

    def execute(  # type: ignore[override]
        self, query: Query, params: Params | None = None, *, prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        TALLY.add(statements=1)
        return super().execute(query, params, prepare=prepare, binary=binary)  # type: ignore[arg-type, misc]


def counted_connect(url: str) -> Connection:
    """A Tickweave connection (autocommit, dict rows, no server-side prepares) whose statements count."""
    conn = connect(url)
    conn.cursor_factory = CountingCursor
    return conn


@contextmanager
def counted_transaction(conn: Connection) -> Iterator[Connection]:
    TALLY.add(transactions=1)
    with conn.transaction():
        yield conn


@dataclass(frozen=True)
class Outcome:
    """What `run()` did. A case may state its own timing or statement counts when they are
    known better than the wrappers can see them (pgbench reports both itself)."""

    items: int
    seconds: float | None = None
    statements: int | None = None
    round_trips: int | None = None


class Case(Protocol):
    system: str
    name: str
    clients: int
    database: str

    def setup(self) -> None: ...
    def run(self) -> Outcome: ...
    def teardown(self) -> None: ...


@dataclass
class WaitProfile:
    """Backend states seen in the samples: 'CPU' (active, not waiting), 'Type:Event' (active,
    waiting on that event, e.g. Lock:transactionid or IO:WalSync), or waiting on the client."""

    polls: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def share(self, prefix: str) -> float:
        total = sum(self.counts.values())
        return 0.0 if total == 0 else sum(n for k, n in self.counts.items() if k.startswith(prefix)) / total

    def top(self, n: int) -> list[tuple[str, float]]:
        total = sum(self.counts.values()) or 1
        return [(name, count / total) for name, count in self.counts.most_common(n)]


def _category(state: str | None, wait_type: str | None, wait_event: str | None) -> str:
    if state == "active":
        return "CPU" if wait_type is None else f"{wait_type}:{wait_event}"
    if state == "idle in transaction":
        return "client (in txn)"
    return "client (idle)"


class WaitSampler:
    """Polls pg_stat_activity for the client backends of one database, from its own connection
    to the admin database so it neither counts itself nor holds the measured database open."""

    def __init__(self, admin_url: str, database: str) -> None:
        self._conn = psycopg.connect(admin_url, autocommit=True)
        self._database = database
        self._stop = threading.Event()
        self.profile = WaitProfile()
        self._thread = threading.Thread(target=self._loop, name="wait-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> WaitProfile:
        self._stop.set()
        self._thread.join()
        self._conn.close()
        return self.profile

    def _loop(self) -> None:
        # The server may go away (shut down after a failed case): the profile so far stands.
        with suppress(psycopg.Error):
            self._poll_until_stopped()

    def _poll_until_stopped(self) -> None:
        while not self._stop.is_set():
            rows = self._conn.execute(
                """SELECT state, wait_event_type, wait_event FROM pg_stat_activity
                   WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()""",
                (self._database,),
            ).fetchall()
            self.profile.polls += 1
            self.profile.counts.update(_category(*row) for row in rows)
            self._stop.wait(SAMPLE_INTERVAL_S)


@dataclass(frozen=True)
class Clocks:
    wall: float
    client_cpu: float
    server_cpu: float | None
    wal: int


def read_clocks(server: Server) -> Clocks:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench runs as a child process
    return Clocks(
        wall=time.perf_counter(),
        client_cpu=time.process_time() + children.ru_utime + children.ru_stime,
        server_cpu=server.cpu_seconds(),
        wal=server.wal_bytes(),
    )


@dataclass(frozen=True)
class Result:
    system: str
    case: str
    clients: int
    items: int
    seconds: float
    statements: int
    round_trips: int
    wal_bytes: int
    client_cpu_s: float
    server_cpu_s: float | None
    waits: WaitProfile
    # Tickweave's commits (explicit transactions and autocommit writes), when counted
    commits: int | None = None

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def per_item(self, value: float) -> float:
        return value / self.items if self.items else 0.0


def measure(case: Case, server: Server) -> Result:
    case.setup()
    try:
        sampler = WaitSampler(server.admin_url, case.database)
        sampler.start()
        try:
            TALLY.reset()
            before = read_clocks(server)
            outcome = case.run()
            after = read_clocks(server)
            statements, transactions = TALLY.snapshot()
            autocommits = TALLY.autocommits
        finally:
            waits = sampler.stop()
    finally:
        case.teardown()
    server_cpu = (
        None if before.server_cpu is None or after.server_cpu is None else after.server_cpu - before.server_cpu
    )
    return Result(
        system=case.system, case=case.name, clients=case.clients, items=outcome.items,
        seconds=outcome.seconds if outcome.seconds is not None else after.wall - before.wall,
        statements=outcome.statements if outcome.statements is not None else statements,
        round_trips=(
            outcome.round_trips if outcome.round_trips is not None else statements + 2 * transactions
        ),
        wal_bytes=after.wal - before.wal,
        commits=None if outcome.statements is not None else transactions + autocommits,
        client_cpu_s=after.client_cpu - before.client_cpu,
        server_cpu_s=server_cpu,
        waits=waits,
    )
