"""The tick's claim-and-dispatch throughput, and the full task lifecycle, through the engine.

claim     `run_tick` with batch size 1, 100 or 1,000 over `tasks` ready tasks, dispatching each
          claimed task through a no-op transport (inputs, storage grant, token and message are
          built as for a real worker; the hand-over does nothing).
lifecycle `callers` threads, each a tick caller and a worker: it takes a dispatched message and
          calls back as the worker would (`Engine.record_callback`: token check, then one
          statement recording the outcome, claiming the successors it made ready and reading
          their dispatch context; then their dispatch); with no message waiting it calls the
          tick. Wide DAG: root -> W nodes -> join; deep DAG: chains. Timed until every task of
          every run has succeeded; the invariant checker runs over the database after each case.
batched   the same, each caller taking up to N messages and calling back with one
          `Engine.record_callbacks` (POST /api/callbacks) for all of them.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from bench.measure import Outcome
from bench.server import Server
from bench.suite import CHAIN, FAN, SINGLE, WORKSPACE, NoopTransport, Suite, noop_engine
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.runs import MAX_VERSIONS_PER_RUN
from orchestrator.engine.service import Engine
from orchestrator.engine.tick import run_tick
from orchestrator.engine.worker_protocol import CallbackInput
from orchestrator.storage.layout import node_output_key
from orchestrator.store.invariants import find_violations

T = TypeVar("T")
# A tick caller that found nothing to do waits this long before calling again.
IDLE_PAUSE_S = 0.0005


def warm_dispatch(engine: Engine) -> None:
    """Import boto3 and build its presigning client before timing (the first dispatch does it)."""
    from orchestrator.storage.s3 import issue_storage_grant

    issue_storage_grant(engine.settings, output_key="warm/up", read_keys=[], task_id="warm")


def trigger_single(engine: Engine, tasks: int, *, prefix: str = "r") -> None:
    """`tasks` ready tasks: runs of the one-node pipeline with up to 1,000 versions each."""
    index = 0
    while tasks > 0:
        count = min(tasks, MAX_VERSIONS_PER_RUN)
        engine.trigger_run(WORKSPACE, SINGLE, versions=[f"{prefix}{index}-{i:04d}" for i in range(count)],
                           dispatch_now=False)
        tasks -= count
        index += 1


def in_threads(work: Callable[[int], T], count: int) -> list[T]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(work, range(count)))


def callback(engine: Engine, message: dict[str, Any]) -> None:
    """What a worker does when the no-op task is done: call back with the key it was granted."""
    key = node_output_key(message["workspace"], message["pipeline"], message["run_id"], message["version"],
                          message["node"], int(message["attempt"]))
    result = engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                                    output={"key": key}, error=None)
    if not result.accepted:
        raise RuntimeError(f"callback of task {message['task_id']} refused: {result.outcome}")


def callback_batch(engine: Engine, messages: list[dict[str, Any]]) -> None:
    """What a worker holding several results does: one `Engine.record_callbacks` call
    (POST /api/callbacks) for all of them."""
    inputs = [
        CallbackInput(uuid.UUID(m["task_id"]), m["token"], "succeeded",
                      {"key": node_output_key(m["workspace"], m["pipeline"], m["run_id"], m["version"], m["node"],
                                              int(m["attempt"]))})
        for m in messages
    ]
    for message, answer in zip(messages, engine.record_callbacks(inputs), strict=True):
        if not isinstance(answer, AttemptResult) or not answer.accepted:
            raise RuntimeError(f"callback of task {message['task_id']} refused: {answer}")


def drive(
    engine: Engine, transport: NoopTransport, *, total: int, callers: int, batch: int, per_call: int = 1,
) -> tuple[int, int]:
    """`callers` threads play tick callers and workers until `total` tasks were called back:
    each takes up to `per_call` dispatched messages and calls back (one callback, or one batch
    of them), or with none waiting calls the tick. Returns (callbacks, ticks that found nothing)."""
    lock = threading.Lock()
    counts = {"done": 0, "idle": 0}

    def caller(_: int) -> None:
        while counts["done"] < total:
            messages: list[dict[str, Any]] = []
            while len(messages) < per_call:
                try:
                    messages.append(transport.messages.get_nowait())
                except queue.Empty:
                    break
            if not messages:
                summary = run_tick(engine.db, engine.settings, engine.dispatcher, batch_size=batch)
                if summary.claimed == 0:
                    with lock:
                        counts["idle"] += 1
                    time.sleep(IDLE_PAUSE_S)
                continue
            if per_call == 1:
                callback(engine, messages[0])
            else:
                callback_batch(engine, messages)
            with lock:
                counts["done"] += len(messages)

    in_threads(caller, callers)
    return counts["done"], counts["idle"]


# Violations the invariant checker found after each lifecycle case, by case name and callers
# (printed with the results: the books must stay clean under the benchmark).
BOOKS: dict[tuple[str, int], int] = {}


@dataclass
class _EngineCase:
    server: Server
    suite: Suite
    clients: int = 1
    system: str = "tickweave"
    name: str = ""
    database: str = ""
    engine: Engine | None = None
    transport: NoopTransport | None = None

    def _create(self, slug: str, *, keep: bool, pool: int) -> Engine:
        self.database = f"bench_{slug}"
        url = self.suite.copy(self.database)
        self.engine, self.transport = noop_engine(url, pool=pool, keep=keep)
        return self.engine

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.server.drop(self.database)


@dataclass
class TickClaimCase(_EngineCase):
    """One `run_tick` with `batch` as its batch size, draining `tasks` ready tasks."""

    tasks: int = 1000
    batch: int = 100

    def __post_init__(self) -> None:
        self.name = f"tick claim+dispatch (batch {self.batch})"

    def setup(self) -> None:
        engine = self._create(f"tick_claim_{self.batch}", keep=False, pool=2)
        trigger_single(engine, self.tasks)
        self.server.vacuum_analyze(self.database)
        warm_dispatch(engine)

    def run(self) -> Outcome:
        assert self.engine is not None
        summary = run_tick(self.engine.db, self.engine.settings, self.engine.dispatcher, batch_size=self.batch)
        if summary.dispatched != self.tasks:
            raise RuntimeError(f"the tick dispatched {summary.dispatched} of {self.tasks} tasks")
        return Outcome(items=summary.dispatched)


@dataclass
class LifecycleCase(_EngineCase):
    """claim -> dispatch -> callback -> successors ready, `runs` runs of a wide or deep DAG."""

    shape: str = "wide"  # wide | deep
    runs: int = 1
    nodes: int = 0  # tasks per run
    batch: int = 100
    per_call: int = 1  # callbacks per call: 1 (POST /api/callback/{id}) or a batch (POST /api/callbacks)
    done: int = 0
    idle_ticks: int = 0

    def __post_init__(self) -> None:
        self.name = f"lifecycle {self.shape} ({self.runs}x{self.nodes})"
        if self.per_call > 1:
            self.name = f"lifecycle {self.shape} ({self.runs}x{self.nodes}), batches of {self.per_call}"

    def setup(self) -> None:
        engine = self._create(f"lifecycle_{self.shape}_{self.clients}", keep=True, pool=2 * self.clients + 2)
        pipeline = FAN if self.shape == "wide" else CHAIN
        for _ in range(self.runs):
            engine.trigger_run(WORKSPACE, pipeline, dispatch_now=False)
        self.server.vacuum_analyze(self.database)
        warm_dispatch(engine)

    def run(self) -> Outcome:
        assert self.engine is not None and self.transport is not None
        self.done, self.idle_ticks = drive(self.engine, self.transport, total=self.runs * self.nodes,
                                           callers=self.clients, batch=self.batch, per_call=self.per_call)
        with psycopg.connect(self.server.url(self.database)) as conn:
            row = conn.execute("SELECT count(*) FROM runs WHERE status = 'succeeded'").fetchone()
        if row is None or row[0] != self.runs:
            raise RuntimeError(f"{row[0] if row else 0} of {self.runs} runs succeeded")
        return Outcome(items=self.done)

    def teardown(self) -> None:
        # The invariant checker over the case's database, untimed, before it is dropped.
        BOOKS[(self.name, self.clients)] = len(find_violations(self.server.url(self.database)))
        super().teardown()
