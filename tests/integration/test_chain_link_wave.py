"""A chain's link advanced by the small wave query (migration 0033) records what the general wave
query records, and keeps the books when callbacks race on it.

Each case plays a run to a callback whose task has exactly one successor, not counted through a
slot (the small query's case), then records that success twice on one connection, each in a
transaction rolled back: once with the current tw_complete_one, once with 0030's (the general
wave for every wave), installed under another name from the migration's own text. The answer and
every row of the run (tasks, attempts, the run) must be the same, claim tokens aside (random in
both). The success is then recorded for real and the next case goes on from there.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from importlib import resources
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from orchestrator.config import Settings
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.service import Engine
from orchestrator.store.runs import JOIN_SLOTS_FROM

from .conftest import WORKSPACE
from .test_callback_statement import (
    CapturingTransport,
    attempts,
    books,
    carried,
    claimed_nodes,
    fail,
    fan_in,
    in_threads,
    run_row,
    start_fan_in,
    statuses,
    succeed,
    traced_stack,
)

GENERAL = "tw_complete_one_0030"


def install_the_general_wave(database_url: str) -> None:
    """0030's tw_complete_one, as its migration wrote it, under the name GENERAL."""
    text = resources.files("orchestrator.db").joinpath("migrations", "0030_fewer_queries_per_callback.sql").read_text()
    start = text.index("CREATE OR REPLACE FUNCTION tw_complete_one(")
    end = text.index("\n$$;\n", start) + len("\n$$;\n")
    body = text[start:end].replace("FUNCTION tw_complete_one(", f"FUNCTION {GENERAL}(", 1)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(body)  # type: ignore[arg-type]  # the migration's own text


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Engine, CapturingTransport]]:
    install_the_general_wave(settings.database_url)
    with traced_stack(settings) as made:
        yield made


TOKEN = re.compile(r'"claim_token": "[0-9a-f-]{36}"')


def recorded_by(conn: psycopg.Connection[dict[str, Any]], function: str, run_id: uuid.UUID, task_id: str,
                attempt: int, claim_token: str, claim_limit: int, now: Any) -> tuple[Any, ...]:
    """What `function` answers for the task's success at `now`, and the run's rows after it;
    rolled back."""
    with conn.transaction(force_rollback=True):
        try:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT {function}(%s, %s, %s, true, true, %s::jsonb, NULL, %s, true, %s) AS r",
                    (task_id, attempt, claim_token, json.dumps({"key": f"out/{task_id}"}), claim_limit,
                     now)).fetchone()
                assert row is not None
                answer: Any = TOKEN.sub('"claim_token": "<new>"', json.dumps(row["r"], sort_keys=True))
        except psycopg.Error as exc:
            answer = exc.sqlstate  # TW001: for the engine
        tasks = conn.execute(
            """SELECT *, claim_token IS NOT NULL AS has_token FROM tasks WHERE run_id = %s ORDER BY node_id""",
            (run_id,)).fetchall()
        tries = conn.execute(
            """SELECT a.*, a.claim_token IS NOT NULL AS has_token FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE t.run_id = %s ORDER BY t.node_id, a.attempt""", (run_id,)).fetchall()
        run = conn.execute("SELECT * FROM runs WHERE id = %s", (run_id,)).fetchone()
    for row in (*tasks, *tries):
        row.pop("claim_token")
    return answer, tasks, tries, run


def both_ways(engine: Engine, message: dict[str, Any], *, claim_limit: int = 10) -> Any:
    """The success of `message` recorded by both queries (rolled back): the same; returns the answer."""
    claims = engine.keyring.read(message["token"])
    run_id = uuid.UUID(message["run_id"])
    with psycopg.connect(engine.settings.database_url, row_factory=dict_row) as conn:
        clock = conn.execute("SELECT tw_now() AS now").fetchone()
        assert clock is not None
        small, general = (recorded_by(conn, function, run_id, message["task_id"], int(message["attempt"]),
                                      claims.claim_token, claim_limit, clock["now"])
                          for function in ("tw_complete_one", GENERAL))
    assert small == general, message["node"]
    return small[0]


