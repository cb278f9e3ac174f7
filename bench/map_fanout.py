"""Dynamic fan-out (issue 19): what a map costs, through the engine, on the suite's Postgres.

expansion  A pipeline `list -> parse (map over list.files) -> load`. The run is triggered and
           `list` claimed and dispatched (not timed); then `list`'s success callback is timed
           (`Engine.record_callback`, as the API runs it): its first transaction accepts the
           success and rolls back because the items must be read first, the listing is read with
           no transaction open (`mapping.prepare_items`), and the second transaction records the
           success, keeps the list and expands the map node into one child per item (inserted
           10,000 per statement), then claims the first batch of children, which are dispatched
           after commit. Every transaction is timed and its statements counted. Widths up to
           `settle_max` are then finished straight through the store (claims of 1,000,
           transactions of 100 finishes: no tokens, no dispatch), which settles the map node,
           and its manifest is built as the reducer's dispatch builds it.
lifecycle  The map's whole life beside the static wide DAG of the same width, on the same
           database template and driver: `callers` threads, each a tick caller and a worker
           (take a dispatched message and call back as a worker would; with none waiting, tick).
           Static: `root -> W nodes -> join`. Map: `list -> W items -> load`, and the same with
           `max_concurrency` when given. Both count W + 2 tasks run by workers per run (a map
           node is no worker's task); the map case includes the expansion, the settle and the
           manifest written before the reducer is dispatched.

No object store runs, as in the rest of the suite: an in-memory stand-in serves the listing
the expansion reads and keeps the manifests the dispatcher writes (on AWS: one GetObject of the
listing per map, one HeadObject and one PutObject of the manifest per settle). Nothing here
asserts timings.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.lifecycle import IDLE_PAUSE_S, _EngineCase, in_threads, warm_dispatch
from bench.measure import TALLY, Outcome
from bench.server import Server
from bench.suite import WORKSPACE, CountingDatabase, NoopTransport, Suite, noop_engine
from orchestrator.db.connection import Connection
from orchestrator.engine import mapping
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.engine.tick import run_tick
from orchestrator.storage.layout import map_item_output_key, node_output_key
from orchestrator.store import tasks as task_store

MAP_PIPELINE = "fanmap"
# Tasks of the map pipeline besides the items (list, the map node, load): the widest map it can
# have within the run's limit of 100,000 tasks is 99,997 items.
MAP_OVERHEAD_TASKS = 3
WIDEST = mapping.MAX_TASKS_PER_RUN - MAP_OVERHEAD_TASKS
SETTLE_CLAIM = 1000
# Finishes per transaction when the children are finished through the store: each finish
# updates the map node's row, and many updates of one row in one transaction make each next one
# slower (the row's versions cannot be pruned before commit); a worker's callback is one finish
# per transaction anyway.
SETTLE_FINISHES = 100


def map_definition(pipeline: str = MAP_PIPELINE, *, max_concurrency: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"over": "list.files"}
    if max_concurrency:
        spec["max_concurrency"] = max_concurrency
    return {"id": pipeline, "nodes": [
        {"id": "list", "task": "echo"},
        {"id": "parse", "task": "echo", "depends": ["list"], "map": spec},
        {"id": "load", "task": "echo", "depends": ["parse"]},
    ]}


def listing(width: int) -> bytes:
    return json.dumps({"files": [f"incoming/part-{i:06d}.csv" for i in range(width)]},
                      separators=(",", ":")).encode()


# --- an in-memory object store ------------------------------------------------------------------


class MemoryStore:
    """Objects by key, for the three calls the map path makes to the bucket."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, body: bytes) -> None:
        with self._lock:
            self.objects[key] = body

    def get(self, key: str) -> bytes:
        from orchestrator.storage.s3 import ObjectMissing

        with self._lock:
            body = self.objects.get(key)
        if body is None:
            raise ObjectMissing(key)
        return body


_STORE_LOCK = threading.Lock()


