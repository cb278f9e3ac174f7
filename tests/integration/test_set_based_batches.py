"""A batch of plain successes recorded set by set (migration 0032).

tw_complete_attempts hands a batch whose outcomes are all successes of plain tasks (no outputs,
no map, no limited scope, each task once) to tw_complete_successes: one finish, one count of the
join slots, one wave of successors, whatever the batch's size. Any other batch is recorded
outcome by outcome (tw_complete_one) as before. These tests show which path a batch took (the
functions' calls, counted by `track_functions` in the batch's own transaction), that the run's
counters and the joins come out exactly as the outcome-by-outcome path leaves them (the run
ends with its count at 0, the books clean), and that a batch's statements read rows of their
own, not the tables', with plans made while the tables were nearly empty.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.service import Engine
from orchestrator.store import completions as completion_store

from .conftest import WORKSPACE
from .test_callback_statement import CapturingTransport, books, run_row, success_input, traced_stack

Stack = tuple[Engine, CapturingTransport]
FUNCTIONS = ("tw_complete_successes", "tw_complete_one")


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with traced_stack(settings) as made:
        yield made


def outcome_of(engine: Engine, message: dict[str, Any]) -> completion_store.Outcome:
    claims = engine.keyring.read(message["token"])
    return completion_store.Outcome(uuid.UUID(message["task_id"]), claims.attempt, uuid.UUID(claims.claim_token),
                                    succeeded=True, output={"key": f"out/{message['node']}/{message['attempt']}"})


def outcome_of_claimed(row: dict[str, Any]) -> completion_store.Outcome:
    return completion_store.Outcome(row["id"], int(row["attempt"]), row["claim_token"], succeeded=True,
                                    output={"key": f"out/{row['node_id']}/{row['attempt']}"})


def record(engine: Engine, outcomes: list[completion_store.Outcome], *,
           claim_limit: int = 10) -> tuple[completion_store.Completion, dict[str, int]]:
    """One batch, as record_callbacks records a batch of successes, with its functions' calls."""
    query = ("SELECT f.name, COALESCE(pg_stat_get_xact_function_calls(f.name::regproc), 0) AS calls"
             " FROM unnest(%s::text[]) AS f(name)")
    with engine.db.connection() as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        # the backend's counts not yet flushed to the statistics, earlier transactions' included
        before = {r["name"]: int(r["calls"]) for r in conn.execute(query, (list(FUNCTIONS),)).fetchall()}
        done = completion_store.complete_attempts(conn, outcomes, claim_limit=claim_limit, single=False,
                                                  catch=False)
        after = {r["name"]: int(r["calls"]) for r in conn.execute(query, (list(FUNCTIONS),)).fetchall()}
    return done, {name: after[name] - before[name] for name in FUNCTIONS}


def test_a_batch_over_a_joins_slots_is_recorded_set_by_set_and_the_run_ends_at_zero(stack: Stack) -> None:
    engine, transport = stack
    width = 13  # a join counted through slots of 4: three slots complete in the batch, one stays open
    engine.create_pipeline(WORKSPACE, {"id": "fan", "nodes": [
        {"id": "root", "task": "echo"},
        *({"id": f"u{i:02d}", "task": "echo", "depends": ["root"]} for i in range(width)),
        {"id": "j", "task": "echo", "depends": [f"u{i:02d}" for i in range(width)]}]})
    run = engine.trigger_run(WORKSPACE, "fan")
    (root,) = transport.take(run.id, "root")
    assert engine.record_callbacks([success_input(root)])[0].accepted
    ups = sorted(transport.take(run.id), key=lambda m: m["node"])
    assert len(ups) == width

    first, calls = record(engine, [outcome_of(engine, m) for m in ups[:-1]])
    assert calls == {"tw_complete_successes": 1, "tw_complete_one": 0}
    assert [r.accepted for r in first.recorded] == [True] * (width - 1)
    assert [r.position for r in first.recorded] == list(range(width - 1))
    assert first.claimed == [] and books(engine) == []
    assert run_row(engine, run.id)["status"] == "running"

    last, calls = record(engine, [outcome_of(engine, ups[-1])])
    assert calls == {"tw_complete_successes": 1, "tw_complete_one": 0}
    assert [c["node_id"] for c in last.claimed] == ["j"]  # the join, claimed once
    assert last.recorded[0].newly_ready == 1
    assert books(engine) == []

    done, _ = record(engine, [outcome_of_claimed(last.claimed[0])])
    assert [r.accepted for r in done.recorded] == [True]
    # every carry landed once: the run's count reached 0 exactly when its last task ended
    assert done.ended_runs == [(run.id, "succeeded")]
    assert run_row(engine, run.id)["unfinished_tasks"] == 0
    assert books(engine) == []


