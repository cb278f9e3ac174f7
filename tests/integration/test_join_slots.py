"""A wide join counted down through slots (migration 0027).

A join with JOIN_SLOTS_FROM upstreams or more has them dealt into slots; the callback statement
counts an upstream's end on its slot's row, and the slot's last end applies the slot to the join.
These tests show the join's row written once per slot, not once per upstream, then take slots
through every other path an upstream ends by (the engine's: a tolerated failure, a stopping
failure that skips the join while slots still hold ends and counts, a skip wave, a redrive, a
dead-letter retry) and through races on separate connections: the join fires once, the run
ends once counting to 0, and the books (checked after each step and after every test) stay clean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import Conflict
from orchestrator.engine.service import Engine
from orchestrator.store.runs import JOIN_SLOTS_FROM

from .conftest import WORKSPACE
from .test_callback_statement import (
    CapturingTransport,
    attempts,
    books,
    drive_to_the_end,
    fail,
    in_threads,
    run_row,
    statuses,
    succeed,
    task_rows,
    traced_stack,
)

Stack = tuple[Engine, CapturingTransport]
WIDTH = 12  # three slots of four


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


def wide(pipeline_id: str, *, upstream: dict[str, Any] | None = None, join: dict[str, Any] | None = None,
         extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """u0..u11 -> j, each u{i} with `upstream` merged in (u0 with its own, if given)."""
    ups = [{"id": f"u{i}", "task": "echo", **((upstream or {}) if i == 0 else {})} for i in range(WIDTH)]
    return {"id": pipeline_id, "nodes": [*ups, {"id": "j", "task": "echo", "depends": [u["id"] for u in ups],
                                                **(join or {})}, *(extra or [])]}


def slots(engine: Engine, run_id: Any) -> list[tuple[int, int, int, int]]:
    """The join's slots: (slot, remaining, arrived, carried)."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT s.slot, s.remaining, s.arrived, s.carried FROM join_slots s JOIN tasks t ON t.id = s.task_id
               WHERE t.run_id = %s AND t.node_id = 'j' ORDER BY s.slot""", (run_id,)).fetchall()
    return [(int(r["slot"]), int(r["remaining"]), int(r["arrived"]), int(r["carried"])) for r in rows]


def row_version(engine: Engine, run_id: Any, node: str) -> str:
    with engine.db.connection() as conn:
        row = conn.execute("SELECT xmin::text AS v FROM tasks WHERE run_id = %s AND node_id = %s",
                           (run_id, node)).fetchone()
    assert row is not None
    return str(row["v"])


def test_a_wide_joins_row_is_written_once_per_slot(stack: Stack) -> None:
    engine, transport = stack
    assert WIDTH >= JOIN_SLOTS_FROM
    engine.create_pipeline(WORKSPACE, wide("w"))
    run = engine.trigger_run(WORKSPACE, "w")
    assert slots(engine, run.id) == [(0, 4, 0, 0), (1, 4, 0, 0), (2, 4, 0, 0)]
    messages = {m["node"]: m for m in transport.take(run.id)}
    writes = 0
    version = row_version(engine, run.id, "j")
    for i in range(WIDTH):  # u0, u3, u6, u9 are slot 0 (in id order, not name order): any order will do
        assert succeed(engine, messages[f"u{i}"]).accepted
        now = row_version(engine, run.id, "j")
        writes += now != version
        version = now
        assert books(engine) == [], f"after u{i}"
    assert writes == 3  # one per slot, the last applying the join's 12 ends and the run's 12
    assert [(s[1], s[2]) for s in slots(engine, run.id)] == [(0, 4)] * 3  # every slot complete, four ends each
    assert statuses(engine, run.id)["j"] == "dispatched"
    assert task_rows(engine, run.id)["j"]["carried_tasks"] == WIDTH
    assert run_row(engine, run.id)["unfinished_tasks"] == WIDTH + 1
    assert succeed(engine, transport.one(run.id, "j")).run_status == "succeeded"
    assert run_row(engine, run.id)["unfinished_tasks"] == 0


def _tolerated_failure(engine: Engine, transport: CapturingTransport, run_id: Any, ups: dict[str, Any]) -> str:
    # u0 fails (the engine's path: its end goes on the join's row and off its slot's remaining)
    # between the others' callbacks (the statement's: on their slots)
    for i in range(1, 6):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert fail(engine, ups["u0"], retryable=False).outcome == "failed"
    assert books(engine) == []
    for i in range(6, WIDTH):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert statuses(engine, run_id)["j"] == "dispatched"  # all_done
    return drive_to_the_end(engine, transport, run_id)


def _stopping_failure(engine: Engine, transport: CapturingTransport, run_id: Any, ups: dict[str, Any]) -> str:
    # half the ends are held by slots (with the run counts carried to them) when u0's stopping
    # failure skips the join; the rest end after it: the slots complete for a skipped join and
    # give what they carry to the run
    for i in range(1, 6):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert fail(engine, ups["u0"], retryable=False).run_status == "running"
    assert statuses(engine, run_id)["j"] == "skipped"
    assert books(engine) == []
    for i in range(6, WIDTH):
        assert succeed(engine, ups[f"u{i}"]).accepted
        assert books(engine) == []
    return str(run_row(engine, run_id)["status"])


def _skip_wave(engine: Engine, transport: CapturingTransport, run_id: Any, ups: dict[str, Any]) -> str:
    # a's success skips u0 (one_failed) in the statement's second wave, which reaches the join's
    # slots: the engine records that end instead
    assert succeed(engine, ups["a"]).accepted
    assert statuses(engine, run_id)["u0"] == "skipped"
    for i in range(1, WIDTH):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert statuses(engine, run_id)["j"] == "dispatched"  # none_failed: a skip is not a failure
    return drive_to_the_end(engine, transport, run_id)


def _redrive(engine: Engine, transport: CapturingTransport, run_id: Any, ups: dict[str, Any]) -> str:
    for i in range(1, WIDTH):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert fail(engine, ups["u0"], retryable=False).run_status == "failed"
    assert engine.redrive_run(WORKSPACE, run_id) == 2  # u0 and the join
    assert books(engine) == []
    return drive_to_the_end(engine, transport, run_id)


def _dead_letter_retry(engine: Engine, transport: CapturingTransport, run_id: Any, ups: dict[str, Any]) -> str:
    for i in range(1, 6):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert fail(engine, ups["u0"], retryable=False).outcome == "failed"  # tolerated
    (entry,) = engine.list_dead_letters(WORKSPACE)
    engine.retry_dead_letter(WORKSPACE, entry["id"])
    assert books(engine) == []
    for i in range(6, WIDTH):
        assert succeed(engine, ups[f"u{i}"]).accepted
    assert statuses(engine, run_id)["j"] == "pending"  # waits for u0's retry
    return drive_to_the_end(engine, transport, run_id)


PATHS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "tolerated_failure": (wide("p", upstream={"task": "fail", "on_failure": "continue"},
                               join={"trigger_rule": "all_done"}), _tolerated_failure, "succeeded"),
    "stopping_failure": (wide("p", upstream={"task": "fail"}), _stopping_failure, "failed"),
    "skip_wave": (wide("p", upstream={"depends": ["a"], "trigger_rule": "one_failed"},
                       join={"trigger_rule": "none_failed"}, extra=[{"id": "a", "task": "echo"}]),
                  _skip_wave, "succeeded"),
    "redrive": (wide("p", upstream={"task": "fail"}), _redrive, "succeeded"),
    "dead_letter_retry": (wide("p", upstream={"task": "fail", "on_failure": "continue"},
                               join={"trigger_rule": "none_failed"}), _dead_letter_retry, "succeeded"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_an_upstream_ends_by_keeps_the_slots(stack: Stack, path: str) -> None:
    engine, transport = stack
    definition, play, want = PATHS[path]
    engine.create_pipeline(WORKSPACE, definition)
    run = engine.trigger_run(WORKSPACE, "p")
    ups = {m["node"]: m for m in transport.take(run.id)}  # every dispatch, by node
    assert len(slots(engine, run.id)) == 3
    assert play(engine, transport, run.id, ups) == want
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert books(engine) == []
    if want == "succeeded":
        assert [s for _, s in attempts(engine, run.id)["j"]] == ["succeeded"]


def test_every_upstream_of_a_wide_join_at_once(stack: Stack) -> None:
    """Twelve callbacks on their own connections, behind a barrier, and the engine's failure of
    a thirteenth upstream among them: the join is claimed once, the run ends once."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, wide("race", upstream={"task": "fail", "on_failure": "continue"},
                                           join={"trigger_rule": "all_done"}))
    for _ in range(4):
        run = engine.trigger_run(WORKSPACE, "race")
        ups = {m["node"]: m for m in transport.take(run.id)}
        calls = [partial(fail, engine, ups["u0"], retryable=False),
                 *(partial(succeed, engine, ups[f"u{i}"]) for i in range(1, WIDTH))]
        results = in_threads(calls)
        assert all(isinstance(r, AttemptResult) and r.accepted for r in results), results
        claimed = Counter(str(c["node_id"]) for r in results for c in r.claimed)
        assert claimed == Counter({"j": 1}) or (claimed == Counter() and transport.count(run.id, "j") == 1)
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"
        assert attempts(engine, run.id)["j"] == [(1, "succeeded")]
        assert run_row(engine, run.id)["unfinished_tasks"] == 0


