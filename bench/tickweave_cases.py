"""Tickweave's task cycle, driven through its real store and engine functions.

Every case gets a copy of one migrated template database that already holds the benchmark's
pipelines; its runs are triggered in `setup()`, so only claiming and finishing are timed
(except in the trigger case, where triggering is the thing measured).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.measure import TALLY, CountingCursor, Outcome, counted_connect, counted_transaction
from bench.server import Server
from orchestrator.config import Settings
from orchestrator.db.connection import RETRYABLE_ERRORS, Connection, Database, Row
from orchestrator.db.migrate import migrate
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.runs import MAX_VERSIONS_PER_RUN
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store

WORKSPACE = "bench"
TEMPLATE = "bench_tickweave_template"
WIDE, CHAIN, BIG = "wide", "chain", "big"
# Nodes per independent chain in the trigger case's pipeline: edges as well as tasks are
# inserted, as in a real DAG, without making the whole 10,000 nodes one long chain.
BIG_SEGMENT = 100
FINISH_ATTEMPTS = 5
T = TypeVar("T")


def make_engine(url: str, *, max_size: int = 4) -> Engine:
    """An engine with no transports: the benchmark claims and finishes tasks itself."""
    settings = Settings(database_url=url, local_worker=None)
    return Engine(settings, Database(url, max_size=max_size), transports={})


def pipeline_definitions(chain_length: int, big_nodes: int) -> list[dict[str, Any]]:
    chain = [{"id": f"c{i:05d}", "task": "echo", "depends": [f"c{i - 1:05d}"] if i else []}
             for i in range(chain_length)]
    big = [{"id": f"n{i:05d}", "task": "echo", "depends": [f"n{i - 1:05d}"] if i % BIG_SEGMENT else []}
           for i in range(big_nodes)]
    return [
        {"id": WIDE, "nodes": [{"id": "x", "task": "echo"}]},
        {"id": CHAIN, "nodes": chain},
        {"id": BIG, "nodes": big},
    ]


def prepare_template(server: Server, *, chain_length: int, big_nodes: int) -> None:
    url = server.fresh_database(TEMPLATE)
    migrate(url)
    engine = make_engine(url)
    try:
        engine.create_api_key(WORKSPACE, "admin")  # also creates the workspace row
        for definition in pipeline_definitions(chain_length, big_nodes):
            engine.create_pipeline(WORKSPACE, definition)
    finally:
        engine.close()  # a template must have no open connections to be copied


def trigger_wide(engine: Engine, tasks: int) -> None:
    """`tasks` ready tasks: runs of the one-node pipeline with up to 1,000 versions each."""
    run_index = 0
    while tasks > 0:
        count = min(tasks, MAX_VERSIONS_PER_RUN)
        versions = [f"r{run_index}-{i:04d}" for i in range(count)]
        engine.trigger_run(WORKSPACE, WIDE, versions=versions, dispatch_now=False)
        tasks -= count
        run_index += 1


def finish(conn: Connection, task: Row) -> None:
    """One worker callback's database work: finish the attempt and advance the DAG, in one
    transaction, replayed after a deadlock as `Database.run_in_transaction` would."""
    for attempt in range(1, FINISH_ATTEMPTS + 1):
        try:
            with counted_transaction(conn):
                result = finish_attempt(conn, task["id"], task["attempt"], task["claim_token"],
                                        succeeded=True, output={"key": f"out/{task['id']}"})
            if not result.accepted:
                raise RuntimeError(f"finish of task {task['id']} refused: {result.outcome}")
            return
        except RETRYABLE_ERRORS:
            if attempt == FINISH_ATTEMPTS:
                raise


def claim(conn: Connection, batch: int, run_id: uuid.UUID | None = None) -> list[Row]:
    with counted_transaction(conn):
        return task_store.claim_ready_tasks(conn, batch, run_id=run_id)


def drain_ready(conn: Connection, batch: int, *, finish_each: bool) -> int:
    """A tick's loop: claim batches until none is left, optionally finishing each task (as its
    worker's callback would) before the next claim."""
    done = 0
    while claimed := claim(conn, batch):
        if finish_each:
            for task in claimed:
                finish(conn, task)
        done += len(claimed)
    return done


