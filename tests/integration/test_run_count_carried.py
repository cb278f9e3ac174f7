"""The run's count carried along the DAG (migration 0026).

A task that ends in the callback statement hands its count (1, plus what was carried to it) to
a successor it updates anyway; only a task with nothing left to carry to writes the run row.
These tests show the run row left alone by a chain and by the branches of a wide run, and take a
task that carries a count through every other way a task ends (a final failure, a lapsed lease,
a human step's timeout, a cancel, a skip, a redrive, a dead-letter retry, one racing the callbacks
that carry): each time the run ends once, counting to 0, and the books (checked after every
step, and after every test by tests/db_fixtures.py) stay clean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import Conflict
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE
from .test_callback_statement import (
    CapturingTransport,
    books,
    carried,
    drive_to_the_end,
    fail,
    fan_in,
    in_threads,
    run_row,
    start_fan_in,
    statuses,
    succeed,
    task_rows,
    traced_stack,
)
from .test_scheduling import set_clock

Stack = tuple[Engine, CapturingTransport]


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


def run_version(engine: Engine, run_id: Any) -> str:
    """The run row's version (xmin): unchanged while nothing writes the row."""
    with engine.db.connection() as conn:
        row = conn.execute("SELECT xmin::text AS v FROM runs WHERE id = %s", (run_id,)).fetchone()
    assert row is not None
    return str(row["v"])


def ended_once(engine: Engine, run_id: Any, status: str) -> None:
    run = run_row(engine, run_id)
    assert (run["status"], run["unfinished_tasks"]) == (status, 0)
    assert books(engine) == []


def test_a_chain_writes_its_run_row_only_at_its_end(stack: Stack) -> None:
    engine, transport = stack
    nodes = ["a", "b", "c", "d", "e", "f"]
    engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": nodes})
    run = engine.trigger_run(WORKSPACE, "chain")
    version = run_version(engine, run.id)
    message = transport.one(run.id, "a")
    for done, node in enumerate(nodes[1:], start=1):
        result = succeed(engine, message)
        assert result.accepted and result.run_status == "running"
        assert carried(engine, run.id) == {node: done}
        assert run_version(engine, run.id) == version, f"the run row was written by the callback of {nodes[done - 1]}"
        assert run_row(engine, run.id)["unfinished_tasks"] == len(nodes)
        assert books(engine) == []
        message = transport.one(run.id, node)
    assert succeed(engine, message).run_status == "succeeded"
    ended_once(engine, run.id, "succeeded")


def test_the_branches_of_a_wide_run_carry_to_their_join(stack: Stack) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, fan_in("wide", width=12))
    run_id, mids = start_fan_in(engine, transport, "wide", width=12)
    version = run_version(engine, run_id)
    for message in mids.values():
        assert succeed(engine, message).accepted
    assert run_version(engine, run_id) == version  # twelve callbacks, the run row untouched
    assert carried(engine, run_id) == {"join": 13}  # the root's and the twelve branches'
    assert succeed(engine, transport.one(run_id, "join")).run_status == "succeeded"
    ended_once(engine, run_id, "succeeded")


# --- every other way a task that carries a count ends ----------------------------------------


