"""`POST /api/tick` over HTTP has a deadline: under Lambda the invocation's remaining time (Mangum
puts the context in the ASGI scope as `aws.context`), capped by TICKWEAVE_HTTP_TICK_MAX_S; off
Lambda that maximum alone. Driven through handler.api's own Mangum handler with an API Gateway
HTTP API event, as API Gateway delivers it, and through the plain app."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.config import load_settings
from orchestrator.db.connection import Database
from orchestrator.store import tasks as task_store

from .conftest import load_event

TICK_SECRET = "http-tick-deadline-secret"
TOKEN_KEYS = "deadline:" + base64.urlsafe_b64encode(hashlib.sha256(b"http tick deadline").digest()).decode()
WORKSPACE = "acme"


class LambdaContext:
    """What Lambda hands the handler: the time left counts down from the invocation's start."""

    function_name = "tickweave-api"
    aws_request_id = "req-http-tick"

    def __init__(self, remaining_ms: int) -> None:
        self._ends = time.monotonic() + remaining_ms / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


@pytest.fixture
def api(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    for name, value in {
        "DATABASE_URL": database_url, "TICKWEAVE_MODE": "lambda", "TICKWEAVE_TICK_SECRET": TICK_SECRET,
        "TICKWEAVE_TOKEN_KEYS": TOKEN_KEYS, "TICKWEAVE_LOCAL_WORKER": "", "TICKWEAVE_TRANSPORTS": "*=lambda",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TICKWEAVE_HTTP_TICK_MAX_S", raising=False)
    import handler.api

    module = importlib.reload(handler.api)
    yield module
    module.get_runtime().engine.close()


def tick_event() -> dict[str, Any]:
    event = load_event("apigw_v2_post_run.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/api/tick"
    del event["headers"]["authorization"]
    event["headers"]["x-tick-secret"] = TICK_SECRET
    event["headers"]["content-length"] = "0"
    event["body"] = ""
    return event


def http_tick(api: ModuleType, remaining_ms: int) -> dict[str, Any]:
    response = api.lambda_handler(tick_event(), LambdaContext(remaining_ms))
    assert response["statusCode"] == 200, response
    summary: dict[str, Any] = json.loads(response["body"])
    return summary


def lapsed_running_tasks(api: ModuleType, count: int) -> None:
    """`count` tasks a worker started whose leases lapsed; on expiry each retries after 10 minutes,
    so nothing is claimed again (the workers of this test exist only on paper)."""
    engine = api.get_runtime().engine
    engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
    engine.create_pipeline(WORKSPACE, {"id": "lapsing", "nodes": [
        {"id": f"n{i:03d}", "task": "echo", "heartbeat_s": 30, "retry": {"max_attempts": 3, "base_delay_s": 600}}
        for i in range(count)]})
    engine.trigger_run(WORKSPACE, "lapsing", dispatch_now=False)
    db = Database(engine.settings.database_url, max_size=1)
    try:
        with db.transaction() as conn:
            for task in task_store.claim_ready_tasks(conn, count):
                assert task_store.mark_running(conn, task["id"], task["attempt"], task["claim_token"], None, None)
            conn.execute("UPDATE tasks SET lease_expires_at = tw_now() - interval '1 second' WHERE status = 'running'")
    finally:
        db.close()


def test_under_lambda_the_tick_takes_the_invocations_remaining_time(api: ModuleType) -> None:
    summary = http_tick(api, 20_000)
    assert summary["deadline_s"] is not None and 19.0 < summary["deadline_s"] <= 20.0, summary
    assert summary["deadline_stopped"] == []


def test_the_configured_maximum_caps_the_lambdas_time(api: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKWEAVE_HTTP_TICK_MAX_S", "8")
    module = importlib.reload(api)
    try:
        summary = http_tick(module, 20_000)
        assert summary["deadline_s"] is not None and 7.0 < summary["deadline_s"] <= 8.0, summary
    finally:
        module.get_runtime().engine.close()


def test_short_remaining_time_stops_the_tick_and_the_next_one_heals(api: ModuleType) -> None:
    lapsed_running_tasks(api, 250)
    short = http_tick(api, 1_500)  # under the tick's margin: no batch starts
    assert short["expired"] == 0 and short["claimed"] == 0, short
    # the first step with something due was stopped (no schedule is due: that step had nothing)
    assert short["deadline_stopped"][0] == "expire_leases" and "schedules" not in short["deadline_stopped"]

    full = http_tick(api, 20_000)
    assert full["expired"] == 250 and full["deadline_stopped"] == [], full
    with api.get_runtime().engine.db.connection() as conn:
        row = conn.execute("SELECT count(*) AS n FROM tasks WHERE status = 'ready'").fetchone()
        assert row is not None and row["n"] == 250


def test_off_lambda_the_configured_maximum_is_the_deadline(api: ModuleType) -> None:
    with TestClient(api.get_runtime().app) as client:
        response = client.post("/api/tick", headers={"x-tick-secret": TICK_SECRET})
    assert response.status_code == 200, response.text
    deadline = response.json()["deadline_s"]
    assert deadline is not None and 24.0 < deadline <= 25.0


@pytest.mark.parametrize("raw", ["0", "-3", "abc", "nan", "901"])
def test_a_bad_maximum_is_refused_naming_the_setting(raw: str) -> None:
    with pytest.raises(ValueError, match="TICKWEAVE_HTTP_TICK_MAX_S"):
        load_settings({"TICKWEAVE_HTTP_TICK_MAX_S": raw})


def test_the_maximum_is_read_from_the_environment() -> None:
    assert load_settings({}).http_tick_max_s == 25.0
    assert load_settings({"TICKWEAVE_HTTP_TICK_MAX_S": "12.5"}).http_tick_max_s == 12.5
