"""A worker's callback in one statement (migration 0020, tw_complete_attempts).

Each test drives a real engine on its own database: the test plays the worker from the messages
a capturing transport keeps (tokens without a storage grant, so no object store is involved) and
calls back through `Engine.record_callback` / `Engine.record_callbacks`, as the API does. What
the statement records is compared with what the engine's own path records (the same DAG forced
through `_record_in_engine`), fenced like it, raced on separate connections (threads released
together by a barrier), held under max_active_tasks, and followed by repairs. The invariant
checker runs after every test (tests/db_fixtures.py), and at the points a race could break the
books."""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from psycopg import pq

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row, connect
from orchestrator.engine import worker_protocol
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import EngineError, Unauthorized
from orchestrator.engine.keys import set_workspace_task_limit
from orchestrator.engine.service import Engine
from orchestrator.engine.worker_protocol import CallbackInput
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, params_digest
from orchestrator.store import completions as completion_store
from orchestrator.store.invariants import check_books
from tests import capturing
from tests.polling import poll

from .conftest import WORKSPACE
from .test_repairs_keep_the_books import waiting_backends
from .test_scheduling import set_clock

# --- the engine, its transport and the worker the test plays --------------------------------


class CapturingTransport(capturing.CapturingTransport):
    def take(self, run_id: Any, node: str | None = None) -> list[dict[str, Any]]:
        return self.take_run(run_id, node)

    def one(self, run_id: Any, node: str) -> dict[str, Any]:
        messages = self.take(run_id, node)
        assert len(messages) == 1, f"{len(messages)} dispatches of {node}: {messages}"
        return messages[0]

    def count(self, run_id: Any, node: str) -> int:
        return self.matching(lambda m: m["run_id"] == str(run_id) and m["node"] == node)


class TracedDatabase(Database):
    """A pool whose connections can write libpq's protocol trace (every message the client sends,
    BEGIN and COMMIT included) to a file while `traced()` is open."""

    def __init__(self, url: str, *, max_size: int) -> None:
        # No idle check: its empty query would be counted as the callback's.
        super().__init__(url, max_size=max_size, check_idle_s=None)
        self._trace_fd: int | None = None

    @contextmanager
    def _checkout(self) -> Iterator[tuple[Connection, bool]]:
        with super()._checkout() as (conn, reused):
            fd = self._trace_fd
            if fd is not None:
                conn.pgconn.trace(os.dup(fd))
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                yield conn, reused
            finally:
                if fd is not None:
                    conn.pgconn.untrace()

    @contextmanager
    def traced(self) -> Iterator[list[str]]:
        """The statements sent while open (a simple Query, or a Parse of the extended protocol;
        the first line of each)."""
        statements: list[str] = []
        with tempfile.TemporaryFile() as trace:
            self._trace_fd = trace.fileno()
            try:
                yield statements
            finally:
                self._trace_fd = None
            trace.seek(0)
            # One record per message; a statement's text may span lines, so only its start is kept.
            for match in re.finditer(r'^F\t\d+\t(Query|Parse)\t(.*)$', trace.read().decode(), re.M):
                kind, rest = match.groups()
                prefix = ' "' if kind == "Query" else ' "" "'  # Parse: the unnamed statement, then its text
                assert rest.startswith(prefix), rest
                statements.append(rest[len(prefix):].removesuffix('"'))


@contextmanager
def traced_stack(settings: Settings, *, max_size: int = 24) -> Iterator[tuple[Engine, CapturingTransport]]:
    """An engine on a TracedDatabase, dispatching to a capturing transport."""
    transport = CapturingTransport()
    engine = Engine(settings, TracedDatabase(settings.database_url, max_size=max_size), transports={"local": transport})
    # Tokens without a storage grant: the callback's output is not checked against an object store.
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None  # type: ignore[method-assign]
    engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
    try:
        yield engine, transport
    finally:
        engine.close()


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Engine, CapturingTransport]]:
    with traced_stack(settings) as made:
        yield made


def succeed(engine: Engine, message: dict[str, Any]) -> AttemptResult:
    return engine.record_callback(
        uuid.UUID(message["task_id"]), message["token"], status="succeeded",
        output={"key": f"out/{message['node']}/{message['attempt']}"}, error=None,
    )


def fail(engine: Engine, message: dict[str, Any], *, retryable: bool = True) -> AttemptResult:
    return engine.record_callback(
        uuid.UUID(message["task_id"]), message["token"], status="failed", output=None,
        error={"message": "boom", "code": "e1", "retryable": retryable},
    )


def success_input(message: dict[str, Any]) -> CallbackInput:
    return CallbackInput(uuid.UUID(message["task_id"]), message["token"], "succeeded",
                         output={"key": f"out/{message['node']}/{message['attempt']}"})


def node_of(engine: Engine, task_id: Any) -> str:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT node_id FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row is not None
    return str(row["node_id"])


def claimed_nodes(result: AttemptResult) -> list[str]:
    return sorted(str(c["node_id"]) for c in result.claimed)


# --- what the books say ---------------------------------------------------------------------


def task_rows(engine: Engine, run_id: Any) -> dict[str, Row]:
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT id, node_id, status, attempt, unfinished_deps, failed_deps, skipped_deps, claim_token,
                      lease_expires_at, params, carried_tasks
               FROM tasks WHERE run_id = %s""", (run_id,)).fetchall()
    return {str(r["node_id"]): r for r in rows}


def statuses(engine: Engine, run_id: Any) -> dict[str, str]:
    return {node: str(r["status"]) for node, r in task_rows(engine, run_id).items()}


def run_row(engine: Engine, run_id: Any) -> Row:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT status, unfinished_tasks, failed_tasks, blocked_upstreams FROM runs WHERE id = %s",
                           (run_id,)).fetchone()
    assert row is not None
    return row


def carried(engine: Engine, run_id: Any) -> dict[str, int]:
    """What is carried to the run's open tasks (tasks.carried_tasks), by node, where not 0 (a
    finished task's count was spent when it ended)."""
    return {node: int(r["carried_tasks"]) for node, r in task_rows(engine, run_id).items()
            if r["carried_tasks"] and r["status"] not in ("succeeded", "failed", "skipped", "cancelled")}


def attempts(engine: Engine, run_id: Any) -> dict[str, list[tuple[int, str]]]:
    """Each node's attempt rows: (attempt, status), in attempt order."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT t.node_id, a.attempt, a.status FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE t.run_id = %s ORDER BY t.node_id, a.attempt""", (run_id,)).fetchall()
    found: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        found.setdefault(str(r["node_id"]), []).append((int(r["attempt"]), str(r["status"])))
    return found


def snapshot(engine: Engine, run_id: Any) -> dict[str, Any]:
    """Everything a callback may change in a run, without ids, tokens and times."""
    tasks = {
        node: (str(r["status"]), int(r["attempt"]), int(r["unfinished_deps"]), int(r["failed_deps"]),
               int(r["skipped_deps"]), r["claim_token"] is not None)
        for node, r in task_rows(engine, run_id).items()
    }
    run = run_row(engine, run_id)
    # The run's count less what its open tasks carry: the statement carries a task's end to a
    # successor where the engine takes it off the run at once (migration 0026); both leave the
    # run counting its open tasks.
    open_carried = sum(int(r["carried_tasks"]) for r in task_rows(engine, run_id).values()
                       if r["status"] not in ("succeeded", "failed", "skipped", "cancelled"))
    return {"tasks": tasks, "attempts": attempts(engine, run_id),
            "run": (str(run["status"]), int(run["unfinished_tasks"]) - open_carried, int(run["failed_tasks"]))}


def raw_state(engine: Engine, run_id: Any) -> tuple[list[Row], list[Row], Row]:
    """The run's rows as they are (ids, tokens, leases and times included): 'nothing changed'."""
    with engine.db.connection() as conn:
        tasks = conn.execute("SELECT * FROM tasks WHERE run_id = %s ORDER BY id", (run_id,)).fetchall()
        tries = conn.execute(
            """SELECT a.* FROM task_attempts a JOIN tasks t ON t.id = a.task_id WHERE t.run_id = %s
               ORDER BY a.task_id, a.attempt""", (run_id,)).fetchall()
        run = conn.execute("SELECT * FROM runs WHERE id = %s", (run_id,)).fetchone()
    assert run is not None
    return tasks, tries, run


