"""A capped map's items recorded by the callback's statement (migration 0028).

The success of an item of a map with max_concurrency is recorded like any task's: its map node is
counted down and held, and the scope-aware claim fills the room the item made under the cap, in
the same statement. These tests race the callbacks of the items out at once (each on its own
connection, behind a barrier) with the tick's claim and with a batch: the cap is never exceeded
(the books' map_concurrency_limit, checked after every round), no item is dispatched twice or
lost, the map node settles once and the run ends counting to 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.service import Engine
from tests.polling import poll

from .conftest import WORKSPACE
from .test_callback_statement import (
    CapturingTransport,
    books,
    flush_statistics,
    in_threads,
    one_connection_stack,
    run_row,
    succeed,
    success_input,
    traced_stack,
)
from .test_map_item_slots import map_node, mapped
from .test_scheduling import set_clock

Stack = tuple[Engine, CapturingTransport]
CAP = 4
WIDTH = 12


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


def active_items(engine: Engine, run_id: Any) -> int:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT count(*)::int AS n FROM tasks WHERE run_id = %s AND map_parent_id IS NOT NULL "
                           "AND status IN ('dispatched', 'running')", (run_id,)).fetchone()
    assert row is not None
    return int(row["n"])


def item_attempts(engine: Engine, run_id: Any) -> Counter[int]:
    """Attempts recorded per item index."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT c.map_index FROM task_attempts a JOIN tasks c ON c.id = a.task_id
               WHERE c.run_id = %s AND c.map_parent_id IS NOT NULL""", (run_id,)).fetchall()
    return Counter(int(r["map_index"]) for r in rows)


def succeed_batch(engine: Engine, messages: list[dict[str, Any]]) -> list[Any]:
    return engine.record_callbacks([success_input(m) for m in messages])


@pytest.mark.parametrize("how", ["single", "batch"])
def test_items_out_at_once_racing_the_tick_keep_the_cap(stack: Stack, how: str) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("capped", each={"max_concurrency": CAP}))
    claimed_by_callbacks = 0
    for _ in range(2):
        run = engine.trigger_run(WORKSPACE, "capped")
        done = 0
        for _ in range(WIDTH):
            out = transport.take(run.id, "each")
            if not out:
                engine.tick()
                out = transport.take(run.id, "each")
            if not out:
                break
            assert len(out) <= CAP
            if how == "single":
                calls = [*(partial(succeed, engine, m) for m in out), engine.tick]
            else:  # half the items in one batch, the others alone
                half = len(out) // 2
                calls = [partial(succeed_batch, engine, out[:half]),
                         *(partial(succeed, engine, m) for m in out[half:]), engine.tick]
            results = in_threads(calls)
            assert not any(isinstance(r, BaseException) for r in results), results
            claimed_by_callbacks += sum(len(r.claimed) for r in results if isinstance(r, AttemptResult))
            done += len(out)
            assert active_items(engine, run.id) <= CAP
            assert books(engine) == [], f"after {done} items"
            if done == WIDTH:
                break
        assert done == WIDTH
        # every item dispatched once, none lost; the map node settled once; the run ended once
        assert item_attempts(engine, run.id) == Counter({i: 1 for i in range(WIDTH)})
        node = map_node(engine, run.id)
        assert (node["status"], node["attempt"]) == ("succeeded", 1)
        assert run_row(engine, run.id)["status"] == "succeeded"
        assert run_row(engine, run.id)["unfinished_tasks"] == 0
    if how == "single":
        # the room was filled by the callbacks' statements too, not only by the tick
        assert claimed_by_callbacks > 0


@pytest.mark.parametrize("each", [{"max_concurrency": CAP}, {}], ids=["capped", "slotted"])
def test_items_racing_their_lease_expiry(stack: Stack, each: dict[str, Any]) -> None:
    """The tick that finds the items' leases lapsed (their attempts given back, the items ready
    again) and the items' callbacks, at once: each item's end lands once, the cap holds, a slot
    never counts an end twice, the map node settles once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, mapped("late", each={**each, "tolerated_failures": WIDTH}))
    base = datetime.now(UTC)
    for round_ in range(3):
        run = engine.trigger_run(WORKSPACE, "late")
        out = transport.take(run.id, "each")
        assert out
        set_clock(engine, base + timedelta(hours=round_ + 1))  # past the items' leases
        results = in_threads([*(partial(succeed, engine, m) for m in out), engine.tick])
        assert not any(isinstance(r, BaseException) for r in results), results
        assert books(engine) == []
        if "max_concurrency" in each:
            assert active_items(engine, run.id) <= CAP
        for _ in range(40):
            if run_row(engine, run.id)["status"] != "running":
                break
            messages = transport.take(run.id, "each")
            if not messages:
                engine.tick()
            for message in messages:
                succeed(engine, message)
            assert books(engine) == []
        node = map_node(engine, run.id)
        assert (node["status"], node["attempt"], node["unfinished_deps"]) == ("succeeded", 1, 0)
        assert run_row(engine, run.id)["status"] == "succeeded"
        assert run_row(engine, run.id)["unfinished_tasks"] == 0


def _tasks_index_reads(engine: Engine) -> dict[str, int]:
    """Index entries read from the indexes of tasks and task_edges, as the statistics show them."""
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes"
                            " WHERE relname IN ('tasks', 'task_edges')").fetchall()
    return {row["indexrelname"]: int(row["idx_tup_read"]) for row in rows}


def test_a_capped_items_callback_reads_rows_of_its_own_not_the_maps(settings: Settings) -> None:
    # Migration 0031. An item's callback claims the next item under the cap and reads its dispatch
    # context. With the statistics autovacuum takes after a map expanded (here: ANALYZE, every
    # item waiting), the plans of 0030 read across the map for each callback: the context's
    # upstreams driven from every task (2,000 entries of tasks_pkey per item of a map of 2,000)
    # and the map node's lock asking for a ready child through the index of all its children
    # (the finished ones first). Now each callback reads a bounded number of entries, whatever
    # the map's width: here fewer than a tenth of the map.
    width, cap = 400, 4
    with one_connection_stack(settings) as (engine, transport):
        engine.create_pipeline(WORKSPACE, {"id": "capped_wide", "params": {"xs": list(range(width))}, "nodes": [
            {"id": "each", "task": "echo", "map": {"over": "params.xs", "max_concurrency": cap}}]})
        run = engine.trigger_run(WORKSPACE, "capped_wide")
        out = transport.take(run.id, "each")
        assert len(out) == cap
        with engine.db.connection() as conn:
            conn.execute("ANALYZE tasks, task_edges, task_attempts")

        def callbacks(count: int) -> None:
            for _ in range(count):
                message = out.pop(0)
                result = succeed(engine, message)
                assert result.accepted and len(result.claimed) == 1, result
                out.extend(transport.take(run.id, "each"))

        callbacks(width // 4)  # a quarter of the map done: its finished children come first
        flush_statistics(engine)
        poll(lambda: sum(_tasks_index_reads(engine).values()) > 0, "the statistics never arrived")
        before = _tasks_index_reads(engine)
        callbacks(20)
        flush_statistics(engine)
        after = poll(lambda: (lambda a: a if sum(a.values()) > sum(before.values()) else None)(
            _tasks_index_reads(engine)), "the callbacks' statistics never arrived")
        per_callback = {name: (after[name] - before.get(name, 0)) / 20 for name in after}
        assert {name: n for name, n in per_callback.items() if n >= width / 10} == {}, per_callback
        assert active_items(engine, run.id) == cap
        assert books(engine) == []