@contextmanager
def memory_object_store() -> Iterator[MemoryStore]:
    """Serve `read_object_bytes`, `head_object_facts` and `put_object_bytes` from memory while
    the block runs (orchestrator.engine.mapping imports them from the module on each call)."""
    from orchestrator.storage import s3

    store = MemoryStore()

    def read_object_bytes(settings: Any, key: str, *, max_bytes: int | None = None) -> bytes:
        body = store.get(key)
        if max_bytes is not None and len(body) > max_bytes:
            raise ValueError(f"object {key!r} is larger than {max_bytes} bytes")
        return body

    def head_object_facts(settings: Any, key: str, *, bucket: str | None = None) -> Any:
        body = store.get(key)
        return s3.ObjectFacts(size=len(body), sha256=s3.sha256_hex(body))

    def put_object_bytes(settings: Any, key: str, body: bytes) -> None:
        store.put(key, body)

    replaced = {"read_object_bytes": read_object_bytes, "head_object_facts": head_object_facts,
                "put_object_bytes": put_object_bytes}
    with _STORE_LOCK:
        saved = {name: getattr(s3, name) for name in replaced}
        for name, fn in replaced.items():
            setattr(s3, name, fn)
        try:
            yield store
        finally:
            for name, fn in saved.items():
                setattr(s3, name, fn)


def output_key(message: dict[str, Any]) -> str:
    """The key a worker writes for this dispatch: its item's key for a map's child."""
    where = (message["workspace"], message["pipeline"], message["run_id"], message["version"], message["node"])
    item = message.get("map")
    if item is not None:
        return map_item_output_key(*where, int(item["index"]), int(message["attempt"]))
    return node_output_key(*where, int(message["attempt"]))


def map_callback(engine: Engine, store: MemoryStore, message: dict[str, Any], width: int) -> None:
    """A worker's success callback; `list` first stores the listing the map reads."""
    key = output_key(message)
    if message["node"] == "list":
        store.put(key, listing(width))
    result = engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                                    output={"key": key}, error=None)
    if not result.accepted:
        raise RuntimeError(f"callback of task {message['task_id']} refused: {result.outcome}")


# --- the expansion ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transaction:
    seconds: float
    statements: int
    committed: bool


class TimedDatabase(CountingDatabase):
    """Counts like the suite's database, and while `log` is a list also records each explicit
    transaction: its wall time, its statements and whether it committed."""

    log: list[Transaction] | None = None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        if self.log is None:
            with super().transaction() as conn:
                yield conn
            return
        before, _ = TALLY.snapshot()
        started = time.perf_counter()
        committed = False
        try:
            with super().transaction() as conn:
                yield conn
            committed = True
        finally:
            after, _ = TALLY.snapshot()
            self.log.append(Transaction(time.perf_counter() - started, after - before, committed))


@dataclass(frozen=True)
class Expansion:
    width: int
    callback_s: float  # the whole record_callback, dispatch of the first claimed children included
    callback_statements: int
    callback_round_trips: int
    read_items_s: float  # prepare_items: the listing read (in memory) and checked, no transaction open
    listing_bytes: int
    transactions: tuple[Transaction, ...]  # of the callback, in order
    claimed: int  # children claimed by the expanding transaction (eager continuation)
    settle: Settle | None = None

    @property
    def expanding(self) -> Transaction:
        """The transaction that recorded the success and expanded the map (its largest)."""
        return max((t for t in self.transactions if t.committed), key=lambda t: t.statements)


@dataclass(frozen=True)
class Settle:
    finish_s: float  # every child finished through the store (claims of 1,000, 100 finishes per transaction)
    last_s: float  # the transaction of the last child's finish: settles the map node, readies load
    last_statements: int
    manifest_s: float  # mapping.build_manifest, as the reducer's dispatch runs it
    manifest_bytes: int