def books(engine: Engine) -> list[str]:
    with engine.db.connection() as conn:
        return [f"{v.check}: {v.message}" for v in check_books(conn)]


def open_attempts_of_finished_tasks(engine: Engine) -> list[Row]:
    """Attempt rows still dispatched or running on a task that is no longer out with a worker
    (a stricter book than the checker's: the attempt history tells what became of each delivery)."""
    with engine.db.connection() as conn:
        return conn.execute(
            """SELECT t.node_id, t.status, a.attempt, a.status AS attempt_status
               FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE a.status IN ('dispatched', 'running')
                 AND (t.status NOT IN ('dispatched', 'running') OR t.attempt <> a.attempt)""").fetchall()


def active_in(engine: Engine, *, pipeline_id: str | None = None, workspace_id: str = WORKSPACE) -> int:
    with engine.db.connection() as conn:
        row = conn.execute(
            """SELECT count(*)::int AS n FROM tasks WHERE workspace_id = %s AND (%s::text IS NULL OR pipeline_id = %s)
               AND status IN ('dispatched', 'running')""", (workspace_id, pipeline_id, pipeline_id)).fetchone()
    assert row is not None
    return int(row["n"])


def in_threads(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once, one thread each, released together by a barrier; their results
    (an exception is returned as the result)."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=20)
            results[index] = calls[index]()
        except BaseException as exc:  # handed to the test, which fails on it
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a racing call did not return within 60 s"
    return results


class EngineSpy:
    """Counts the outcomes recorded by the engine's own path (`_record_in_engine`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[uuid.UUID] = []
        real = worker_protocol._record_in_engine

        def spy(db: Database, claims: TaskClaims, checked: completion_store.Outcome, **kwargs: Any) -> AttemptResult:
            self.calls.append(checked.task_id)
            return real(db, claims, checked, **kwargs)

        monkeypatch.setattr(worker_protocol, "_record_in_engine", spy)


def force_engine_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statement hands every outcome back, unchanged: the engine's path records all of them."""

    def hand_back(conn: Connection, outcomes: Sequence[completion_store.Outcome], *, claim_limit: int,
                  single: bool) -> completion_store.Completion:
        return completion_store.Completion(
            recorded=[completion_store.Recorded(o.task_id, False, engine=True, position=i)
                      for i, o in enumerate(outcomes)])

    monkeypatch.setattr(completion_store, "complete_attempts", hand_back)


def fan_in(pipeline_id: str, width: int = 8) -> dict[str, Any]:
    """root -> m0..m{width-1} -> join."""
    mids = [f"m{i}" for i in range(width)]
    return {"id": pipeline_id, "nodes": [
        {"id": "root", "task": "echo"},
        *({"id": m, "task": "echo", "depends": ["root"]} for m in mids),
        {"id": "join", "task": "echo", "depends": mids},
    ]}


def start_fan_in(engine: Engine, transport: CapturingTransport, pipeline_id: str,
                 width: int = 8) -> tuple[uuid.UUID, dict[str, dict[str, Any]]]:
    """A run of fan_in whose root succeeded: its middle tasks' dispatches, by node."""
    run = engine.trigger_run(WORKSPACE, pipeline_id)
    root = succeed(engine, transport.one(run.id, "root"))
    assert root.accepted and claimed_nodes(root) == sorted(f"m{i}" for i in range(width))
    return run.id, {m["node"]: m for m in transport.take(run.id)}


def drive_to_the_end(engine: Engine, transport: CapturingTransport, run_id: Any, rounds: int = 20) -> str:
    """Succeed whatever the run has dispatched (and what the tick dispatches) until it ends."""
    for _ in range(rounds):
        status = str(run_row(engine, run_id)["status"])
        if status in ("succeeded", "failed", "cancelled"):
            return status
        messages = transport.take(run_id)
        if not messages:
            engine.tick()
            continue
        for message in messages:
            succeed(engine, message)
    return str(run_row(engine, run_id)["status"])


# --- 1. one statement --------------------------------------------------------------------------


def test_a_success_is_one_statement_that_claims_the_successor(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    assert isinstance(engine.db, TracedDatabase)
    spy = EngineSpy(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": ["a", "b", "c"]})
    run = engine.trigger_run(WORKSPACE, "chain")
    a = transport.one(run.id, "a")

    with engine.db.traced() as statements:
        result = succeed(engine, a)
    assert len(statements) == 1, statements
    assert statements[0].startswith("SELECT tw_complete_attempts("), statements
    assert result.accepted and result.outcome == "succeeded" and result.run_status == "running"
    assert spy.calls == []
    assert claimed_nodes(result) == ["b"]
    (b_claim,) = result.claimed
    tasks = task_rows(engine, run.id)
    assert (tasks["a"]["status"], tasks["b"]["status"], tasks["c"]["status"]) == ("succeeded", "dispatched", "pending")
    assert b_claim["id"] == tasks["b"]["id"] and b_claim["claim_token"] == tasks["b"]["claim_token"]
    assert b_claim["attempt"] == 1 and tasks["b"]["lease_expires_at"] is not None
    assert attempts(engine, run.id) == {"a": [(1, "succeeded")], "b": [(1, "dispatched")]}
    # a's end is carried to b (migration 0026): the run row is not written
    assert run_row(engine, run.id)["unfinished_tasks"] == 3
    assert carried(engine, run.id) == {"b": 1}
    # b was sent with the context the statement read, its token for the attempt claimed
    b = transport.one(run.id, "b")
    assert b["attempt"] == 1 and engine.keyring.read(b["token"]).claim_token == str(tasks["b"]["claim_token"])
    assert b["inputs"] == {"a": {"key": "out/a/1"}}

    assert succeed(engine, b).claimed[0]["node_id"] == "c"
    c = transport.one(run.id, "c")
    with engine.db.traced() as statements:
        last = succeed(engine, c)
    # The run's end is the engine's: the statement handed it back, nothing changed, and the
    # engine's transaction recorded it.
    assert statements[0].startswith("SELECT tw_complete_attempts(") and statements[1] == "BEGIN", statements
    assert "COMMIT" in statements
    assert spy.calls == [uuid.UUID(c["task_id"])]
    assert last.accepted and last.outcome == "succeeded" and last.run_status == "succeeded"
    assert run_row(engine, run.id)["status"] == "succeeded"
    assert attempts(engine, run.id) == {"a": [(1, "succeeded")], "b": [(1, "succeeded")], "c": [(1, "succeeded")]}


def test_one_outcome_for_the_engine_ends_the_statement_and_writes_nothing(
    stack: tuple[Engine, CapturingTransport],
) -> None:
    """One callback alone runs without a catching block (migration 0028): an outcome the engine
    must record (here the end of the run) raises TW001, the statement rolls back whole, and
    complete_attempts answers `engine` for it. `single` is refused where a raise would break the
    caller's transaction."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "alone", "steps": ["a"]})
    run = engine.trigger_run(WORKSPACE, "alone")
    a = transport.one(run.id, "a")
    outcome = completion_store.Outcome(
        uuid.UUID(a["task_id"]), 1, uuid.UUID(engine.keyring.read(a["token"]).claim_token), True,
        output={"key": "out/a/1"})
    before = (snapshot(engine, run.id), attempts(engine, run.id))

    completion = engine.db.run_statement(
        lambda conn: completion_store.complete_attempts(conn, [outcome], claim_limit=10, single=True))
    assert completion.recorded == [completion_store.Recorded(outcome.task_id, False, engine=True, position=0)]
    assert completion.claimed == [] and completion.context is None
    assert (snapshot(engine, run.id), attempts(engine, run.id)) == before
    assert before[0]["tasks"]["a"][0] == "dispatched"

    with pytest.raises(ValueError, match="autocommit"), engine.db.transaction() as conn:
        completion_store.complete_attempts(conn, [outcome], claim_limit=10, single=True)
    with pytest.raises(ValueError, match="one outcome"), engine.db.connection() as conn:
        completion_store.complete_attempts(conn, [outcome, outcome], claim_limit=10, single=True)
    assert (snapshot(engine, run.id), attempts(engine, run.id)) == before

    # the engine records it: the run ends once, its books clean
    result = succeed(engine, a)
    assert result.accepted and result.run_status == "succeeded"
    assert run_row(engine, run.id)["status"] == "succeeded" and books(engine) == []


# --- 2. the statement records what the engine records --------------------------------------------

RULES = {"id": "rules", "nodes": [
    {"id": "s", "task": "echo"},
    # fails twice: the first is retried (the statement's), the second is final and tolerated (the engine's)
    {"id": "a", "task": "fail", "on_failure": "continue", "retry": {"max_attempts": 2, "base_delay_s": 0}},
    {"id": "n", "task": "echo", "depends": ["a", "s"], "trigger_rule": "none_failed"},  # skipped on s
    {"id": "m", "task": "echo", "depends": ["n"]},  # skipped in the second wave
    {"id": "z", "task": "echo", "depends": ["n"], "trigger_rule": "all_done"},  # ready in the second wave
    {"id": "z2", "task": "echo", "depends": ["m"], "trigger_rule": "all_done"},  # ready in the third
    {"id": "g", "kind": "approval", "depends": ["s"]},  # made waiting
    {"id": "b1", "task": "echo", "depends": ["s"]},
    {"id": "b2", "task": "echo", "depends": ["s"]},
    {"id": "b3", "task": "echo", "depends": ["s"]},
    {"id": "j", "task": "echo", "depends": ["b1", "b2", "b3"]},  # a join of three
]}


def play_rules(engine: Engine, transport: CapturingTransport) -> list[Any]:
    """One run of RULES, the same callbacks in the same order; what each step answered and left."""
    run = engine.trigger_run(WORKSPACE, "rules")
    trail: list[Any] = []

    def step(label: str, result: AttemptResult) -> None:
        trail.append((label, result.accepted, result.outcome, result.task_status, result.run_status,
                      result.newly_ready, claimed_nodes(result), snapshot(engine, run.id)))
        assert books(engine) == [], label

    first = transport.one(run.id, "a")
    step("a fails, retried", fail(engine, first))
    engine.dispatch_ready(run.id)  # the retry, at once (base_delay_s 0)
    step("a fails, final", fail(engine, transport.one(run.id, "a")))
    step("s", succeed(engine, transport.one(run.id, "s")))
    for node in ("b1", "b2", "b3", "z", "z2"):
        step(node, succeed(engine, transport.one(run.id, node)))
    gate = task_rows(engine, run.id)["g"]["id"]
    decided = engine.decide(WORKSPACE, gate, kind="approval", succeeded=True, actor="tester")
    step("g approved", decided)
    step("j, the last", succeed(engine, transport.one(run.id, "j")))
    assert transport.take(run.id) == []
    return trail


def test_the_statement_records_what_the_engine_records(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, RULES)
    with monkeypatch.context() as patch:
        spy = EngineSpy(patch)
        fast = play_rules(engine, transport)
    with monkeypatch.context() as patch:
        spy_forced = EngineSpy(patch)
        force_engine_path(patch)
        forced = play_rules(engine, transport)
    # Of the 9 callbacks the engine recorded a's final failure and j's end of the run; the
    # statement the other 7 (forced: the engine all 9).
    assert [node_of(engine, t) for t in spy.calls] == ["a", "j"]
    assert len(spy_forced.calls) == 9

    for (label, *got), (_, *want) in zip(fast, forced, strict=True):
        assert got == want, label
    final = fast[-1][-1]
    assert final["run"] == ("succeeded", 0, 0)
    assert {node: t[0] for node, t in final["tasks"].items()} == {
        "s": "succeeded", "a": "failed", "n": "skipped", "m": "skipped", "z": "succeeded", "z2": "succeeded",
        "g": "succeeded", "b1": "succeeded", "b2": "succeeded", "b3": "succeeded", "j": "succeeded"}
    after_s = next(t for label, *t in fast if label == "s")
    # s's statement: 5 made ready and claimed over three waves (b1-b3; z after n's skip; z2 after m's)
    assert after_s[4] == 5 and after_s[5] == ["b1", "b2", "b3", "z", "z2"]
    assert after_s[-1]["tasks"]["g"][0] == "waiting" and after_s[-1]["tasks"]["n"][0] == "skipped"
    assert after_s[-1]["tasks"]["n"][2:5] == (0, 1, 0) and after_s[-1]["tasks"]["z2"][2:5] == (0, 0, 1)


# --- 3. fenced like every outcome ------------------------------------------------------------------


def test_stale_duplicate_and_forged_callbacks_change_nothing(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    spy = EngineSpy(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "fenced", "nodes": [
        {"id": "a", "task": "echo", "heartbeat_s": 5}, {"id": "b", "task": "echo", "depends": ["a"]}]})
    run = engine.trigger_run(WORKSPACE, "fenced")
    first = transport.one(run.id, "a")
    # The lease lapses (no heartbeat, no callback): the tick gives the delivery back and sends it again.
    set_clock(engine, datetime.now(UTC) + timedelta(minutes=10))
    assert engine.tick().expired == 1
    second = transport.one(run.id, "a")
    assert second["attempt"] == 2
    before = raw_state(engine, run.id)

    stale = succeed(engine, first)
    assert (stale.accepted, stale.outcome, stale.task_status) == (False, "stale_attempt", "dispatched")
    stale_failure = fail(engine, first)
    assert (stale_failure.accepted, stale_failure.outcome) == (False, "stale_attempt")
    assert raw_state(engine, run.id) == before

    foreign = TokenKeyring([("other", "A" * 43)], engine.settings.token_issuer, engine.settings.token_audience)
    claims = engine.keyring.read(second["token"])
    with pytest.raises(Unauthorized):
        succeed(engine, {**second, "token": foreign.issue(claims)})
    with pytest.raises(Unauthorized):  # a token of another task
        engine.record_callback(uuid.uuid4(), second["token"], status="succeeded", output={"key": "k"}, error=None)
    tampered = second["token"][:-6] + ("AAAAAA" if not second["token"].endswith("AAAAAA") else "BBBBBB")
    with pytest.raises(Unauthorized):
        succeed(engine, {**second, "token": tampered})
    # a token the engine's own keyring signs, for a claim token that is not the task's
    forged = engine.keyring.issue(TaskClaims(
        task_id=second["task_id"], attempt=2, claim_token=str(uuid.uuid4()), workspace=WORKSPACE, task_name="echo",
        params_sha256=params_digest({}), expires_at=int(time.time()) + 600, storage=None))
    wrong_claim = succeed(engine, {**second, "token": forged})
    assert (wrong_claim.accepted, wrong_claim.outcome) == (False, "stale_attempt")
    assert raw_state(engine, run.id) == before
    assert spy.calls == []  # every refusal was the statement's: nothing handed back

    accepted = succeed(engine, second)
    assert accepted.accepted and claimed_nodes(accepted) == ["b"]
    after = raw_state(engine, run.id)
    duplicate = succeed(engine, second)
    assert (duplicate.accepted, duplicate.outcome, duplicate.task_status) == (False, "duplicate", "succeeded")
    late_failure = fail(engine, second)
    assert (late_failure.accepted, late_failure.outcome) == (False, "already_finished")
    assert raw_state(engine, run.id) == after
    assert attempts(engine, run.id) == {"a": [(1, "dispatch_failed"), (2, "succeeded")], "b": [(1, "dispatched")]}
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"


# --- 4. races on separate connections --------------------------------------------------------------


def test_eight_callbacks_at_once_claim_their_join_exactly_once(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, fan_in("fan"))
    for _ in range(3):
        run_id, mids = start_fan_in(engine, transport, "fan")
        results = in_threads([partial(succeed, engine, m) for m in mids.values()])
        assert all(isinstance(r, AttemptResult) and r.accepted for r in results), results
        assert sorted(n for r in results for n in claimed_nodes(r)) == ["join"]
        assert sum(r.newly_ready for r in results) == 1
        assert attempts(engine, run_id)["join"] == [(1, "dispatched")]
        assert statuses(engine, run_id)["join"] == "dispatched"
        # the root and the eight carried to the join, whatever the order: the run row untouched
        assert run_row(engine, run_id)["unfinished_tasks"] == 10 and run_row(engine, run_id)["status"] == "running"
        assert carried(engine, run_id) == {"join": 9}
        assert books(engine) == []
        assert succeed(engine, transport.one(run_id, "join")).run_status == "succeeded"
        assert transport.take(run_id) == []


def test_one_callback_sent_four_times_at_once_is_accepted_once(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "pair", "steps": ["a", "b", "c"]})
    for _ in range(3):
        run = engine.trigger_run(WORKSPACE, "pair")
        a = transport.one(run.id, "a")
        results = in_threads([partial(succeed, engine, a)] * 4)
        assert all(isinstance(r, AttemptResult) for r in results), results
        assert sorted(r.outcome for r in results) == ["duplicate", "duplicate", "duplicate", "succeeded"]
        assert sorted(n for r in results for n in claimed_nodes(r)) == ["b"]
        assert attempts(engine, run.id) == {"a": [(1, "succeeded")], "b": [(1, "dispatched")]}
        assert run_row(engine, run.id)["unfinished_tasks"] == 3 and carried(engine, run.id) == {"b": 1}
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"


@pytest.mark.parametrize("path", ["statement", "engine"])
def test_a_callback_racing_a_cancel(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Either the callback lands first (its successor claimed, then cancelled with the rest) or
    the cancel does (the callback refused); the run is cancelled and the books are clean."""
    engine, transport = stack
    if path == "engine":
        force_engine_path(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "doomed", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]}, {"id": "keep", "task": "echo"}]})
    outcomes: Counter[str] = Counter()
    for _ in range(8):
        run = engine.trigger_run(WORKSPACE, "doomed")
        a = transport.one(run.id, "a")
        callback, cancel = in_threads([partial(succeed, engine, a),
                                       partial(engine.cancel_run, WORKSPACE, run.id, actor="op")])
        assert isinstance(callback, AttemptResult) and not isinstance(cancel, BaseException), (callback, cancel)
        outcomes[callback.outcome] += 1
        tasks = statuses(engine, run.id)
        if callback.accepted:
            assert tasks == {"a": "succeeded", "b": "cancelled", "c": "cancelled", "keep": "cancelled"}
            assert claimed_nodes(callback) == ["b", "c"]
        else:
            assert callback.outcome == "already_finished" and callback.task_status == "cancelled"
            assert tasks == {"a": "cancelled", "b": "cancelled", "c": "cancelled", "keep": "cancelled"}
        assert run_row(engine, run.id)["status"] == "cancelled" and run_row(engine, run.id)["unfinished_tasks"] == 0
        assert books(engine) == []
    assert sum(outcomes.values()) == 8