def _final_failure(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    result = fail(engine, transport.one(run_id, "b"), retryable=False)
    assert result.outcome == "failed" and result.run_status == "running"  # x is still out
    assert statuses(engine, run_id)["c"] == "skipped"
    return "failed"


def _lapsed_lease(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    b = transport.one(run_id, "b")
    accepted, _, _ = engine.record_heartbeat(b["token"], progress=None, message=None)  # started, then silent
    assert accepted
    set_clock(engine, datetime.now(UTC) + timedelta(hours=1))
    engine.tick()
    assert statuses(engine, run_id)["b"] == "failed"
    return "failed"


def _approval_timeout(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    assert statuses(engine, run_id)["b"] == "waiting"
    set_clock(engine, datetime.now(UTC) + timedelta(hours=1))
    engine.tick()
    assert statuses(engine, run_id)["b"] == "failed"
    return "failed"


def _cancel(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    engine.cancel_run(WORKSPACE, run_id, actor="op")
    return "cancelled"


def _redrive(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    assert fail(engine, transport.one(run_id, "b"), retryable=False).outcome == "failed"
    assert succeed(engine, transport.one(run_id, "x")).run_status == "failed"
    assert engine.redrive_run(WORKSPACE, run_id) == 2  # b and the c it skipped
    assert carried(engine, run_id) == {}  # recounted: b's spent count is not brought back
    assert books(engine) == []
    return drive_to_the_end(engine, transport, run_id)


def _dead_letter_retry(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    assert fail(engine, transport.one(run_id, "b"), retryable=False).run_status == "running"  # tolerated
    assert statuses(engine, run_id)["c"] == "skipped"  # none_failed
    (entry,) = engine.list_dead_letters(WORKSPACE)
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert statuses(engine, run_id)["c"] == "pending"
    assert books(engine) == []
    return drive_to_the_end(engine, transport, run_id)


def _skipped_then_run(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    # a succeeded: b (one_failed) was skipped in the same statement, and both counts went to c
    assert statuses(engine, run_id)["b"] == "skipped" and carried(engine, run_id) == {"c": 2}
    return drive_to_the_end(engine, transport, run_id)


PATHS: dict[str, tuple[dict[str, Any], dict[str, Any], Callable[[Engine, CapturingTransport, Any], str]]] = {
    # case: (b's definition, c's, what ends b) -> the run's final status
    "final_failure": ({"task": "fail"}, {}, _final_failure),
    "lapsed_lease": ({"task": "echo", "heartbeat_s": 5}, {}, _lapsed_lease),
    "approval_timeout": ({"kind": "approval", "approval": {"timeout_s": 60, "on_timeout": "reject"}}, {},
                         _approval_timeout),
    "cancel": ({"task": "echo"}, {}, _cancel),
    "redrive": ({"task": "fail"}, {}, _redrive),
    "dead_letter_retry": ({"task": "fail", "on_failure": "continue"}, {"trigger_rule": "none_failed"},
                          _dead_letter_retry),
    "skip": ({"task": "echo", "trigger_rule": "one_failed"}, {"trigger_rule": "all_done"}, _skipped_then_run),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_way_a_carrying_task_ends_takes_its_count_along(stack: Stack, path: str) -> None:
    engine, transport = stack
    b, c, end = PATHS[path]
    engine.create_pipeline(WORKSPACE, {"id": "carry", "nodes": [
        {"id": "a", "task": "echo"},
        {"id": "b", "depends": ["a"], **b},
        {"id": "c", "task": "echo", "depends": ["b"], **c},
        {"id": "x", "task": "echo"},  # its own branch: the run's count is not only the chain's
    ]})
    run = engine.trigger_run(WORKSPACE, "carry")
    x = None if path == "redrive" else transport.one(run.id, "x")
    assert succeed(engine, transport.one(run.id, "a")).accepted
    if path != "skip":
        assert carried(engine, run.id) == {"b": 1}  # a's end went to b
    assert books(engine) == []
    status = end(engine, transport, run.id)
    assert books(engine) == []
    if run_row(engine, run.id)["status"] == "running":  # x still out
        assert x is not None
        x = [x, *transport.take(run.id, "x")][-1]  # sent again if its lease lapsed unstarted
        assert succeed(engine, x).accepted
        status = str(run_row(engine, run.id)["status"])
    want = {"final_failure": "failed", "lapsed_lease": "failed", "approval_timeout": "failed",
            "cancel": "cancelled"}.get(path, "succeeded")
    assert status == want
    ended_once(engine, run.id, want)


def test_a_dead_letter_retry_racing_the_callbacks_that_carry(stack: Stack) -> None:
    """The retry (every task of the run locked, the run recounted, what tasks carry set to 0) and
    the callbacks of the other branches (each carrying to the join) at once, on their own
    connections: whichever lands first, the run ends once, counting to 0."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "race", "nodes": [
        {"id": "root", "task": "echo"},
        {"id": "m0", "task": "fail", "depends": ["root"], "on_failure": "continue"},
        *({"id": f"m{i}", "task": "echo", "depends": ["root"]} for i in range(1, 6)),
        {"id": "join", "task": "echo", "depends": [f"m{i}" for i in range(6)], "trigger_rule": "all_done"},
    ]})
    outcomes: Counter[str] = Counter()
    for _ in range(8):
        run = engine.trigger_run(WORKSPACE, "race")
        assert succeed(engine, transport.one(run.id, "root")).accepted
        mids = {m["node"]: m for m in transport.take(run.id)}
        assert fail(engine, mids.pop("m0"), retryable=False).outcome == "failed"
        (entry,) = [e for e in engine.list_dead_letters(WORKSPACE) if str(e["run_id"]) == str(run.id)]
        results = in_threads([partial(engine.retry_dead_letter, WORKSPACE, entry["id"]),
                              *(partial(succeed, engine, m) for m in mids.values())])
        retry, *callbacks = results
        assert all(isinstance(r, AttemptResult) and r.accepted for r in callbacks), callbacks
        assert not isinstance(retry, BaseException) or isinstance(retry, Conflict), retry
        outcomes["refused" if isinstance(retry, Conflict) else "retried"] += 1
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"
        ended_once(engine, run.id, "succeeded")
        assert task_rows(engine, run.id)["join"]["status"] == "succeeded"
    assert sum(outcomes.values()) == 8
