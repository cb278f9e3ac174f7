"""What the parts of `python -m bench` share: an engine whose transport does nothing, whose
connections count their statements, and one migrated template database holding the suite's
pipelines (copied for every case, so no case sees another's rows)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from psycopg.abc import Params, Query

from bench.measure import TALLY, CountingCursor
from bench.server import Server
from infra.s3 import FAKE_AWS_ENV
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database
from orchestrator.db.migrate import migrate
from orchestrator.engine.service import Engine

T = TypeVar("T")

WORKSPACE = "bench"
TEMPLATE = "bench_suite_template"
# One-node pipeline: its runs of many versions are wide sets of independent ready tasks.
SINGLE = "single"
# root -> `fan_width` parallel nodes -> join
FAN = "fan"
# a chain of `chain_length` nodes
CHAIN = "deep"

# Presigning the storage URLs of a dispatch needs credentials, never a network: fake ones do.
for _name, _value in FAKE_AWS_ENV.items():
    os.environ.setdefault(_name, _value)


class NoopTransport:
    """A transport that hands nothing to anyone: it keeps each message for the benchmark, which
    plays the worker (calls back) when it wants to, or drops them (`keep=False`)."""

    name = "noop"
    sends_in_memory = True  # a queue of this process, as the local worker's transport

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.sent = 0
        self.messages: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.sent += 1
        if self.keep:
            self.messages.put(message)

    def close(self) -> None:
        return None


class RecordingCursor(CountingCursor):
    """Counts every statement, and while `RecordingCursor.recorded` is a list, also keeps each
    statement and its parameters there (for EXPLAIN)."""

    recorded: list[tuple[Query, Params | None]] | None = None

    def execute(  # type: ignore[override]
        self, query: Query, params: Params | None = None, *, prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        if RecordingCursor.recorded is not None:
            RecordingCursor.recorded.append((query, params))
        return super().execute(query, params, prepare=prepare, binary=binary)


class CountingDatabase(Database):
    """Tickweave's pool, each connection counting its statements and each explicit transaction
    counted once (BEGIN + COMMIT round trips)."""

    cursor_class: type[CountingCursor] = RecordingCursor

    def _take(self) -> tuple[Connection, bool]:
        conn, reused = super()._take()
        conn.cursor_factory = self.cursor_class
        return conn, reused

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        TALLY.add(transactions=1)
        with super().transaction() as conn:
            yield conn

    def run_statement(self, work: Callable[[Connection], T], **kwargs: Any) -> T:
        # Only the engine's writes go through run_statement (a callback in one statement).
        TALLY.add(autocommits=1)
        return super().run_statement(work, **kwargs)


def noop_engine(
    url: str, *, pool: int = 4, keep: bool = True, database: type[CountingDatabase] = CountingDatabase,
) -> tuple[Engine, NoopTransport]:
    """An engine dispatching through a no-op transport (tasks use the `local` transport name):
    the dispatch path runs whole (inputs, grant, token, message) up to the hand-over."""
    transport = NoopTransport(keep=keep)
    settings = Settings(database_url=url, local_worker=None)
    engine = Engine(settings, database(url, max_size=pool, check_idle_s=None), transports={"local": transport})
    _without_object_store(engine)
    return engine, transport


_NO_STORE_LOCK = threading.Lock()
_NO_STORE_ENGINES = 0
_CHECK_NODE_OUTPUT: Any = None


def _without_object_store(engine: Engine) -> None:
    """The benchmarks run no object store: the no-op worker writes no output, so the callback's
    check of the output object (one HeadObject, made before the callback's transaction) is left
    out while a benchmark engine is open, and the figures are the database path. On AWS add one
    S3 round trip per callback. The check comes back when the last such engine closes (the
    suite also runs inside the test process)."""
    global _NO_STORE_ENGINES, _CHECK_NODE_OUTPUT
    from orchestrator.engine import worker_protocol

    # nothing to wait for: the (no) checks of a batch run on the calling thread, no thread hop each
    engine.output_checks = worker_protocol.OutputChecks(at_once=1)

    with _NO_STORE_LOCK:
        if _NO_STORE_ENGINES == 0:
            _CHECK_NODE_OUTPUT = worker_protocol.check_node_output
            worker_protocol.check_node_output = lambda *args, **kwargs: None  # type: ignore[assignment]
        _NO_STORE_ENGINES += 1
    close = engine.close

    def close_and_restore() -> None:
        global _NO_STORE_ENGINES
        try:
            close()
        finally:
            with _NO_STORE_LOCK:
                _NO_STORE_ENGINES -= 1
                if _NO_STORE_ENGINES == 0:
                    worker_protocol.check_node_output = _CHECK_NODE_OUTPUT

    engine.close = close_and_restore  # type: ignore[method-assign]


def suite_definitions(*, fan_width: int, chain_length: int) -> list[dict[str, Any]]:
    chain = [{"id": f"c{i:05d}", "task": "echo", "depends": [f"c{i - 1:05d}"] if i else []}
             for i in range(chain_length)]
    middle = [{"id": f"m{i:05d}", "task": "echo", "depends": ["root"]} for i in range(fan_width)]
    fan = [{"id": "root", "task": "echo"}, *middle,
           {"id": "join", "task": "echo", "depends": [m["id"] for m in middle]}]
    return [
        {"id": SINGLE, "nodes": [{"id": "x", "task": "echo"}]},
        {"id": FAN, "nodes": fan},
        {"id": CHAIN, "nodes": chain},
    ]


@dataclass
class Suite:
    """The template database, created once per `python -m bench` run."""

    server: Server
    fan_width: int
    chain_length: int
    ready: bool = False
    databases: list[str] = field(default_factory=list)

    def template(self) -> str:
        if not self.ready:
            url = self.server.fresh_database(TEMPLATE)
            migrate(url)
            engine, _ = noop_engine(url, pool=1)
            try:
                engine.create_api_key(WORKSPACE, "admin")  # also creates the workspace row
                for definition in suite_definitions(fan_width=self.fan_width, chain_length=self.chain_length):
                    engine.create_pipeline(WORKSPACE, definition)
            finally:
                engine.close()  # a template must have no open connections to be copied
            self.ready = True
        return TEMPLATE

    def copy(self, name: str) -> str:
        """A fresh copy of the template named `name`; its URL."""
        return self.server.fresh_database(name, template=self.template())

    def close(self) -> None:
        if self.ready:
            self.server.drop(TEMPLATE)