def test_a_batch_over_several_runs_claims_each_successor_and_reads_its_context(stack: Stack) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "chain", "steps": ["a", "b", "c"]})
    runs = [engine.trigger_run(WORKSPACE, "chain") for _ in range(3)]
    firsts = [transport.one(r.id, "a") for r in runs]
    done, calls = record(engine, [outcome_of(engine, m) for m in firsts], claim_limit=2)
    assert calls == {"tw_complete_successes": 1, "tw_complete_one": 0}
    # two of the three successors claimed (the budget), the third left ready for a tick
    assert sorted(c["node_id"] for c in done.claimed) == ["b", "b"]
    assert done.context is not None
    for claimed in done.claimed:
        assert done.context.inputs[claimed["id"]]["a"]["key"].startswith("out/a/")
    assert sum(r.newly_ready for r in done.recorded) == 3
    assert books(engine) == []
    engine.tick()
    seconds = [m for r in runs for m in transport.take(r.id, "b")]
    assert len(seconds) == 1  # the one a tick claimed; the two above were never sent here
    rest = [outcome_of_claimed(c) for c in done.claimed] + [outcome_of(engine, seconds[0])]
    _, calls = record(engine, rest)
    assert calls["tw_complete_successes"] == 1
    assert books(engine) == []


def test_a_stale_callback_is_refused_alone_and_a_repeated_task_takes_the_outcome_by_outcome_path(
    stack: Stack,
) -> None:
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, {"id": "pair", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}, {"id": "c", "task": "echo"}]})
    run = engine.trigger_run(WORKSPACE, "pair")
    by_node = {m["node"]: m for m in transport.take(run.id)}
    a, b, c = (outcome_of(engine, by_node[n]) for n in "abc")
    stale = completion_store.Outcome(b.task_id, b.attempt + 1, b.claim_token, succeeded=True, output=b.output)

    done, calls = record(engine, [a, stale])
    assert calls == {"tw_complete_successes": 1, "tw_complete_one": 0}
    assert [(r.accepted, r.position) for r in done.recorded] == [(True, 0), (False, 1)]

    done, calls = record(engine, [b, c, b])
    assert calls["tw_complete_successes"] == 0 and calls["tw_complete_one"] == 3
    assert [r.accepted for r in done.recorded] == [True, True, False]  # the repeat refused by its fence
    assert run_row(engine, run.id)["status"] == "succeeded"
    assert books(engine) == []
    # through the API's path: the repeat of a recorded success is answered as a duplicate
    again = engine.record_callbacks([success_input(by_node["a"])])
    assert isinstance(again[0], AttemptResult) and again[0].outcome == "duplicate"


def _index_reads(engine: Engine) -> dict[str, int]:
    with engine.db.connection() as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        rows = conn.execute("SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes"
                            " WHERE relname IN ('tasks', 'task_edges', 'task_attempts', 'join_slots')").fetchall()
    return {row["indexrelname"]: int(row["idx_tup_read"]) for row in rows}


