"""The engine's log lines at key transitions carry the ids of what they are about, and never a
secret: a pipeline run end to end through the app, its records captured."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine
from orchestrator.logs import JsonFormatter

from .conftest import WORKSPACE
from .test_scheduling import set_clock

AUTH = {"Authorization": "Bearer acme-admin-key"}


class RecordingTransport:
    name = "local"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What configure_logging's handler would print, for the orchestrator's loggers."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("orchestrator")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def by_event(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if getattr(r, "event", None) == event]


def test_transitions_are_logged_with_run_and_task_ids(
    engine: Engine, caplog: pytest.LogCaptureFixture, json_lines: io.StringIO
) -> None:
    caplog.set_level(logging.DEBUG, logger="orchestrator")
    transport = RecordingTransport()
    engine.transports["local"] = transport
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None  # type: ignore[method-assign]
    engine.create_pipeline(WORKSPACE, {"id": "pair", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"], "heartbeat_s": 30}]})
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as client:
        run = client.post("/api/pipelines/pair/runs", json={}, headers=AUTH).json()
        (first,) = transport.sent
        done = client.post(f"/api/callback/{first['task_id']}",
                           json={"token": first["token"], "status": "succeeded", "output": {"key": "k/a"}})
        assert done.status_code == 200, done.text
        (_, second) = transport.sent  # `b` was dispatched by the callback itself
        # `b` never calls back: its lease lapses and the tick fails the attempt
        set_clock(engine, datetime.now(UTC) + timedelta(minutes=5))
        assert client.post("/api/tick", headers={"x-tick-secret": engine.settings.tick_secret}).json()["expired"] == 1

    dispatched = by_event(caplog, "task.dispatched")
    # a, b, and b again: its lapsed delivery was given back and the same tick sent it once more
    expected = [(first["task_id"], 1), (second["task_id"], 1), (second["task_id"], 2)]
    assert [(str(d["task_id"]), d["attempt"]) for d in dispatched] == expected
    for record in dispatched:
        assert str(record["run_id"]) == run["id"]
        assert (record["workspace_id"], record["pipeline_id"]) == (WORKSPACE, "pair")
    assert [(str(r["task_id"]), r["attempt"]) for r in by_event(caplog, "task.claimed")] == expected
    (expired,) = by_event(caplog, "task.lease_expired")
    assert (str(expired["task_id"]), expired["attempt"], expired["status"]) == (second["task_id"], 1, "dispatched")
    (tick,) = by_event(caplog, "tick.finished")
    assert tick["expired"] == 1

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert lines and all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    sent = [line for line in lines if line.get("event") == "task.dispatched"]
    assert [(line["run_id"], line["task_id"], line["attempt"]) for line in sent] == [
        (run["id"], task_id, attempt) for task_id, attempt in expected]

    # the worker tokens and the tick secret reach no log
    text = caplog.text + json_lines.getvalue()
    for secret in (*(m["token"] for m in transport.sent), engine.settings.tick_secret, "acme-admin-key"):
        assert secret not in text