def test_a_callback_racing_its_lease_expiry(stack: tuple[Engine, CapturingTransport]) -> None:
    """The tick that finds the lease lapsed and the callback of that attempt: exactly one lands."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "late", "nodes": [
        {"id": "a", "task": "echo", "heartbeat_s": 5}, {"id": "b", "task": "echo", "depends": ["a"]}]})
    base = datetime.now(UTC)
    for round_ in range(6):
        run = engine.trigger_run(WORKSPACE, "late")
        a = transport.one(run.id, "a")
        set_clock(engine, base + timedelta(hours=round_ + 1))  # past a's lease, not past the next round's
        callback, tick = in_threads([partial(succeed, engine, a), engine.tick])
        assert isinstance(callback, AttemptResult) and not isinstance(tick, BaseException), (callback, tick)
        assert callback.accepted != (tick.expired == 1), (callback, tick)
        if callback.accepted:
            assert claimed_nodes(callback) == ["b"] and attempts(engine, run.id)["a"] == [(1, "succeeded")]
        else:
            assert callback.outcome in ("stale_attempt", "not_active"), callback
            assert attempts(engine, run.id)["a"][0] == (1, "dispatch_failed")
            assert statuses(engine, run.id)["b"] == "pending"
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"
        assert [s for _, s in attempts(engine, run.id)["b"]] == ["succeeded"]


def test_batches_and_single_callbacks_racing_over_one_join(stack: tuple[Engine, CapturingTransport]) -> None:
    """m0-m3 in a batch, m4-m7 one by one, and a second batch repeating m2-m5, all at once:
    each middle task finished once, the join claimed once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, fan_in("fan"))
    for _ in range(3):
        run_id, mids = start_fan_in(engine, transport, "fan")
        first = [success_input(mids[f"m{i}"]) for i in range(4)]
        second = [success_input(mids[f"m{i}"]) for i in (2, 3, 4, 5)]
        singles = [partial(succeed, engine, mids[f"m{i}"]) for i in range(4, 8)]
        results = in_threads([partial(engine.record_callbacks, first), *singles,
                              partial(engine.record_callbacks, second)])
        assert not any(isinstance(r, BaseException) for r in results), results
        answers: list[tuple[str, AttemptResult | EngineError]] = [
            *zip(["m0", "m1", "m2", "m3"], results[0], strict=True),
            *zip(["m4", "m5", "m6", "m7"], results[1:5], strict=True),
            *zip(["m2", "m3", "m4", "m5"], results[5], strict=True),
        ]
        accepted = Counter(node for node, r in answers if isinstance(r, AttemptResult) and r.accepted)
        assert accepted == Counter({f"m{i}": 1 for i in range(8)}), answers
        refused = sorted((node, r.outcome) for node, r in answers if isinstance(r, AttemptResult) and not r.accepted)
        assert refused == [(n, "duplicate") for n in ("m2", "m3", "m4", "m5")], answers
        assert all(attempts(engine, run_id)[f"m{i}"] == [(1, "succeeded")] for i in range(8))
        assert attempts(engine, run_id)["join"] == [(1, "dispatched")]
        assert transport.count(run_id, "join") == 1
        assert run_row(engine, run_id)["unfinished_tasks"] == 10 and carried(engine, run_id) == {"join": 9}
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run_id) == "succeeded"


