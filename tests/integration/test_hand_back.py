"""Handing back an attempt (`make dev` stopping with a local task still running): the task is
ready again at once, without spending an attempt, and only the current, unfinished attempt can
be handed back."""

from __future__ import annotations

import uuid
from typing import Any

from orchestrator.db.connection import Connection
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.hand_back import hand_back
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store
from tests import capturing

from .conftest import WORKSPACE


def _task(engine: Engine, task_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    task, attempts = engine.get_task(WORKSPACE, uuid.UUID(task_id))
    return dict(task), [dict(a) for a in attempts]


def test_a_handed_back_task_runs_again_without_spending_an_attempt(engine: Engine) -> None:
    transport = capturing.CapturingTransport()
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None
    engine.create_pipeline(WORKSPACE, {"id": "one", "nodes": [
        {"id": "x", "task": "echo", "retry": {"max_attempts": 1}}]})
    run = engine.trigger_run(WORKSPACE, "one")  # dispatched at once to the transport
    (message,) = transport.sent
    task_id = message["task_id"]

    assert hand_back(engine.db, [(task_id, 1)], reason="stopping") == [task_id]
    assert hand_back(engine.db, [(task_id, 1)], reason="stopping") == []  # already given back
    task, attempts = _task(engine, task_id)
    assert task["status"] == "ready" and task["max_attempts"] == 2
    assert [(a["attempt"], a["status"], a["error"]["code"]) for a in attempts] == [(1, "cancelled", "handed_back")]

    with engine.db.transaction() as conn:
        (claimed,) = task_store.claim_ready_tasks(conn, 10)
    assert claimed["attempt"] == 2
    # The old attempt is stale now: handing it back again changes nothing.
    assert hand_back(engine.db, [(task_id, 1)], reason="stopping") == []

    def succeed(conn: Connection) -> Any:
        return finish_attempt(conn, claimed["id"], 2, claimed["claim_token"], succeeded=True,
                              output={"key": "k/x"}, error=None, retryable=True)

    assert engine.db.run_in_transaction(succeed).run_status == "succeeded"
    # A finished attempt is not handed back either.
    assert hand_back(engine.db, [(task_id, 2)], reason="stopping") == []
    assert engine.get_run(WORKSPACE, run.id)[0]["status"] == "succeeded"


def test_a_hand_back_racing_the_attempts_callback_lets_exactly_one_win(engine: Engine) -> None:
    """`make dev` stopping at the moment the local task calls back: two connections behind a
    barrier. Either the callback lands (the task succeeded, nothing handed back) or the hand
    back does (the task is ready again, the callback refused as stale) — never both, never a
    spent attempt, and the books stay right (the checker runs after the test)."""
    transport = capturing.CapturingTransport()
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None
    engine.create_pipeline(WORKSPACE, {"id": "racy", "nodes": [
        {"id": "x", "task": "echo", "retry": {"max_attempts": 1}}]})
    winners: set[str] = set()
    for _ in range(12):
        transport.sent.clear()
        run = engine.trigger_run(WORKSPACE, "racy")
        (message,) = transport.sent
        task_id = uuid.UUID(message["task_id"])
        with engine.db.connection() as conn:
            token = conn.execute("SELECT claim_token FROM tasks WHERE id = %s", (task_id,)).fetchone()["claim_token"]
        results = _race_callback_and_hand_back(engine, task_id, token)
        assert set(results) == {"callback", "hand_back"}, results
        task, attempts = _task(engine, str(task_id))
        if results["hand_back"]:
            winners.add("hand_back")
            assert not results["callback"].accepted
            assert task["status"] == "ready" and task["attempt"] == 1 and task["max_attempts"] == 2
            assert [(a["status"], a["error"]["code"]) for a in attempts] == [("cancelled", "handed_back")]
            engine.cancel_run(WORKSPACE, run.id, actor="test")  # leave nothing ready for the next round's claim
        else:
            winners.add("callback")
            assert results["callback"].accepted and task["status"] == "succeeded"
            assert [a["status"] for a in attempts] == ["succeeded"]
    assert winners  # which wins is the race's; each round had exactly one


def _race_callback_and_hand_back(engine: Engine, task_id: uuid.UUID, token: uuid.UUID) -> dict[str, Any]:
    import threading

    barrier = threading.Barrier(2, timeout=20)
    results: dict[str, Any] = {}

    def succeed(conn: Connection) -> Any:
        return finish_attempt(conn, task_id, 1, token, succeeded=True, output={"key": "k/x"}, error=None,
                              retryable=True)

    def call_back() -> None:
        barrier.wait()
        results["callback"] = engine.db.run_in_transaction(succeed)

    def give_back() -> None:
        barrier.wait()
        results["hand_back"] = hand_back(engine.db, [(str(task_id), 1)], reason="stopping")

    threads = [threading.Thread(target=call_back), threading.Thread(target=give_back)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results