def test_every_single_successor_case_is_recorded_as_the_general_wave_records_it(
    stack: tuple[Engine, CapturingTransport],
) -> None:
    engine, transport = stack
    nodes: list[dict[str, Any]] = [
        {"id": "a", "task": "echo"},
        {"id": "b", "task": "echo", "depends": ["a"]},  # a chain: b claimed
        {"id": "c", "task": "echo", "depends": ["b"], "priority": 5},
        {"id": "gate", "kind": "approval", "depends": ["c"]},  # made waiting, not claimed
        {"id": "u", "task": "fail", "on_failure": "continue"},  # fails for good: its successors see it
        {"id": "f1", "task": "echo", "depends": ["u"], "trigger_rule": "none_failed"},  # skipped by u
        {"id": "x1", "task": "echo"},
        {"id": "done", "task": "echo", "depends": ["x1", "f1"], "trigger_rule": "all_done"},  # one skipped upstream
        {"id": "x2", "task": "echo"},
        {"id": "onef", "task": "echo", "depends": ["x2", "u"], "trigger_rule": "one_failed"},  # one failed upstream
        {"id": "x3", "task": "echo"},
        {"id": "nonef", "task": "echo", "depends": ["x3", "u"], "trigger_rule": "none_failed"},  # skipped already
        {"id": "x4", "task": "echo"},
        {"id": "x5", "task": "echo"},
        {"id": "pair", "task": "echo", "depends": ["x4", "x5"]},  # x4 first: stays pending, the count carried
        {"id": "x6", "task": "echo"},
        {"id": "hand", "kind": "manual", "depends": ["x6"]},
        {"id": "x7", "task": "echo"},
        {"id": "each", "task": "echo", "depends": ["x7"], "map": {"over": "params.xs"}},  # a map: the engine's
        {"id": "x8", "task": "echo"},
        {"id": "capped", "task": "echo", "depends": ["x8"], "map": {"over": "params.xs", "max_concurrency": 2}},
        {"id": "x9", "task": "echo"},
        {"id": "last", "task": "echo", "depends": ["x9"]},  # claimed with a budget of 0: made ready only
    ]
    engine.create_pipeline(WORKSPACE, {"id": "links", "nodes": nodes})
    run = engine.trigger_run(WORKSPACE, "links", params={"xs": [1, 2, 3]})
    first = {m["node"]: m for m in transport.take(run.id)}
    assert fail(engine, first["u"], retryable=False).accepted

    answers: dict[str, Any] = {}
    for node in ("a", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8"):
        answers[node] = both_ways(engine, first[node])
        assert succeed(engine, first[node]).accepted, node
        assert books(engine) == [], node
    answers["x9"] = both_ways(engine, first["x9"], claim_limit=0)
    for node in ("b", "c"):
        message = transport.one(run.id, node)
        answers[node] = both_ways(engine, message)
        assert succeed(engine, message).accepted, node

    def claimed(node: str) -> list[str]:
        answer = json.loads(answers[node])
        return sorted(c["node_id"] for c in answer.get("claimed", []))

    # the cases reached what they were written for (the same both ways, asserted above)
    assert claimed("a") == ["b"] and claimed("b") == ["c"] and claimed("c") == []
    assert claimed("x1") == ["done"] and claimed("x2") == ["onef"] and claimed("x3") == []
    assert claimed("x4") == [] and claimed("x5") == ["pair"]
    assert answers["x7"] == "TW001" and answers["x8"] == "TW001"  # map nodes: the engine's
    assert claimed("x9") == [] and json.loads(answers["x9"])["newly_ready"] == 1
    assert json.loads(answers["x4"])["finished"] == 0  # carried to `pair`, still pending
    assert books(engine) == []



def test_seven_links_into_one_join_at_once_claim_it_exactly_once(stack: tuple[Engine, CapturingTransport]) -> None:
    """A join of 7 (below JOIN_SLOTS_FROM: counted on its own row): each of its upstreams' callbacks
    takes the small query; seven at once, each on its own connection, released by a barrier."""
    engine, transport = stack
    assert JOIN_SLOTS_FROM > 7
    engine.create_pipeline(WORKSPACE, fan_in("seven", width=7))
    for _ in range(4):
        run_id, mids = start_fan_in(engine, transport, "seven", width=7)
        results = in_threads([partial(succeed, engine, m) for m in mids.values()])
        assert all(isinstance(r, AttemptResult) and r.accepted for r in results), results
        assert sorted(n for r in results for n in claimed_nodes(r)) == ["join"]
        assert sum(r.newly_ready for r in results) == 1
        assert attempts(engine, run_id)["join"] == [(1, "dispatched")] and transport.count(run_id, "join") == 1
        # the root and the seven carried to the join, whichever landed first: the run row untouched
        assert run_row(engine, run_id)["unfinished_tasks"] == 9 and carried(engine, run_id) == {"join": 8}
        assert books(engine) == []
        assert succeed(engine, transport.one(run_id, "join")).run_status == "succeeded"


def test_links_racing_a_cancel_of_their_run(stack: tuple[Engine, CapturingTransport]) -> None:
    """Seven links into a join and a cancel of the run, at once: each callback lands before the
    cancel (its end counted, the join pending or claimed) or is refused after it; either way
    the run ends cancelled with nothing left open and the books clean."""
    engine, transport = stack
    engine.create_pipeline(WORKSPACE, fan_in("doomed7", width=7))
    landed: Counter[str] = Counter()
    for _ in range(4):
        run_id, mids = start_fan_in(engine, transport, "doomed7", width=7)
        *results, cancel = in_threads([*(partial(succeed, engine, m) for m in mids.values()),
                                       partial(engine.cancel_run, WORKSPACE, run_id, actor="op")])
        assert not isinstance(cancel, BaseException), cancel
        assert all(isinstance(r, AttemptResult) for r in results), results
        for result in results:
            landed["accepted" if result.accepted else result.outcome] += 1
        tasks = statuses(engine, run_id)
        assert tasks["join"] == "cancelled"
        accepted = sum(1 for r in results if r.accepted)
        assert sum(1 for node, s in tasks.items() if node.startswith("m") and s == "succeeded") == accepted
        assert run_row(engine, run_id)["status"] == "cancelled" and run_row(engine, run_id)["unfinished_tasks"] == 0
        assert books(engine) == []
    assert sum(landed.values()) == 28