def test_a_batchs_statements_read_rows_of_its_own_with_plans_made_on_empty_tables(settings: Settings) -> None:
    # Plans of a PL/pgSQL function are made once per connection, on the statistics of that
    # moment: here taken while no task had an attempt. A join from the batch to its attempts,
    # slots or successors driven from the table's side then reads the whole table per batch (the
    # first version of 0032 did, for the attempts: its batches grew slower as a run went on).
    # Each join from a set to a table has an `= ANY` of the set's keys, an index condition
    # whatever the join order: a batch of 10 reads a bounded number of entries per index.
    width, batch = 300, 10
    with traced_stack(settings, max_size=1) as (engine, transport):
        engine.create_pipeline(WORKSPACE, {"id": "wide", "nodes": [
            {"id": "root", "task": "echo"},
            *({"id": f"u{i:03d}", "task": "echo", "depends": ["root"]} for i in range(width)),
            {"id": "j", "task": "echo", "depends": [f"u{i:03d}" for i in range(width)]}]})
        run = engine.trigger_run(WORKSPACE, "wide", dispatch_now=False)
        with engine.db.connection() as conn:
            conn.execute("ANALYZE tasks, task_edges, task_attempts, join_slots")
        engine.tick()
        (root,) = transport.take(run.id, "root")
        assert engine.record_callbacks([success_input(root)])[0].accepted
        while engine.tick().claimed:
            pass
        ups = transport.take(run.id)
        assert len(ups) == width
        before = _index_reads(engine)
        for start in range(0, 5 * batch, batch):
            answers = engine.record_callbacks([success_input(m) for m in ups[start:start + batch]])
            assert all(isinstance(a, AttemptResult) and a.accepted for a in answers)
        after = _index_reads(engine)
        per_outcome = {name: (after[name] - before.get(name, 0)) / (5 * batch) for name in after}
        assert per_outcome["task_attempts_pkey"] > 0  # the attempts were read (the counting works)
        assert {name: n for name, n in per_outcome.items() if n >= 12} == {}, per_outcome
        assert books(engine) == []


@pytest.mark.parametrize("repair", ["cancel", "lease_expiry"])
def test_plain_batches_racing_a_repair_finish_each_task_once_and_keep_the_books(
    stack: Stack, repair: str,
) -> None:
    # Two plain batches over one join's upstreams and a repair, released together from their own
    # threads (each on its own connection of the pool): the run cancelled, or every lease out
    # expired by a tick with the clock past them (the attempts given a retry). Whatever wins each
    # row, every callback is answered, no task succeeds twice, the join is sent at most once,
    # the books stay clean, and the run ends: cancelled, or succeeded once what the repair sent
    # again is called back.
    from .test_scheduling import set_clock

    engine, transport = stack
    width = 24
    engine.create_pipeline(WORKSPACE, {"id": "racy_fan", "nodes": [
        {"id": "root", "task": "echo"},
        *({"id": f"u{i:02d}", "task": "echo", "depends": ["root"]} for i in range(width)),
        {"id": "j", "task": "echo", "depends": [f"u{i:02d}" for i in range(width)]}]})
    for round_ in range(3):
        run = engine.trigger_run(WORKSPACE, "racy_fan")
        (root,) = transport.take(run.id, "root")
        assert engine.record_callbacks([success_input(root)])[0].accepted
        ups = transport.take(run.id)
        assert len(ups) == width
        halves = [[success_input(m) for m in ups[k::2]] for k in (0, 1)]
        clock = datetime.now(UTC) + timedelta(hours=8 * (round_ + 1))  # past every lease, and past
        # the last round's clock (below it moves on by half an hour per tick)
        answers = race_batches_and_repair(engine, run.id, halves, repair, clock)
        assert [len(a) for a in answers] == [len(h) for h in halves]
        assert books(engine) == []
        assert transport.count(run.id, "j") <= 1

        # What the repair sent again (a retry after an expired lease) and the join, called back
        # in batches until nothing is left out.
        later = clock
        for _ in range(10):
            more = transport.take(run.id)
            if not more and repair == "lease_expiry":  # a retry waits out its delay: a tick past it
                later += timedelta(minutes=30)
                set_clock(engine, later)
                engine.tick()
                more = transport.take(run.id)
            if not more:
                break
            assert all(isinstance(a, AttemptResult) for a in engine.record_callbacks([success_input(m) for m in more]))
        expected = "cancelled" if repair == "cancel" else "succeeded"
        assert run_row(engine, run.id)["status"] == expected
        with engine.db.connection() as conn:
            rows = conn.execute(
                "SELECT t.node_id, count(*) FILTER (WHERE a.status = 'succeeded') AS ok"
                " FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id WHERE t.run_id = %s"
                " GROUP BY t.node_id", (run.id,)).fetchall()
        assert all(int(r["ok"]) <= 1 for r in rows), rows
        if expected == "succeeded":
            assert {r["node_id"] for r in rows if int(r["ok"]) == 1} == {"root", "j", *(f"u{i:02d}" for i in range(width))}
        assert books(engine) == []