def test_the_last_two_callbacks_of_a_run_at_once_end_it_once(stack: tuple[Engine, CapturingTransport]) -> None:
    """Of two statements that would each end the run, the one that reaches zero hands back to
    the engine: the run ends once and its dependant is triggered once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "ends", "nodes": [{"id": "x", "task": "echo"}, {"id": "y", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "after", "nodes": [{"id": "n", "task": "echo"}],
                                       "depends": [{"pipeline": "ends", "outputs": []}]})
    for round_ in range(4):
        run = engine.trigger_run(WORKSPACE, "ends")
        x, y = transport.one(run.id, "x"), transport.one(run.id, "y")
        results = in_threads([partial(succeed, engine, x), partial(succeed, engine, y)])
        assert all(isinstance(r, AttemptResult) and r.accepted for r in results), results
        assert sorted(str(r.run_status) for r in results) == ["running", "succeeded"]
        assert run_row(engine, run.id)["status"] == "succeeded"
        assert len(runs_of(engine, "after")) == round_ + 1
        assert books(engine) == []
    for later in runs_of(engine, "after"):
        assert drive_to_the_end(engine, transport, later["id"]) == "succeeded"


# --- 5. max_active_tasks: the successors are claimed by the scope-aware claim ----------------------


def test_a_pipeline_limit_holds_after_every_callback(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "capped", "concurrency": {"max_active_tasks": 1},
                                       "steps": ["a", "b", "c"]})
    first = engine.trigger_run(WORKSPACE, "capped")
    second = engine.trigger_run(WORKSPACE, "capped")
    assert active_in(engine, pipeline_id="capped") == 1
    order: list[tuple[str, str]] = []
    for _ in range(12):
        messages = transport.take(first.id) + transport.take(second.id)
        if not messages:
            engine.tick()  # a run's end is the engine's; the other run's root waits for the tick
            messages = transport.take(first.id) + transport.take(second.id)
            if not messages:
                break
        assert len(messages) == 1, messages
        (message,) = messages
        order.append((message["run_id"], message["node"]))
        result = succeed(engine, message)
        assert result.accepted
        if message["node"] != "c":
            # the next step of the same run, claimed by the scope-aware claim in the statement
            assert [(str(c["run_id"]), c["node_id"]) for c in result.claimed] == [
                (message["run_id"], {"a": "b", "b": "c"}[message["node"]])]
        assert active_in(engine, pipeline_id="capped") <= 1
        assert books(engine) == []
    assert run_row(engine, first.id)["status"] == run_row(engine, second.id)["status"] == "succeeded"
    assert [node for _, node in order] == ["a", "b", "c", "a", "b", "c"]
    assert len({run for run, _ in order[:3]}) == len({run for run, _ in order[3:]}) == 1


def test_a_pipeline_limit_claims_only_the_room_of_a_fan_out(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "wide", "concurrency": {"max_active_tasks": 2}, "nodes": [
        {"id": "a", "task": "echo"}, *({"id": f"b{i}", "task": "echo", "depends": ["a"]} for i in range(4))]})
    run = engine.trigger_run(WORKSPACE, "wide")
    result = succeed(engine, transport.one(run.id, "a"))
    assert result.newly_ready == 4 and len(result.claimed) == 2
    assert sorted(statuses(engine, run.id).values()).count("ready") == 2
    assert active_in(engine, pipeline_id="wide") == 2
    for message in transport.take(run.id):
        nxt = succeed(engine, message)
        # nothing newly ready: the place freed is the tick's to fill, as on the engine's path
        assert nxt.accepted and nxt.newly_ready == 0 and nxt.claimed == []
        assert active_in(engine, pipeline_id="wide") <= 2
    engine.tick()
    assert active_in(engine, pipeline_id="wide") == 2
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"


def test_a_workspace_limit_holds_after_every_callback(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    tenant = "capped-ws"
    engine.create_api_key(tenant, "admin", raw_key="capped-ws-key")
    set_workspace_task_limit(engine.db, tenant, 2)
    engine.create_pipeline(tenant, {"id": "fan", "nodes": [
        {"id": "a", "task": "echo"}, *({"id": f"b{i}", "task": "echo", "depends": ["a"]} for i in range(3))]})
    engine.create_pipeline(tenant, {"id": "other", "steps": ["x", "y"]})
    run = engine.trigger_run(tenant, "fan")
    other = engine.trigger_run(tenant, "other")
    assert active_in(engine, workspace_id=tenant) == 2
    result = succeed(engine, transport.one(run.id, "a"))
    # one place freed (a's): one of the three successors claimed, after the run row
    assert result.newly_ready == 3 and len(result.claimed) == 1
    assert active_in(engine, workspace_id=tenant) == 2
    for _ in range(20):
        if run_row(engine, run.id)["status"] == run_row(engine, other.id)["status"] == "succeeded":
            break
        messages = transport.take(run.id) + transport.take(other.id)
        if not messages:
            engine.tick()
        for message in messages:
            succeed(engine, message)
            assert active_in(engine, workspace_id=tenant) <= 2
            assert books(engine) == []
    assert run_row(engine, run.id)["status"] == run_row(engine, other.id)["status"] == "succeeded"


def test_a_batch_claims_limited_successors_after_the_run_rows(stack: tuple[Engine, CapturingTransport]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "capped", "concurrency": {"max_active_tasks": 2}, "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]}]})
    engine.create_pipeline(WORKSPACE, {"id": "free", "steps": ["p", "q"]})
    first, second = engine.trigger_run(WORKSPACE, "capped"), engine.trigger_run(WORKSPACE, "capped")
    free = engine.trigger_run(WORKSPACE, "free")
    sent = transport.take(first.id) + transport.take(second.id) + transport.take(free.id)
    assert sorted(m["node"] for m in sent) == ["a", "a", "p"]
    answers = engine.record_callbacks([success_input(m) for m in sent])
    assert all(isinstance(a, AttemptResult) and a.accepted for a in answers)
    # two places under the pipeline's limit, four successors ready: two claimed; q by the statement
    claimed = transport.take(first.id) + transport.take(second.id)
    assert len(claimed) == 2 and active_in(engine, pipeline_id="capped") == 2
    q = transport.one(free.id, "q")
    assert q["attempt"] == 1
    assert books(engine) == []
    for message in [*claimed, q]:
        succeed(engine, message)
        assert active_in(engine, pipeline_id="capped") <= 2
    for run_id in (first.id, second.id, free.id):
        assert drive_to_the_end(engine, transport, run_id) == "succeeded"
        assert active_in(engine, pipeline_id="capped") <= 2


# --- 6. a pipeline update between claim and callback; repairs after the statement's successes --------


def test_an_update_between_claim_and_callback(stack: tuple[Engine, CapturingTransport]) -> None:
    """The run keeps its version; the limit the update sets holds for the successors claimed."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "evolving", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"], "params": {"v": 1}},
        {"id": "c", "task": "echo", "depends": ["a"], "params": {"v": 1}}]})
    run = engine.trigger_run(WORKSPACE, "evolving")
    a = transport.one(run.id, "a")
    engine.update_pipeline(WORKSPACE, "evolving", {"id": "evolving", "concurrency": {"max_active_tasks": 1}, "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"], "params": {"v": 2}},
        {"id": "c", "task": "echo", "depends": ["a"], "params": {"v": 2}},
        {"id": "d", "task": "echo", "depends": ["b"]}]})
    result = succeed(engine, a)
    assert result.accepted and result.newly_ready == 2 and len(result.claimed) == 1  # the new limit
    assert set(statuses(engine, run.id)) == {"a", "b", "c"}  # the run's own version
    (sent,) = transport.take(run.id)
    assert sent["params"] == {"v": 1}
    assert active_in(engine, pipeline_id="evolving") == 1
    assert succeed(engine, sent).claimed == []  # nothing newly ready: the other waits for the tick
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"

    # and the other way: the limit lifted between claim and callback
    run = engine.trigger_run(WORKSPACE, "evolving")
    a = transport.one(run.id, "a")
    engine.update_pipeline(WORKSPACE, "evolving", {"id": "evolving", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]}, {"id": "d", "task": "echo", "depends": ["b"]}]})
    result = succeed(engine, a)
    assert claimed_nodes(result) == ["b", "c"]
    sent_now = transport.take(run.id)
    assert {m["node"]: m["params"] for m in sent_now} == {"b": {"v": 2}, "c": {"v": 2}}
    for message in sent_now:
        succeed(engine, message)
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"
    assert set(statuses(engine, run.id)) == {"a", "b", "c", "d"}


