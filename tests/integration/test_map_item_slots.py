"""A map's items counted down through slots (store/maps.py insert_children, migration 0027's slots).

A map node of JOIN_SLOTS_FROM items or more without max_concurrency has its items dealt into
slots when it expands, item i in slot i mod the slot count; an item's callback counts on its
slot's row and only a slot's last item applies the slot to the map node. These tests show the
map node's row written once per slot, then take the items' slots through the other paths an item
ends by (the engine's: a failure tolerated by the map, a stopping failure elsewhere that skips
items not started, a redrive, a dead-letter retry, a workspace limit, a cancel) and through
races on separate connections (the items at once; a dead-letter retry racing them): the map
node settles once, the run ends once counting to 0, and the books (checked after each step and
after every test) stay clean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.engine import mapping
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import Conflict
from orchestrator.engine.keys import set_workspace_task_limit
from orchestrator.engine.service import Engine
from orchestrator.store.runs import JOIN_SLOTS_FROM

from .conftest import WORKSPACE
from .test_callback_statement import (
    CapturingTransport,
    books,
    drive_to_the_end,
    fail,
    in_threads,
    run_row,
    succeed,
    traced_stack,
)

Stack = tuple[Engine, CapturingTransport]
WIDTH = 12  # three slots of four


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


def mapped(pipeline_id: str, *, each: dict[str, Any] | None = None,
           extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """each: a map over params.xs, WIDTH items. (No reducer: its dispatch writes the manifest to an
    object store, which this stack has none of; test_map_nodes runs reducers of wide maps on moto.)"""
    return {"id": pipeline_id, "params": {"xs": list(range(WIDTH))}, "nodes": [
        {"id": "each", "task": "echo", "map": {"over": "params.xs", **(each or {})}}, *(extra or [])]}


def map_node(engine: Engine, run_id: Any) -> dict[str, Any]:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT id, status, attempt, unfinished_deps, xmin::text AS version FROM tasks "
                           "WHERE run_id = %s AND kind = 'map'", (run_id,)).fetchone()
    assert row is not None
    return dict(row)


def slots(engine: Engine, run_id: Any) -> list[tuple[int, int, int, int]]:
    """The map node's slots: (slot, remaining, arrived, carried)."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT s.slot, s.remaining, s.arrived, s.carried FROM join_slots s JOIN tasks t ON t.id = s.task_id
               WHERE t.run_id = %s AND t.kind = 'map' ORDER BY s.slot""", (run_id,)).fetchall()
    return [(int(r["slot"]), int(r["remaining"]), int(r["arrived"]), int(r["carried"])) for r in rows]


def item_slots(engine: Engine, run_id: Any) -> dict[int, int | None]:
    """Each item's slot, by its index."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT c.map_index, e.slot FROM tasks c JOIN task_edges e ON e.upstream_task_id = c.id
               WHERE c.run_id = %s AND c.map_parent_id IS NOT NULL""", (run_id,)).fetchall()
    return {int(r["map_index"]): None if r["slot"] is None else int(r["slot"]) for r in rows}


def items(transport: CapturingTransport, run_id: Any) -> dict[int, dict[str, Any]]:
    """The items dispatched since the last take, by index."""
    return {int(m["map"]["index"]): m for m in transport.take(run_id, "each")}


def test_a_maps_row_is_written_once_per_slot(stack: Stack) -> None:
    engine, transport = stack
    assert WIDTH >= JOIN_SLOTS_FROM
    engine.create_pipeline(WORKSPACE, mapped("m"))
    run = engine.trigger_run(WORKSPACE, "m")
    assert slots(engine, run.id) == [(0, 4, 0, 0), (1, 4, 0, 0), (2, 4, 0, 0)]
    assert item_slots(engine, run.id) == {i: i % 3 for i in range(WIDTH)}
    dispatched = items(transport, run.id)
    assert sorted(dispatched) == list(range(WIDTH))
    writes = 0
    version = map_node(engine, run.id)["version"]
    for i in range(WIDTH - 1):  # slot 0 completes with item 9, slot 1 with item 10
        assert succeed(engine, dispatched[i]).accepted
        now = map_node(engine, run.id)
        writes += now["version"] != version
        version = now["version"]
        assert now["status"] == "pending"
        assert books(engine) == [], f"after item {i}"
    assert writes == 2
    assert map_node(engine, run.id)["unfinished_deps"] == 4  # slot 2's items, three of them held by it
    # the last item completes slot 2 and the map node, which settles in the engine (the
    # statement handed it over whole: the engine counts that end on the map node's row)
    assert succeed(engine, dispatched[WIDTH - 1]).run_status == "succeeded"
    node = map_node(engine, run.id)
    assert (node["status"], node["attempt"], node["unfinished_deps"]) == ("succeeded", 1, 0)
    assert [(s[1], s[2]) for s in slots(engine, run.id)] == [(0, 4), (0, 4), (0, 3)]
    assert run_row(engine, run.id)["unfinished_tasks"] == 0


def test_a_capped_or_narrow_map_counts_its_items_on_its_row(stack: Stack) -> None:
    """A capped map's items are the engine's, which writes the map node at each end: no slots;
    nor for a map narrower than JOIN_SLOTS_FROM."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("capped", each={"max_concurrency": 3}))
    narrow = mapped("narrow")
    narrow["params"]["xs"] = list(range(JOIN_SLOTS_FROM - 1))
    engine.create_pipeline(WORKSPACE, narrow)
    for pipeline in ("capped", "narrow"):
        run = engine.trigger_run(WORKSPACE, pipeline)
        assert slots(engine, run.id) == []
        assert set(item_slots(engine, run.id).values()) == {None}
        assert drive_to_the_end(engine, transport, run.id, rounds=40) == "succeeded"
        assert run_row(engine, run.id)["unfinished_tasks"] == 0