def test_a_dead_letter_retry_racing_the_callbacks_that_fill_the_slots(stack: Stack) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, wide("retry", upstream={"task": "fail", "on_failure": "continue"},
                                           join={"trigger_rule": "all_done"}))
    outcomes: Counter[str] = Counter()
    for _ in range(6):
        run = engine.trigger_run(WORKSPACE, "retry")
        ups = {m["node"]: m for m in transport.take(run.id)}
        assert fail(engine, ups.pop("u0"), retryable=False).outcome == "failed"
        (entry,) = [e for e in engine.list_dead_letters(WORKSPACE) if str(e["run_id"]) == str(run.id)]
        retry, *callbacks = in_threads([partial(engine.retry_dead_letter, WORKSPACE, entry["id"]),
                                        *(partial(succeed, engine, m) for m in ups.values())])
        assert all(isinstance(r, AttemptResult) and r.accepted for r in callbacks), callbacks
        assert not isinstance(retry, BaseException) or isinstance(retry, Conflict), retry
        outcomes["refused" if isinstance(retry, Conflict) else "retried"] += 1
        assert books(engine) == []
        assert drive_to_the_end(engine, transport, run.id) == "succeeded"
        assert [s for _, s in attempts(engine, run.id)["j"]] == ["succeeded"]
        assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert sum(outcomes.values()) == 6