def race_batches_and_repair(engine: Engine, run_id: Any, halves: list[list[Any]], repair: str,
                            clock: datetime) -> list[list[Any]]:
    """Each half recorded as one batch by its own thread, and the repair by a third, all released
    together by a barrier; the answers of each batch."""
    from .test_scheduling import set_clock

    barrier = threading.Barrier(3)
    answers: list[list[Any]] = [[], []]
    errors: list[BaseException] = []

    def record_half(k: int) -> None:
        try:
            barrier.wait(timeout=30)
            answers[k] = engine.record_callbacks(halves[k])
        except BaseException as exc:
            errors.append(exc)

    def run_repair() -> None:
        try:
            if repair == "lease_expiry":  # the clock past every lease before the race starts
                set_clock(engine, clock)
            barrier.wait(timeout=30)
            if repair == "cancel":
                engine.cancel_run(WORKSPACE, run_id, actor="racer")
            else:
                engine.tick()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record_half, args=(k,)) for k in (0, 1)]
    threads.append(threading.Thread(target=run_repair))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    return answers


def test_a_batch_over_several_runs_reads_its_own_slots_not_every_slot_of_their_joins(settings: Settings) -> None:
    # A batch whose tasks count on the slots of several joins (the tick's claim spreads a batch
    # over runs) locked and counted each slot by its join only: every slot of each join it
    # reached, twice (the lock, the count). Each slot is now found by its whole key.
    runs, width = 5, 200  # a join of 200: 50 slots of 4
    with traced_stack(settings, max_size=1) as (engine, transport):
        engine.create_pipeline(WORKSPACE, {"id": "wide_joins", "nodes": [
            {"id": "root", "task": "echo"},
            *({"id": f"u{i:03d}", "task": "echo", "depends": ["root"]} for i in range(width)),
            {"id": "j", "task": "echo", "depends": [f"u{i:03d}" for i in range(width)]}]})
        ups: list[list[dict[str, Any]]] = []
        for _ in range(runs):
            run = engine.trigger_run(WORKSPACE, "wide_joins")
            (root,) = transport.take(run.id, "root")
            assert engine.record_callbacks([success_input(root)])[0].accepted
            while engine.tick().claimed:
                pass
            ups.append(transport.take(run.id))
            assert len(ups[-1]) == width
        before = _index_reads(engine)
        batches = 5
        for b in range(batches):  # each batch: two tasks of each run, in different slots
            answers = engine.record_callbacks([success_input(ups[r][8 * b + k]) for r in range(runs) for k in (0, 4)])
            assert all(isinstance(a, AttemptResult) and a.accepted for a in answers)
        after = _index_reads(engine)
        outcomes = batches * runs * 2
        per_outcome = (after["join_slots_pkey"] - before.get("join_slots_pkey", 0)) / outcomes
        assert 0 < per_outcome < 4, per_outcome  # one slot each, locked and counted: 2
        assert books(engine) == []
