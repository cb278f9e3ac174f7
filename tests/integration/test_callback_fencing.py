"""Callbacks over HTTP with real worker tokens: only the current attempt's token moves a task."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Row
from orchestrator.engine.service import Engine
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, params_digest
from orchestrator.store import tasks as task_store

from .conftest import WORKSPACE


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def claim_one(engine: Engine) -> Row:
    with engine.db.transaction() as conn:
        (task,) = task_store.claim_ready_tasks(conn, 10)
    return task


def token_for(engine: Engine, task: Row, *, ttl: int = 600, keyring: TokenKeyring | None = None,
              task_id: str | None = None) -> str:
    return (keyring or engine.keyring).issue(TaskClaims(
        task_id=task_id or str(task["id"]), attempt=int(task["attempt"]), claim_token=str(task["claim_token"]),
        workspace=WORKSPACE, task_name=str(task["task_name"]), params_sha256=params_digest(task["params"]),
        expires_at=int(time.time()) + ttl, storage=None))


def succeed(client: TestClient, task: Row, token: str) -> Any:
    return client.post(f"/api/callback/{task['id']}", json={
        "token": token, "status": "succeeded", "output": {"key": f"runs/x/{task['node_id']}", "size": 2}})


def task_state(engine: Engine, task_id: uuid.UUID) -> tuple[str, int]:
    task, _ = engine.get_task(WORKSPACE, task_id)
    return task["status"], task["attempt"]


@pytest.fixture
def retried(engine: Engine, client: TestClient) -> tuple[Row, Row]:
    """A task whose first attempt failed (retry scheduled at once) and whose second is running."""
    engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [
        {"id": "x", "task": "fail", "retry": {"max_attempts": 3, "base_delay_s": 0}}]})
    engine.trigger_run(WORKSPACE, "p", dispatch_now=False)
    first = claim_one(engine)
    failed = client.post(f"/api/callback/{first['id']}", json={
        "token": token_for(engine, first), "status": "failed", "error": {"message": "boom"}})
    assert failed.status_code == 200 and failed.json()["outcome"] == "retrying"
    return first, claim_one(engine)


def test_a_previous_attempts_token_is_refused_and_changes_nothing(engine: Engine, client: TestClient,
                                                                  retried: tuple[Row, Row]) -> None:
    first, second = retried
    response = succeed(client, first, token_for(engine, first))
    assert response.status_code == 409
    assert response.json()["accepted"] is False and response.json()["outcome"] == "stale_attempt"
    assert task_state(engine, second["id"]) == ("dispatched", 2)


def test_duplicate_callback_is_ignored_and_says_so(engine: Engine, client: TestClient,
                                                   retried: tuple[Row, Row]) -> None:
    _, second = retried
    token = token_for(engine, second)
    assert succeed(client, second, token).json()["outcome"] == "succeeded"
    duplicate = succeed(client, second, token)
    assert duplicate.status_code == 200
    assert duplicate.json() == {"accepted": False, "outcome": "duplicate", "task_status": "succeeded",
                                "run_status": None}
    assert task_state(engine, second["id"]) == ("succeeded", 2)


def test_callback_for_a_finished_task_is_refused(engine: Engine, client: TestClient,
                                                 retried: tuple[Row, Row]) -> None:
    _, second = retried
    token = token_for(engine, second)
    assert succeed(client, second, token).status_code == 200
    late_failure = client.post(f"/api/callback/{second['id']}", json={
        "token": token, "status": "failed", "error": {"message": "late"}})
    assert late_failure.status_code == 409 and late_failure.json()["outcome"] == "already_finished"
    assert task_state(engine, second["id"]) == ("succeeded", 2)


def test_tokens_of_other_tasks_expired_or_forged_are_401(engine: Engine, client: TestClient,
                                                        retried: tuple[Row, Row]) -> None:
    _, second = retried
    other_task = token_for(engine, second, task_id=str(uuid.uuid4()))
    response = succeed(client, second, other_task)
    assert response.status_code == 401 and "another task" in response.json()["error"]["message"]

    expired = token_for(engine, second, ttl=-5)
    response = succeed(client, second, expired)
    assert response.status_code == 401 and response.json()["error"]["details"]["reason"] == "expired"

    foreign = TokenKeyring([("other", "A" * 43)], engine.settings.token_issuer, engine.settings.token_audience)
    response = succeed(client, second, token_for(engine, second, keyring=foreign))
    assert response.status_code == 401 and response.json()["error"]["details"]["reason"] == "unknown_key"

    token = token_for(engine, second)
    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    assert succeed(client, second, tampered).status_code == 401
    assert task_state(engine, second["id"]) == ("dispatched", 2)


def test_heartbeat_marks_running_and_refuses_stale_attempts(engine: Engine, client: TestClient,
                                                           retried: tuple[Row, Row]) -> None:
    first, second = retried
    beat = client.post("/api/heartbeat", json={"token": token_for(engine, second), "progress": 0.5, "message": "half"})
    assert beat.status_code == 200 and beat.json()["task_status"] == "running"
    task, attempts = engine.get_task(WORKSPACE, second["id"])
    assert (task["status"], task["progress"], task["message"]) == ("running", 0.5, "half")
    assert attempts[-1]["status"] == "running"
    stale = client.post("/api/heartbeat", json={"token": token_for(engine, first)})
    assert stale.status_code == 409 and stale.json()["reason"] == "stale_attempt"