def test_a_redrive_after_the_statement_recorded_a_sibling(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    spy = EngineSpy(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "redo", "nodes": [
        {"id": "a", "task": "fail"}, {"id": "s", "task": "echo"},
        {"id": "j", "task": "echo", "depends": ["a", "s"]}]})
    run = engine.trigger_run(WORKSPACE, "redo")
    a, s = transport.one(run.id, "a"), transport.one(run.id, "s")
    assert succeed(engine, s).claimed == []  # by the statement: j still waits for a
    assert spy.calls == []
    assert task_rows(engine, run.id)["j"]["unfinished_deps"] == 1
    failed = fail(engine, a, retryable=False)  # final, `on_failure: stop`: the engine's
    assert failed.outcome == "failed" and failed.run_status == "failed" and failed.dead_lettered
    assert statuses(engine, run.id) == {"a": "failed", "s": "succeeded", "j": "skipped"}
    assert books(engine) == []

    assert engine.redrive_run(WORKSPACE, run.id) == 2
    assert books(engine) == []
    retried = transport.one(run.id, "a")
    assert retried["attempt"] == 2
    result = succeed(engine, retried)
    assert claimed_nodes(result) == ["j"] and result.run_status == "running"
    assert [node_of(engine, t) for t in spy.calls] == ["a"]  # the redriven success was the statement's
    assert books(engine) == []
    assert succeed(engine, transport.one(run.id, "j")).run_status == "succeeded"
    assert statuses(engine, run.id) == {"a": "succeeded", "s": "succeeded", "j": "succeeded"}
    assert attempts(engine, run.id)["s"] == [(1, "succeeded")]  # the sibling's success stood


