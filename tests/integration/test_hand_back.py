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

from .conftest import WORKSPACE


class Accepting:
    """A transport that takes every dispatch and runs nothing: the test plays the worker."""

    name = "local"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


def _task(engine: Engine, task_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    task, attempts = engine.get_task(WORKSPACE, uuid.UUID(task_id))
    return dict(task), [dict(a) for a in attempts]


def test_a_handed_back_task_runs_again_without_spending_an_attempt(engine: Engine) -> None:
    transport = Accepting()
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