def run_expansion(server: Server, suite: Suite, *, width: int, settle: bool) -> Expansion:
    database = f"bench_map_expand_{width}"
    url = suite.copy(database)
    engine, transport = noop_engine(url, pool=4, database=TimedDatabase)
    db = engine.db
    assert isinstance(db, TimedDatabase)
    try:
        with memory_object_store() as store:
            engine.create_pipeline(WORKSPACE, map_definition())
            run = engine.trigger_run(WORKSPACE, MAP_PIPELINE, dispatch_now=False)
            server.vacuum_analyze(database)
            warm_dispatch(engine)
            run_tick(engine.db, engine.settings, engine.dispatcher, batch_size=10)
            message = transport.messages.get_nowait()
            assert message["node"] == "list", message["node"]
            key = output_key(message)
            body = listing(width)
            store.put(key, body)

            read_s: list[float] = []
            prepare = mapping.prepare_items

            def timed_prepare(*args: Any, **kwargs: Any) -> list[mapping.StagedItems]:
                started = time.perf_counter()
                try:
                    return prepare(*args, **kwargs)
                finally:
                    read_s.append(time.perf_counter() - started)

            mapping.prepare_items = timed_prepare  # type: ignore[assignment]
            db.log = []
            try:
                TALLY.reset()
                started = time.perf_counter()
                result = engine.record_callback(uuid.UUID(message["task_id"]), message["token"],
                                                status="succeeded", output={"key": key}, error=None)
                callback_s = time.perf_counter() - started
                statements, transactions = TALLY.snapshot()
            finally:
                mapping.prepare_items = prepare  # type: ignore[assignment]
                logged, db.log = db.log, None
            if not result.accepted:
                raise RuntimeError(f"the list callback was refused: {result.outcome}")
            parent = _map_node(engine, run.id)
            if parent["map_width"] != width or parent["status"] != "pending":
                raise RuntimeError(f"the map node is {parent['status']} with width {parent['map_width']}, "
                                   f"not pending with {width}")
            settled = _settle(engine, run.id, parent["id"], result.claimed) if settle else None
    finally:
        engine.close()
        server.drop(database)
    return Expansion(width=width, callback_s=callback_s, callback_statements=statements,
                     callback_round_trips=statements + 2 * transactions, read_items_s=sum(read_s),
                     listing_bytes=len(body), transactions=tuple(logged), claimed=len(result.claimed),
                     settle=settled)


def _map_node(engine: Engine, run_id: uuid.UUID) -> dict[str, Any]:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT id, status, map_width, output FROM tasks WHERE run_id = %s AND kind = 'map'",
                           (run_id,)).fetchone()
    if row is None:
        raise RuntimeError("the run has no map node")
    return dict(row)


def _settle(engine: Engine, run_id: uuid.UUID, parent_id: uuid.UUID, first: list[Any]) -> Settle:
    """Finish every child through the store, the last finish settling the map node; then build
    its manifest."""
    db = engine.db
    assert isinstance(db, TimedDatabase)
    pending = list(first)  # the children the callback claimed: finish them with their claims
    started = time.perf_counter()
    last: Transaction | None = None
    while True:
        if not pending:
            with db.transaction() as conn:
                pending = task_store.claim_ready_tasks(conn, SETTLE_CLAIM, run_id=run_id)
            pending = [t for t in pending if t["node_id"] == "parse"]
            if not pending:
                break
        # One transaction per batch, except the batch holding the last child: its last finish
        # (the one that settles the map node) is timed alone.
        closing = _open_children(engine, parent_id) <= len(pending)
        body, tail = (pending[:-1], pending[-1:]) if closing else (pending, [])
        for start in range(0, len(body), SETTLE_FINISHES):
            with db.transaction() as conn:
                for task in body[start:start + SETTLE_FINISHES]:
                    _finish(conn, task)
        if tail:
            db.log = []
            try:
                with db.transaction() as conn:
                    _finish(conn, tail[0])
            finally:
                logged, db.log = db.log, None
            last = logged[-1]
        pending = []
    finish_s = time.perf_counter() - started
    node = _map_node(engine, run_id)
    if node["status"] != "succeeded" or last is None:
        raise RuntimeError(f"the map node is {node['status']} after its children finished")
    started = time.perf_counter()
    with engine.db.connection() as conn:
        built = mapping.build_manifest(conn, parent_id)
    manifest_s = time.perf_counter() - started
    if built is None:
        raise RuntimeError("no manifest for the settled map node")
    return Settle(finish_s=finish_s, last_s=last.seconds, last_statements=last.statements,
                  manifest_s=manifest_s, manifest_bytes=len(built[1]))


