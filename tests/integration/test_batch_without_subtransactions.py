"""A batch of successes recorded without a subtransaction per outcome (migration 0028).

A batch locks its tasks, their slots and those slots' joins before recording anything; with a
block (a subtransaction) around each outcome, every update of a row the batch had locked made a
MultiXact. A batch whose outcomes are all successes is now recorded without blocks; if one of
them is the engine's after all (here: the last item of a map, whose map node the engine settles),
the statement fails, the transaction rolls back whole and the batch is recorded again with
blocks. A batch with a failure takes the blocks at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.service import Engine
from orchestrator.engine.worker_protocol import CallbackInput
from orchestrator.store import completions as completion_store

from .conftest import WORKSPACE
from .test_callback_statement import CapturingTransport, books, run_row, success_input, traced_stack
from .test_map_item_slots import items, map_node, mapped

Stack = tuple[Engine, CapturingTransport]


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


@pytest.fixture
def catches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The `catch` of every batch recorded (complete_attempts with single=False), in order."""
    seen: list[bool] = []
    original = completion_store.complete_attempts

    def spy(conn: Any, outcomes: Any, **kwargs: Any) -> completion_store.Completion:
        if not kwargs["single"]:
            seen.append(kwargs.get("catch", True))
        return original(conn, outcomes, **kwargs)

    monkeypatch.setattr(completion_store, "complete_attempts", spy)
    return seen


def failure(message: dict[str, Any]) -> CallbackInput:
    return CallbackInput(uuid.UUID(message["task_id"]), message["token"], "failed", None,
                         {"message": "boom", "retryable": False})


def next_multixact(settings: Settings) -> int:
    """The server's next MultiXact id, as of a checkpoint taken now."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        row = conn.execute("SELECT next_multixact_id::text::bigint FROM pg_control_checkpoint()").fetchone()
    assert row is not None
    return int(row[0])


def test_a_batch_of_successes_is_recorded_without_multixacts(
    stack: Stack, settings: Settings, catches: list[bool]
) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "fan", "nodes": [
        {"id": "root", "task": "echo"},
        *({"id": f"u{i}", "task": "echo", "depends": ["root"]} for i in range(12)),
        {"id": "j", "task": "echo", "depends": [f"u{i}" for i in range(12)]}]})
    created = {}
    for mode in ("no_blocks", "blocks"):
        run = engine.trigger_run(WORKSPACE, "fan")
        (root,) = transport.take(run.id, "root")
        assert engine.record_callbacks([success_input(root)])[0].accepted
        ups = transport.take(run.id)
        assert len(ups) == 12
        before = next_multixact(settings)
        if mode == "blocks":  # what every batch did before migration 0028 (p_catch)
            answers = _record_with_blocks(engine, ups)
        else:
            answers = engine.record_callbacks([success_input(m) for m in ups])
        created[mode] = next_multixact(settings) - before
        assert all(isinstance(a, AttemptResult) and a.accepted for a in answers), answers
        assert [m["node"] for m in transport.take(run.id)] == ["j"]  # the join claimed, once
        assert books(engine) == []
    assert catches[-2:] == [False, True]
    # the batch's own locks updated in its own transaction: no MultiXact; with a block per
    # outcome, one at least per task, slot and join row it had locked
    assert created == {"no_blocks": 0, "blocks": created["blocks"]} and created["blocks"] >= 12


def _record_with_blocks(engine: Engine, messages: list[dict[str, Any]]) -> list[Any]:
    original = completion_store.complete_attempts

    def with_blocks(conn: Any, outcomes: Any, **kwargs: Any) -> completion_store.Completion:
        return original(conn, outcomes, **{**kwargs, "catch": True})

    completion_store.complete_attempts = with_blocks  # type: ignore[assignment]
    try:
        return engine.record_callbacks([success_input(m) for m in messages])
    finally:
        completion_store.complete_attempts = original  # type: ignore[assignment]


def test_a_batch_meeting_the_engine_is_recorded_again_with_blocks(stack: Stack, catches: list[bool]) -> None:
    """The map's last item in a batch of successes: the map node becomes ready, the engine's.
    The batch is recorded again with blocks: every outcome answered, the map node settled once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("m"))
    run = engine.trigger_run(WORKSPACE, "m")
    dispatched = items(transport, run.id)
    first = engine.record_callbacks([success_input(dispatched[i]) for i in range(6)])
    assert all(isinstance(a, AttemptResult) and a.accepted for a in first)
    assert catches == [False]  # no item of these was the engine's
    rest = engine.record_callbacks([success_input(dispatched[i]) for i in range(6, 12)])
    assert all(isinstance(a, AttemptResult) and a.accepted for a in rest), rest
    assert catches == [False, False, True]
    node = map_node(engine, run.id)
    assert (node["status"], node["attempt"], node["unfinished_deps"]) == ("succeeded", 1, 0)
    assert run_row(engine, run.id)["status"] == "succeeded"
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert books(engine) == []


def test_a_batch_with_a_failure_takes_the_blocks_at_once(stack: Stack, catches: list[bool]) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "pair", "nodes": [
        {"id": "a", "task": "echo", "on_failure": "continue"}, {"id": "b", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "pair")
    by_node = {m["node"]: m for m in transport.take(run.id)}
    answers = engine.record_callbacks([failure(by_node["a"]), success_input(by_node["b"])])
    assert catches == [True]
    assert [a.outcome for a in answers if isinstance(a, AttemptResult)] == ["failed", "succeeded"]
    assert run_row(engine, run.id)["status"] == "succeeded"  # a's failure tolerated
    assert books(engine) == []