def test_a_map_node_with_many_upstreams_counts_them_on_its_row(stack: Stack) -> None:
    """A map node counts its upstreams on its own row, so it gets no slots for them, and a join in
    the same run does. (Its items get slots when it expands, if there are enough of them:
    test_map_item_slots; here three.)"""
    engine, transport = stack
    ups = [f"u{i}" for i in range(WIDTH)]
    engine.create_pipeline(WORKSPACE, {"id": "m", "params": {"xs": [1, 2, 3]}, "nodes": [
        *({"id": u, "task": "echo"} for u in ups),
        {"id": "each", "task": "echo", "depends": ups, "map": {"over": "params.xs"}},
        {"id": "j", "task": "echo", "depends": ups}]})
    run = engine.trigger_run(WORKSPACE, "m")
    with engine.db.connection() as conn:
        counted = conn.execute(
            """SELECT t.node_id, count(s.slot) AS slots FROM tasks t LEFT JOIN join_slots s ON s.task_id = t.id
               WHERE t.run_id = %s AND t.node_id IN ('each', 'j') GROUP BY t.node_id ORDER BY t.node_id""",
            (run.id,)).fetchall()
    assert [(r["node_id"], r["slots"]) for r in counted] == [("each", 0), ("j", 3)]
    assert drive_to_the_end(engine, transport, run.id) == "succeeded"
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