def test_a_dead_letter_retry_after_the_statement_recorded_a_sibling(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    spy = EngineSpy(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "tolerant", "nodes": [
        {"id": "a", "task": "fail", "on_failure": "continue"}, {"id": "s", "task": "echo"},
        {"id": "t", "task": "echo"},
        {"id": "j", "task": "echo", "depends": ["a", "s", "t"], "trigger_rule": "none_failed"},
        {"id": "k", "task": "echo", "depends": ["j"]}]})
    run = engine.trigger_run(WORKSPACE, "tolerant")
    a, s, t = (transport.one(run.id, n) for n in ("a", "s", "t"))
    assert fail(engine, a, retryable=False).outcome == "failed"  # tolerated: the run goes on
    assert succeed(engine, s).claimed == []  # by the statement
    assert task_rows(engine, run.id)["j"]["unfinished_deps"] == 1 and task_rows(engine, run.id)["j"]["failed_deps"] == 1
    (entry,) = engine.list_dead_letters(WORKSPACE)
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert books(engine) == []
    j = task_rows(engine, run.id)["j"]
    assert (j["status"], j["unfinished_deps"], j["failed_deps"]) == ("pending", 2, 0)
    assert succeed(engine, transport.one(run.id, "a")).claimed == []  # the retry succeeds: j waits for t
    result = succeed(engine, t)
    assert claimed_nodes(result) == ["j"]  # none_failed holds now
    assert books(engine) == []
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"
    assert statuses(engine, run.id) == {n: "succeeded" for n in ("a", "s", "t", "j", "k")}
    assert [node_of(engine, x) for x in spy.calls] == ["a", "k"]  # a's death and the run's end
    assert run_row(engine, run.id)["failed_tasks"] == 0


# --- 7. a batch of callbacks ---------------------------------------------------------------------


def runs_of(engine: Engine, pipeline_id: str) -> list[Row]:
    with engine.db.connection() as conn:
        return conn.execute("SELECT id, status FROM runs WHERE workspace_id = %s AND pipeline_id = %s",
                            (WORKSPACE, pipeline_id)).fetchall()