def test_an_expansion_in_several_statements_adds_up_its_slots(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, transport = stack
    monkeypatch.setattr(mapping, "EXPANSION_BATCH", 5)  # 5 + 5 + 2 children
    engine.create_pipeline(WORKSPACE, mapped("batched"))
    run = engine.trigger_run(WORKSPACE, "batched")
    assert slots(engine, run.id) == [(0, 4, 0, 0), (1, 4, 0, 0), (2, 4, 0, 0)]
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"


def _tolerated_failure(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    # item 0 fails (the engine's path: on the map node's row and off its slot's remaining) between
    # the others' callbacks (the statement's: on their slots)
    dispatched = items(transport, run_id)
    for i in range(1, 6):
        assert succeed(engine, dispatched[i]).accepted
    assert fail(engine, dispatched[0], retryable=False).outcome == "failed"
    assert books(engine) == []
    for i in range(6, WIDTH):
        assert succeed(engine, dispatched[i]).accepted
        assert books(engine) == []
    assert map_node(engine, run_id)["status"] == "succeeded"  # one failure tolerated
    return drive_to_the_end(engine, transport, run_id)


def _stopping_failure(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    # With a workspace limit of 4, four items are out when `boom` (started first) fails and stops
    # the run: the items not started are skipped while slots hold the ends of those done; the
    # map node settles (skipped) when the ones out are back.
    dispatched = items(transport, run_id)
    boom = transport.one(run_id, "boom")
    assert len(dispatched) == 3
    first = sorted(dispatched)[0]
    assert succeed(engine, dispatched.pop(first)).accepted  # frees a place: the next item is claimed
    dispatched.update(items(transport, run_id))
    assert fail(engine, boom, retryable=False).run_status == "running"
    assert books(engine) == []
    for message in dispatched.values():
        assert succeed(engine, message).accepted
        assert books(engine) == []
    assert map_node(engine, run_id)["status"] == "skipped"
    return str(run_row(engine, run_id)["status"])


def _redrive(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    dispatched = items(transport, run_id)
    for i in range(1, WIDTH):
        assert succeed(engine, dispatched[i]).accepted
    assert fail(engine, dispatched[0], retryable=False).outcome == "failed"
    assert map_node(engine, run_id)["status"] == "failed"  # no failure tolerated: the run stops
    assert run_row(engine, run_id)["status"] == "failed"
    assert engine.redrive_run(WORKSPACE, run_id) >= 1
    assert books(engine) == []
    return drive_to_the_end(engine, transport, run_id)


def _dead_letter_retry(engine: Engine, transport: CapturingTransport, run_id: Any) -> str:
    dispatched = items(transport, run_id)
    for i in range(1, 6):
        assert succeed(engine, dispatched[i]).accepted
    assert fail(engine, dispatched[0], retryable=False).outcome == "failed"
    (entry,) = [e for e in engine.list_dead_letters(WORKSPACE) if str(e["run_id"]) == str(run_id)]
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert books(engine) == []
    for i in range(6, WIDTH):
        assert succeed(engine, dispatched[i]).accepted
        assert books(engine) == []
    assert map_node(engine, run_id)["status"] == "pending"  # waits for item 0's retry
    return drive_to_the_end(engine, transport, run_id)


PATHS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "tolerated_failure": (mapped("p", each={"tolerated_failures": 1}), _tolerated_failure, "succeeded"),
    "stopping_failure": (mapped("p", extra=[{"id": "boom", "task": "fail", "priority": 10}]),
                         _stopping_failure, "failed"),
    "redrive": (mapped("p"), _redrive, "succeeded"),
    "dead_letter_retry": (mapped("p", each={"tolerated_failures": 1}), _dead_letter_retry, "succeeded"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_an_item_ends_by_keeps_the_slots(stack: Stack, path: str) -> None:
    engine, transport = stack
    definition, play, want = PATHS[path]
    workspace = WORKSPACE
    if path == "stopping_failure":
        set_workspace_task_limit(engine.db, WORKSPACE, 4)
    try:
        engine.create_pipeline(workspace, definition)
        run = engine.trigger_run(workspace, "p")
        assert len(slots(engine, run.id)) == 3
        assert play(engine, transport, run.id) == want
    finally:
        set_workspace_task_limit(engine.db, WORKSPACE, None)
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert books(engine) == []
    node = map_node(engine, run.id)
    assert node["status"] == ("succeeded" if want == "succeeded" else "skipped")
    assert node["attempt"] == (2 if path == "redrive" else 1)  # settled once (and once more, redriven)


def test_every_item_of_a_map_at_once(stack: Stack) -> None:
    """Twelve item callbacks on their own connections, behind a barrier, one of them a failure
    the map tolerates (the engine's path): the map node settles once, the run ends once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("race", each={"tolerated_failures": 1}))
    for _ in range(4):
        run = engine.trigger_run(WORKSPACE, "race")
        dispatched = items(transport, run.id)
        calls = [partial(fail, engine, dispatched[0], retryable=False),
                 *(partial(succeed, engine, dispatched[i]) for i in range(1, WIDTH))]
        results = in_threads(calls)
        assert all(isinstance(r, AttemptResult) and r.accepted for r in results), results
        assert books(engine) == []
        node = map_node(engine, run.id)
        assert (node["status"], node["attempt"]) == ("succeeded", 1)  # settled once
        assert run_row(engine, run.id)["status"] == "succeeded"
        assert run_row(engine, run.id)["unfinished_tasks"] == 0


def test_a_dead_letter_retry_racing_the_items_that_fill_the_slots(stack: Stack) -> None:
    """Item 0's final failure (tolerated) is dead-lettered; its retry (which reopens the map node
    and recounts its slots) races the other eleven items' callbacks on their own connections."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("retry", each={"tolerated_failures": 1}))
    outcomes: Counter[str] = Counter()
    for _ in range(6):
        run = engine.trigger_run(WORKSPACE, "retry")
        dispatched = items(transport, run.id)
        assert fail(engine, dispatched.pop(0), retryable=False).outcome == "failed"
        (entry,) = [e for e in engine.list_dead_letters(WORKSPACE) if str(e["run_id"]) == str(run.id)]
        retry, *callbacks = in_threads([partial(engine.retry_dead_letter, WORKSPACE, entry["id"]),
                                        *(partial(succeed, engine, m) for m in dispatched.values())])
        assert all(isinstance(r, AttemptResult) and r.accepted for r in callbacks), callbacks
        # refused only when the map node had already settled (the retry came last)
        assert not isinstance(retry, BaseException) or isinstance(retry, Conflict), retry
        outcomes["refused" if isinstance(retry, Conflict) else "retried"] += 1
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"
        node = map_node(engine, run.id)
        assert node["status"] == "succeeded" and node["unfinished_deps"] == 0
        assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert sum(outcomes.values()) == 6


def test_a_cancel_while_slots_hold_ends_and_counts(stack: Stack) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("cancelled"))
    run = engine.trigger_run(WORKSPACE, "cancelled")
    dispatched = items(transport, run.id)
    for i in range(5):  # slots 0 and 1 hold two ends each, slot 2 one
        assert succeed(engine, dispatched[i]).accepted
    assert [(s[1], s[2]) for s in slots(engine, run.id)] == [(2, 2), (2, 2), (3, 1)]
    engine.cancel_run(WORKSPACE, run.id, actor="tester")
    assert books(engine) == []
    # the items still out call back: refused, nothing counted
    for i in range(5, WIDTH):
        assert not succeed(engine, dispatched[i]).accepted
    assert run_row(engine, run.id)["status"] == "cancelled"
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert map_node(engine, run.id)["status"] == "cancelled"
    assert books(engine) == []