def follow_chain(conn: Connection, run_id: uuid.UUID, batch: int) -> int:
    """The advancement path, as eager continuation runs it: finishing a task makes its successor
    ready, which is claimed for that run and has its upstream outputs read for dispatch."""
    done = 0
    while claimed := claim(conn, batch, run_id):
        task_store.upstream_outputs(conn, [t["id"] for t in claimed])
        for task in claimed:
            finish(conn, task)
        done += len(claimed)
    return done


def in_threads(work: Callable[[int], T], count: int) -> list[T]:
    """`work(i)` for i < count, each in its own thread; the first error is raised."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(work, range(count)))


@dataclass
class _DatabaseCase:
    """Setup and teardown shared by the claim cases: a template copy and one connection per client."""

    server: Server
    clients: int
    database: str = ""
    system: str = "tickweave"
    name: str = ""
    conns: list[Connection] = field(default_factory=list)

    def _create(self, slug: str) -> Engine:
        self.database = f"bench_tw_{slug}_{self.clients}"
        url = self.server.fresh_database(self.database, template=TEMPLATE)
        return make_engine(url)

    def _connect(self) -> None:
        url = self.server.url(self.database)
        self.server.vacuum_analyze(self.database)
        self.conns = [counted_connect(url) for _ in range(self.clients)]

    def teardown(self) -> None:
        for conn in self.conns:
            conn.close()
        self.server.drop(self.database)


@dataclass
class ClaimCase(_DatabaseCase):
    """(a) claiming alone or (b) the full cycle, claim + finish, over `tasks` ready tasks."""

    tasks: int = 0
    batch: int = 100
    finish_each: bool = False
    # A what-if, not Tickweave's configuration: server-side prepared statements (which Tickweave
    # turns off for RDS Proxy), to show what re-planning every statement costs.
    prepared: bool = False

    def __post_init__(self) -> None:
        self.name = ("claim+finish" if self.finish_each else "claim only") + (" prepared" if self.prepared else "")

    def setup(self) -> None:
        engine = self._create(self.name.replace(" ", "_").replace("+", "_"))
        try:
            trigger_wide(engine, self.tasks)
        finally:
            engine.close()
        self._connect()
        if self.prepared:
            for conn in self.conns:
                conn.prepare_threshold = 0  # prepare every statement on first use

    def run(self) -> Outcome:
        done = in_threads(lambda i: drain_ready(self.conns[i], self.batch, finish_each=self.finish_each),
                          self.clients)
        return Outcome(items=sum(done))


@dataclass
class ChainCase(_DatabaseCase):
    """(c) one chain run per client, each driven by its own connection."""

    batch: int = 100
    run_ids: Sequence[uuid.UUID] = ()

    def __post_init__(self) -> None:
        self.name = "chain advance"

    def setup(self) -> None:
        engine = self._create("chain")
        try:
            self.run_ids = [engine.trigger_run(WORKSPACE, CHAIN, dispatch_now=False).id
                            for _ in range(self.clients)]
        finally:
            engine.close()
        self._connect()

    def run(self) -> Outcome:
        done = in_threads(lambda i: follow_chain(self.conns[i], self.run_ids[i], self.batch), self.clients)
        return Outcome(items=sum(done))


@dataclass
class TriggerCase:
    """(d) creating runs of the big pipeline through `Engine.trigger_run`, `repeats` times."""

    server: Server
    nodes: int
    repeats: int
    clients: int = 1
    system: str = "tickweave"
    name: str = "trigger run"
    database: str = "bench_tw_trigger"
    engine: Engine | None = None

    def setup(self) -> None:
        url = self.server.fresh_database(self.database, template=TEMPLATE)
        # A pool of one connection, given the counting cursor once: every trigger reuses it.
        self.engine = make_engine(url, max_size=1)
        with self.engine.db.connection() as conn:
            conn.cursor_factory = CountingCursor

    def run(self) -> Outcome:
        assert self.engine is not None
        for _ in range(self.repeats):
            self.engine.trigger_run(WORKSPACE, BIG, dispatch_now=False)
            # trigger_run's own transaction (run_in_transaction, no replay here): BEGIN + COMMIT.
            TALLY.add(transactions=1)
        return Outcome(items=self.nodes * self.repeats)

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.server.drop(self.database)