def _open_children(engine: Engine, parent_id: uuid.UUID) -> int:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT unfinished_deps FROM tasks WHERE id = %s", (parent_id,)).fetchone()
    assert row is not None
    return int(row["unfinished_deps"])


def _finish(conn: Connection, task: Any) -> None:
    result = finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=True,
                            output={"key": f"out/{task['id']}"})
    if not result.accepted:
        raise RuntimeError(f"finish of task {task['id']} refused: {result.outcome}")


# --- the lifecycle ---------------------------------------------------------------------------------


def drive_map(
    engine: Engine, transport: NoopTransport, store: MemoryStore, *, total: int, width: int, callers: int,
    batch: int,
) -> tuple[int, int]:
    """bench.lifecycle.drive with the map's callbacks: `callers` threads take dispatched messages
    and call back (or tick when none is waiting) until `total` tasks were called back."""
    lock = threading.Lock()
    counts = {"done": 0, "idle": 0}

    def caller(_: int) -> None:
        while counts["done"] < total:
            try:
                message = transport.messages.get_nowait()
            except queue.Empty:
                summary = run_tick(engine.db, engine.settings, engine.dispatcher, batch_size=batch)
                if summary.claimed == 0:
                    with lock:
                        counts["idle"] += 1
                    time.sleep(IDLE_PAUSE_S)
                continue
            map_callback(engine, store, message, width)
            with lock:
                counts["done"] += 1

    in_threads(caller, callers)
    return counts["done"], counts["idle"]


@dataclass
class MapLifecycleCase(_EngineCase):
    """`runs` runs of list -> `width` items -> load, driven like the static wide DAG."""

    runs: int = 1
    width: int = 0
    batch: int = 100
    max_concurrency: int | None = None
    done: int = 0
    idle_ticks: int = 0
    store: MemoryStore | None = None
    _exit: ExitStack = field(default_factory=ExitStack, repr=False)

    def __post_init__(self) -> None:
        limit = f", max_concurrency {self.max_concurrency}" if self.max_concurrency else ""
        self.name = f"map lifecycle ({self.runs}x(2+{self.width}){limit})"

    def setup(self) -> None:
        slug = f"map_lifecycle_{self.max_concurrency or 0}_{self.clients}"
        engine = self._create(slug, keep=True, pool=2 * self.clients + 2)
        engine.create_pipeline(WORKSPACE, map_definition(max_concurrency=self.max_concurrency))
        for _ in range(self.runs):
            engine.trigger_run(WORKSPACE, MAP_PIPELINE, dispatch_now=False)
        self.server.vacuum_analyze(self.database)
        warm_dispatch(engine)
        self.store = self._exit.enter_context(memory_object_store())

    def run(self) -> Outcome:
        assert self.engine is not None and self.transport is not None and self.store is not None
        total = self.runs * (self.width + 2)
        self.done, self.idle_ticks = drive_map(self.engine, self.transport, self.store, total=total,
                                               width=self.width, callers=self.clients, batch=self.batch)
        with psycopg.connect(self.server.url(self.database)) as conn:
            row = conn.execute("SELECT count(*) FROM runs WHERE status = 'succeeded'").fetchone()
        if row is None or row[0] != self.runs:
            raise RuntimeError(f"{row[0] if row else 0} of {self.runs} map runs succeeded")
        return Outcome(items=self.done)

    def teardown(self) -> None:
        try:
            self._exit.close()
            self.store = None
        finally:
            super().teardown()