def test_a_batch_of_fifty_ends_two_runs_and_releases_their_dependants_once(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, transport = stack
    spy = EngineSpy(monkeypatch)
    for upstream in ("up1", "up2"):
        engine.create_pipeline(WORKSPACE, {"id": upstream, "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(20)]})
    engine.create_pipeline(WORKSPACE, {"id": "down", "nodes": [{"id": "d", "task": "echo"}], "depends": [
        {"pipeline": "up1", "outputs": []}, {"pipeline": "up2", "outputs": []}]})
    engine.create_pipeline(WORKSPACE, {"id": "later", "nodes": [{"id": "l", "task": "echo"}],
                                       "depends": [{"pipeline": "up1", "outputs": []}]})
    engine.create_pipeline(WORKSPACE, {"id": "bulk", "nodes": [
        *({"id": f"r{i}", "task": "echo"} for i in range(10)),
        *({"id": f"s{i}", "task": "echo", "depends": [f"r{i}"]} for i in range(10))]})
    orchestration = engine.trigger_orchestration(WORKSPACE, pipeline_ids=["up1", "up2", "down"])
    run_ids = {str(r["pipeline_id"]): r["id"] for r in orchestration.runs}
    assert run_row(engine, run_ids["down"])["status"] == "pending"
    assert run_row(engine, run_ids["down"])["blocked_upstreams"] == 2
    bulk = engine.trigger_run(WORKSPACE, "bulk").id

    messages = transport.take(run_ids["up1"]) + transport.take(run_ids["up2"]) + transport.take(bulk)
    assert len(messages) == 50
    order = sorted(messages, key=lambda m: m["task_id"][::-1])  # neither by run nor by task id
    answers = engine.record_callbacks([success_input(m) for m in order])

    assert all(isinstance(a, AttemptResult) and a.accepted and a.outcome == "succeeded" for a in answers), answers
    assert spy.calls == []  # the runs' ends were followed in the batch's own transaction
    by_run = {m["task_id"]: m["run_id"] for m in order}
    for message, answer in zip(order, answers, strict=True):
        assert isinstance(answer, AttemptResult)
        assert str(answer.run_id) == message["run_id"] and answer.pipeline_id == message["pipeline"]
        expected = "running" if message["run_id"] == str(bulk) else "succeeded"
        assert (answer.run_status or "running") == expected, (message["pipeline"], answer)
    assert len(by_run) == 50
    assert run_row(engine, run_ids["up1"])["status"] == run_row(engine, run_ids["up2"])["status"] == "succeeded"
    # the bulk run's successors were claimed by the batch's statement and sent once each
    bulk_sent = transport.take(bulk)
    assert sorted(m["node"] for m in bulk_sent) == sorted(f"s{i}" for i in range(10))
    assert all(m["attempt"] == 1 for m in bulk_sent)
    assert run_row(engine, bulk)["unfinished_tasks"] == 20  # each r{i} carried to its s{i}
    assert carried(engine, bulk) == {f"s{i}": 1 for i in range(10)}

    # `down` was released once, by the second of its upstreams to end, and dispatched once
    down = run_row(engine, run_ids["down"])
    assert (down["status"], down["blocked_upstreams"]) == ("running", 0)
    d = transport.one(run_ids["down"], "d")
    assert attempts(engine, run_ids["down"]) == {"d": [(1, "dispatched")]}
    # `later` (outside the orchestration) was triggered once by up1's end
    (later,) = runs_of(engine, "later")
    first_later = transport.one(later["id"], "l")
    assert first_later["attempt"] == 1
    assert books(engine) == []

    # the same batch again: every callback a duplicate, nothing released or triggered again
    replay = engine.record_callbacks([success_input(m) for m in order])
    assert {a.outcome for a in replay if isinstance(a, AttemptResult)} == {"duplicate"} and len(replay) == 50
    engine.tick()
    assert len(runs_of(engine, "later")) == 1 and transport.take(run_ids["down"]) == []
    assert attempts(engine, run_ids["down"]) == {"d": [(1, "dispatched")]}
    assert succeed(engine, d).run_status == "succeeded"
    rest = engine.record_callbacks([success_input(m) for m in bulk_sent])  # the bulk run's last ten
    assert [a.run_status for a in rest if isinstance(a, AttemptResult)] == ["succeeded"] * 10
    assert run_row(engine, bulk)["status"] == "succeeded"
    assert succeed(engine, first_later).run_status == "succeeded"
    assert len(runs_of(engine, "later")) == 1


def test_a_batch_answers_each_callback_for_itself_when_a_task_appears_twice(
    stack: tuple[Engine, CapturingTransport]
) -> None:
    """A batch holding a stale attempt's success and the current attempt's final failure of the
    same task, for 30 tasks. When the results were paired with the callbacks by task id in the
    order sent (12fc31b), the unstable sort of the items by task id swapped some pairs: the stale
    success was handed the engine's answer and the current failure the refusal (`not_active`),
    and the failure was never recorded (fixed by 7ab6629: each result carries its position)."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "twice", "nodes": [
        {"id": f"n{i}", "task": "echo", "heartbeat_s": 5, "on_failure": "continue"} for i in range(30)]})
    run = engine.trigger_run(WORKSPACE, "twice")
    stale = {m["node"]: m for m in transport.take(run.id)}
    set_clock(engine, datetime.now(UTC) + timedelta(minutes=10))
    assert engine.tick().expired == 30  # every delivery lapsed and was sent again
    current = {m["node"]: m for m in transport.take(run.id)}
    assert {m["attempt"] for m in current.values()} == {2}
    callbacks: list[tuple[str, str, CallbackInput]] = []
    for node in sorted(stale):
        callbacks.append((node, "stale", success_input(stale[node])))
        callbacks.append((node, "current", CallbackInput(
            uuid.UUID(current[node]["task_id"]), current[node]["token"], "failed",
            error={"message": "boom", "retryable": False})))
    answers = engine.record_callbacks([c for _, _, c in callbacks])
    got = [(node, which, a.outcome if isinstance(a, AttemptResult) else repr(a))
           for (node, which, _), a in zip(callbacks, answers, strict=True)]
    wrong = [g for g in got if g[2] != {"stale": "stale_attempt", "current": "failed"}[g[1]]]
    assert wrong == [], f"{len(wrong)} callbacks answered for another: {wrong[:6]}"
    assert set(statuses(engine, run.id).values()) == {"failed"}


# --- 8. what the statement hands back or records beside the DAG ---------------------------------------


@pytest.mark.parametrize("max_concurrency", [None, 2])
def test_map_items_count_down_their_map_node(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch, max_concurrency: int | None
) -> None:
    """An item of a map is the statement's (its map node counted down) until the last, whose map
    node settles in the engine. An item of a capped map too (migration 0028): its success makes
    room under the cap, and the same statement claims the next child into it."""
    engine, transport = stack
    spy = EngineSpy(monkeypatch)
    each: dict[str, Any] = {"over": "params.items"}
    if max_concurrency is not None:
        each["max_concurrency"] = max_concurrency
    engine.create_pipeline(WORKSPACE, {"id": "mapped", "params": {"items": list(range(6))}, "nodes": [
        {"id": "each", "task": "echo", "map": each}, {"id": "x", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "mapped")
    done = 0
    for _ in range(20):
        items = transport.take(run.id, "each")
        if not items:
            engine.tick()
            items = transport.take(run.id, "each")
            if not items:
                break
        for item in items:
            result = succeed(engine, item)
            assert result.accepted
            done += 1
            if max_concurrency is not None and done <= 6 - max_concurrency:
                # the room it made is filled at once, by the statement (the books check the cap)
                assert [c["node_id"] for c in result.claimed] == ["each"], done
            assert books(engine) == []
            with engine.db.connection() as conn:
                node = conn.execute("SELECT status, unfinished_deps FROM tasks WHERE run_id = %s AND kind = 'map'",
                                    (run.id,)).fetchone()
            assert node is not None
            assert (node["status"], node["unfinished_deps"]) == (("pending", 6 - done) if done < 6 else ("succeeded", 0))
    assert done == 6
    assert succeed(engine, transport.one(run.id, "x")).run_status == "succeeded"
    by_engine = len(spy.calls)
    assert by_engine == 1 + 1  # the last item (its map node settles), and x, which ended the run


# --- defects found: each test below fails until its defect is fixed (the engine-path cases of the
# parametrized ones show whether the defect is the statement's or older) ------------------------------


@pytest.mark.parametrize("path", ["statement", "engine"])
def test_a_cancel_waiting_behind_a_callback_closes_the_attempts_it_claimed(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A cancel whose statement started before a callback committed the claim of its successors
    (and waited for a row lock meanwhile) cancels those successors, but its UPDATE of
    task_attempts reads the statement's snapshot, which has no attempt row for them: they stay
    'dispatched' on a cancelled task (store/runs.cancel_run; on the engine's path as on the
    statement's)."""
    engine, transport = stack
    if path == "engine":
        force_engine_path(monkeypatch)
    engine.create_pipeline(WORKSPACE, {"id": "doomed", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["a"]}, *({"id": f"k{i}", "task": "echo"} for i in range(10))]})
    for _ in range(30):
        # The cancel locks the run's tasks in id order: it must first wait for one the callback
        # never touches (the callback's own updates would queue behind the waiting cancel).
        run = engine.trigger_run(WORKSPACE, "doomed")
        tasks = task_rows(engine, run.id)
        first = min(tasks.values(), key=lambda r: r["id"])
        if first["node_id"] not in ("a", "b", "c"):
            break
        engine.cancel_run(WORKSPACE, run.id, actor="op")
    else:
        raise AssertionError("no run had a task of its own first")
    a = transport.one(run.id, "a")
    cancelled: list[Any] = []
    with connect(engine.db.url) as holder:
        with holder.transaction():
            holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR KEY SHARE", (first["id"],))
            canceller = threading.Thread(
                target=lambda: cancelled.append(engine.cancel_run(WORKSPACE, run.id, actor="op")))
            canceller.start()
            poll(lambda: waiting_backends(engine.db.url) >= 1, "the cancel never waited")
            result = succeed(engine, a)  # committed while the cancel's statement waits
            assert result.accepted and claimed_nodes(result) == ["b", "c"]
        canceller.join(30)
    assert cancelled
    tasks_after = statuses(engine, run.id)
    assert (tasks_after.pop("a"), set(tasks_after.values())) == ("succeeded", {"cancelled"})
    assert books(engine) == []
    assert open_attempts_of_finished_tasks(engine) == []


@pytest.mark.parametrize("path", ["statement", "engine"])
def test_the_code_version_of_a_registered_worker_is_recorded_for_the_claimed(
    stack: tuple[Engine, CapturingTransport], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A successor routed to a registered worker service, claimed by the statement: the statement
    records the code version it goes to (as worker_store.record_dispatched_code does). Fails on
    the statement's path: in tw_complete_attempts the alias `r` of jsonb_array_elements(v_ctx.routes)
    is also the name of a PL/pgSQL variable (`r record`), so the statement raises AmbiguousColumn
    whenever a claimed task has a route, and the callback is not recorded at all."""
    engine, transport = stack
    if path == "engine":
        force_engine_path(monkeypatch)
    engine.register_worker(WORKSPACE, service="svc", version="7", transport="http",
                           endpoint="http://127.0.0.1:9/dispatch", tasks=[{"name": "echo", "code_hash": "c0de"}])
    monkeypatch.setattr(engine.dispatcher.routed, "get", lambda *args, **kwargs: transport)
    engine.create_pipeline(WORKSPACE, {"id": "routed", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]},
        {"id": "c", "task": "echo", "depends": ["b"]}]})
    run = engine.trigger_run(WORKSPACE, "routed")
    result = succeed(engine, transport.one(run.id, "a"))
    assert claimed_nodes(result) == ["b"]
    b = transport.one(run.id, "b")
    assert b["code_version"] == "c0de"
    with engine.db.connection() as conn:
        row = conn.execute(
            """SELECT t.code_version AS task_code, a.code_version AS attempt_code FROM tasks t
               JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt WHERE t.id = %s""",
            (uuid.UUID(b["task_id"]),)).fetchone()
    assert row is not None and (row["task_code"], row["attempt_code"]) == ("c0de", "c0de")
    succeed(engine, b)
    assert succeed(engine, transport.one(run.id, "c")).run_status == "succeeded"


# --- plans: key lookups whatever the tables' statistics (0025) ----------------------------------


def _scans(url: str) -> dict[str, tuple[int, int]]:
    """(sequential scans, index scans) of tasks and task_attempts, as the statistics show them."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, seq_scan, COALESCE(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables"
            " WHERE relname IN ('tasks', 'task_attempts')"
        ).fetchall()
    return {row["relname"]: (int(row["seq_scan"]), int(row["idx_scan"])) for row in rows}


@contextmanager
def one_connection_stack(settings: Settings) -> Iterator[tuple[Engine, CapturingTransport]]:
    """An engine on a pool of one connection: the callback's generic plans are made once per
    connection, so the test knows when (and on what) they were made."""
    transport = CapturingTransport()
    engine = Engine(settings, Database(settings.database_url, max_size=1, check_idle_s=None),
                    transports={"local": transport})
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None  # type: ignore[method-assign]
    try:
        engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
        yield engine, transport
    finally:
        engine.close()


def flush_statistics(engine: Engine) -> None:
    """Send the one backend's statistics now (it sends them on its own only when idle)."""
    with engine.db.connection() as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")


def test_the_callback_reads_by_key_when_its_plans_were_made_on_small_tables(settings: Settings) -> None:
    # One connection (the callback's generic plans are made once per connection), planned right
    # after ANALYZE saw task_attempts holding one row and tasks a few hundred: without 0025 those
    # plans are sequential scans (the batch order's hash join over tasks, the attempt's end over
    # task_attempts) and stay so however the tables grow.
    with one_connection_stack(settings) as (engine, transport):
        engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": [f"s{i:02d}" for i in range(12)]})
        for _ in range(20):
            engine.trigger_run(WORKSPACE, "chain", dispatch_now=False)
        run = engine.trigger_run(WORKSPACE, "chain")
        with engine.db.connection() as conn:
            conn.execute("VACUUM ANALYZE tasks, task_attempts")
        message = transport.one(run.id, "s00")
        flush_statistics(engine)  # the setup's counts, sent before the callbacks'
        poll(lambda: sum(_scans(settings.database_url)["tasks"]) > 0, "the setup's statistics never arrived")
        before = _scans(settings.database_url)
        for step in range(1, 11):
            assert claimed_nodes(succeed(engine, message)) == [f"s{step:02d}"]
            message = transport.one(run.id, f"s{step:02d}")
        flush_statistics(engine)
        poll(lambda: sum(_scans(settings.database_url)["tasks"]) >= sum(before["tasks"]) + 10,
             "the callbacks' statistics never arrived")
        after = _scans(settings.database_url)
        assert after["tasks"][0] == before["tasks"][0], (before, after)
        assert after["task_attempts"][0] == before["task_attempts"][0], (before, after)
        assert after["tasks"][1] > before["tasks"][1]


def _partial_index_reads(url: str) -> dict[str, int]:
    """Index entries read from the partial indexes of tasks out (dispatched or running)."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes"
            " WHERE indexrelname IN ('tasks_active_idx', 'tasks_lease_idx')"
        ).fetchall()
    return {row["indexrelname"]: int(row["idx_tup_read"]) for row in rows}


def waiting_tasks(engine: Engine) -> None:
    """A table of some size (2,000 tasks waiting on their chains' first steps): the key's lookup
    is then costed above a scan of a one-page partial index."""
    engine.create_pipeline(WORKSPACE, {"id": "long", "steps": [f"l{i:03d}" for i in range(200)]})
    for _ in range(10):
        engine.trigger_run(WORKSPACE, "long", dispatch_now=False)


def put_out(engine: Engine, transport: CapturingTransport, run_id: Any, root: str, width: int) -> list[dict[str, Any]]:
    """Succeed the run's root and let the tick dispatch all `width` of its successors."""
    engine.tick()
    assert succeed(engine, transport.one(run_id, root)).accepted
    out = transport.take(run_id)
    for _ in range(20):  # the tick dispatches the rest
        if len(out) == width:
            break
        engine.tick()
        out += transport.take(run_id)
    assert sorted(m["node"] for m in out) == sorted(f"m{i}" for i in range(width))
    return out


def assert_no_partial_index_read(engine: Engine, settings: Settings, callbacks: Callable[[], None]) -> None:
    flush_statistics(engine)  # the setup's counts, sent before the callbacks'
    poll(lambda: sum(_scans(settings.database_url)["tasks"]) > 0, "the setup's statistics never arrived")
    before = _partial_index_reads(settings.database_url)
    before_scans = _scans(settings.database_url)["tasks"][1]
    callbacks()
    flush_statistics(engine)
    poll(lambda: _scans(settings.database_url)["tasks"][1] >= before_scans + 10,
         "the callbacks' statistics never arrived")
    assert _partial_index_reads(settings.database_url) == before


def test_the_finish_reads_by_key_when_its_plan_was_made_with_few_tasks_out(settings: Settings) -> None:
    # The finishing update's status condition is the predicate of two partial indexes (tasks out).
    # One connection makes its plan with one task out, as a fresh connection of a quiet
    # deployment does, and keeps it; 300 tasks are then out. Before 0029 that plan scanned the
    # whole partial index, every task out, for each callback (1,152 entries per callback on the
    # benchmark's wide DAG); now the update reads the task by its key, whatever the plan was
    # made on, and the partial indexes are not read at all.
    with one_connection_stack(settings) as (engine, transport):
        engine.create_pipeline(WORKSPACE, fan_in("wide", width=300))
        engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": ["s0", "s1"]})
        waiting_tasks(engine)
        wide = engine.trigger_run(WORKSPACE, "wide", dispatch_now=False)
        with engine.db.connection() as conn:
            conn.execute("VACUUM ANALYZE tasks, task_attempts")
        first = engine.trigger_run(WORKSPACE, "chain")
        # the plan is made here, one task out
        assert claimed_nodes(succeed(engine, transport.one(first.id, "s0"))) == ["s1"]
        mids = put_out(engine, transport, wide.id, "root", 300)

        def callbacks() -> None:
            for message in mids[:10]:
                assert succeed(engine, message).accepted

        assert_no_partial_index_read(engine, settings, callbacks)


def test_the_engines_finish_reads_by_key_when_its_plan_was_made_with_few_tasks_out(settings: Settings) -> None:
    # The same for tw_finish_attempt, the engine's path (here: final failures, which the
    # callback's statement hands to the engine). Its statement's plan is custom for its first
    # five calls on a connection, then generic and kept: six failures with one task out make it.
    with one_connection_stack(settings) as (engine, transport):
        once = {"task": "echo", "retry": {"max_attempts": 1}, "on_failure": "continue"}
        engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [{"id": "x", **once}]})
        engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": [
            {"id": "root", "task": "echo"},
            *({"id": f"m{i}", "depends": ["root"], **once} for i in range(300))]})
        waiting_tasks(engine)
        wide = engine.trigger_run(WORKSPACE, "wide", dispatch_now=False)
        with engine.db.connection() as conn:
            conn.execute("VACUUM ANALYZE tasks, task_attempts")
        for _ in range(7):  # one task out at a time: the plan is made here
            run = engine.trigger_run(WORKSPACE, "one")
            assert fail(engine, transport.one(run.id, "x"), retryable=False).outcome == "failed"
        mids = put_out(engine, transport, wide.id, "root", 300)

        def callbacks() -> None:
            for message in mids[:10]:
                assert fail(engine, message, retryable=False).outcome == "failed"

        assert_no_partial_index_read(engine, settings, callbacks)


