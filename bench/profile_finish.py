"""Where one callback's time goes: the lifecycle's unit of work, taken apart.

`callbacks` tasks of chain runs (each finish makes a successor ready, as in a DAG) are called
back one at a time, in the phases `Engine.record_callback` runs them: the token check, the one
statement (`store.completions.complete_attempts` on an autocommit connection: finish, attempt
record, successor claimed, its dispatch context, run counters) and the dispatch of what it
claimed (storage grant, token, message). The callbacks that end a run take the engine's path
and are not profiled. Each phase is timed; each statement is counted, timed as the client sees it (round
trip + planning + execution), and also run once under EXPLAIN (ANALYZE) inside a savepoint
that is rolled back, for the server's planning and execution times. The EXPLAIN runs are not
in the phase timings' statements, but they are in the phases' wall time: the phase figures are
taken in a second pass without them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Self

from psycopg.abc import Params, Query

from bench.lifecycle import warm_dispatch
from bench.measure import TALLY, CountingCursor
from bench.server import Server
from bench.suite import CHAIN, WORKSPACE, CountingDatabase, NoopTransport, Suite, noop_engine
from orchestrator.engine.service import Engine
from orchestrator.engine.worker_protocol import read_token
from orchestrator.storage.layout import node_output_key
from orchestrator.store.completions import Outcome, complete_attempts


@dataclass
class StatementStats:
    calls: int = 0
    client_ms: float = 0.0
    plan_ms: float = 0.0
    exec_ms: float = 0.0


@dataclass
class Profile:
    callbacks: int = 0
    phases_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    statements: dict[str, StatementStats] = field(default_factory=lambda: defaultdict(StatementStats))
    transactions: int = 0
    statement_count: int = 0


_STATE = threading.local()
WARM_CALLBACKS = 5


def _store_function() -> str:
    """The store function (module.function) that sent the statement being executed."""
    frame = sys._getframe(2)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith("orchestrator.store."):
            return f"{module.removeprefix('orchestrator.store.')}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "(other)"


class ExplainingCursor(CountingCursor):
    """While `ExplainingCursor.profile` is set: each statement timed, and EXPLAIN ANALYZEd first
    in a rolled-back savepoint (or transaction)."""

    profile: Profile | None = None
    explain: bool = True

    def execute(  # type: ignore[override]
        self, query: Query, params: Params | None = None, *, prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        profile = ExplainingCursor.profile
        if profile is None or getattr(_STATE, "inside", False) or not str(query).strip():
            return super().execute(query, params, prepare=prepare, binary=binary)
        stats = profile.statements[_store_function()]
        if ExplainingCursor.explain:
            _STATE.inside = True
            try:
                with self.connection.transaction(force_rollback=True):
                    text = query.decode() if isinstance(query, bytes) else query
                    row = self.connection.execute(  # type: ignore[call-overload]
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + str(text), params
                    ).fetchone()
                if row is None:
                    raise RuntimeError("EXPLAIN returned no row")
                plan = next(iter(row.values()))[0]
                stats.plan_ms += float(plan["Planning Time"])
                stats.exec_ms += float(plan["Execution Time"])
            finally:
                _STATE.inside = False
        started = time.perf_counter()
        result = super().execute(query, params, prepare=prepare, binary=binary)
        stats.client_ms += (time.perf_counter() - started) * 1000
        stats.calls += 1
        return result


class ExplainingDatabase(CountingDatabase):
    cursor_class = ExplainingCursor


def _one_callback(engine: Engine, message: dict[str, Any], profile: Profile) -> None:
    """`Engine.record_callback`, phase by phase (same calls, same order)."""
    task_id = uuid.UUID(message["task_id"])
    key = node_output_key(message["workspace"], message["pipeline"], message["run_id"], message["version"],
                          message["node"], int(message["attempt"]))
    t0 = time.perf_counter()
    claims = read_token(engine.keyring, message["token"], task_id)
    t1 = time.perf_counter()
    outcome = Outcome(task_id, claims.attempt, uuid.UUID(claims.claim_token), True, True, {"key": key})
    limit = engine.dispatcher.claim_limit(engine.settings.tick_batch_size)
    completion = engine.db.run_statement(
        lambda conn: complete_attempts(conn, [outcome], claim_limit=limit, single=True))
    t2 = time.perf_counter()
    recorded = completion.recorded[0]
    if recorded.engine:  # the end of a run: the engine's path, as record_callback takes it
        engine.record_callback(task_id, message["token"], status="succeeded", output={"key": key}, error=None)
        return
    if not recorded.accepted:
        raise RuntimeError(f"callback of {task_id} refused")
    engine.dispatcher.dispatch(completion.claimed, completion.context)
    t3 = time.perf_counter()
    profile.phases_ms["token check"] += (t1 - t0) * 1000
    profile.phases_ms["the callback's statement (autocommit)"] += (t2 - t1) * 1000
    profile.phases_ms["dispatch of what it claimed (grant, token, message)"] += (t3 - t2) * 1000
    profile.callbacks += 1


def _drain(engine: Engine, transport: NoopTransport, callbacks: int, profile: Profile) -> None:
    while profile.callbacks < callbacks:
        if transport.messages.empty():
            engine.dispatch_ready()
            if transport.messages.empty():
                raise RuntimeError("nothing left to call back")
        _one_callback(engine, transport.messages.get(), profile)


def run_profile(server: Server, suite: Suite, *, callbacks: int) -> tuple[Profile, Profile]:
    """(statements with EXPLAIN, phases without it): each pass on its own database."""
    passes: list[Profile] = []
    for explain in (True, False):
        database = f"bench_profile_{'explain' if explain else 'plain'}"
        url = suite.copy(database)
        engine, transport = noop_engine(url, pool=1, database=ExplainingDatabase)
        try:
            # a run's last callback takes the engine's path and is not profiled
            runs = (callbacks + WARM_CALLBACKS) // max(1, suite.chain_length - 1) + 1
            for _ in range(runs):
                engine.trigger_run(WORKSPACE, CHAIN, dispatch_now=False)
            server.vacuum_analyze(database)
            warm_dispatch(engine)
            engine.dispatch_ready()  # the roots, claimed before profiling starts
            _drain(engine, transport, WARM_CALLBACKS, Profile())  # warm: connection, caches
            profile = Profile()
            ExplainingCursor.profile, ExplainingCursor.explain = profile, explain
            TALLY.reset()
            try:
                _drain(engine, transport, callbacks, profile)
            finally:
                ExplainingCursor.profile = None
            profile.statement_count, profile.transactions = TALLY.snapshot()
            passes.append(profile)
        finally:
            engine.close()
            server.drop(database)
    return passes[0], passes[1]


def to_json(profile: Profile) -> str:
    return json.dumps({"callbacks": profile.callbacks, "phases_ms": dict(profile.phases_ms),
                       "statements": {k: vars(v) for k, v in profile.statements.items()}}, indent=1)