def test_the_claimed_context_is_read_inside_the_statement_without_a_function_call(
    stack: tuple[Engine, CapturingTransport],
) -> None:
    # Migration 0030: the claimed successors' dispatch context is read by one query of
    # tw_complete_attempts, through tw_dispatch_context_of, a SQL function the planner inlines.
    # Given settings of its own, STRICT or a second statement, it would be called (and its
    # calls counted) instead: a function call and its settings' save and restore per callback.
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": ["a", "b"]})
    run = engine.trigger_run(WORKSPACE, "chain")
    a = transport.one(run.id, "a")
    claims = engine.keyring.read(a["token"])
    outcome = completion_store.Outcome(uuid.UUID(a["task_id"]), claims.attempt, uuid.UUID(claims.claim_token),
                                       succeeded=True, output={"key": "out/a/1"})
    with engine.db.connection() as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        done = completion_store.complete_attempts(conn, [outcome], claim_limit=5, single=False)
        calls = conn.execute(
            "SELECT f.name, COALESCE(pg_stat_get_xact_function_calls(f.name::regproc), 0) AS calls"
            " FROM unnest(ARRAY['tw_complete_one', 'tw_dispatch_context_of', 'tw_dispatch_context']) AS f(name)"
        ).fetchall()
    assert [c["node_id"] for c in done.claimed] == ["b"]
    b_id = done.claimed[0]["id"]
    assert done.context is not None and done.context.inputs[b_id]["a"]["key"] == "out/a/1"
    # tw_complete_one's call is counted (the counting works); the context's functions' are not
    assert {c["name"]: c["calls"] for c in calls} == {
        "tw_complete_one": 1, "tw_dispatch_context_of": 0, "tw_dispatch_context": 0}
