"""Recorded Lambda events replayed through handler.api.lambda_handler against the real database,
with the local worker calling back to a live API instance (any instance will do: they share
the database)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from infra.s3 import MotoServer

from .conftest import API_KEY, STORAGE_ROLE, WORKSPACE, Stack, running_stack, wait_until

EVENTS = Path(__file__).parent.parent / "fixtures" / "events"
# Lambda mode refuses the development token key: the stack and the Lambda API share this one.
TOKEN_KEYS = (("e2e-lambda", base64.urlsafe_b64encode(hashlib.sha256(b"e2e lambda entry").digest()).decode()),)


@pytest.fixture
def stack(database_url: str, moto_server: MotoServer) -> Iterator[Stack]:
    with running_stack(database_url, moto_server, token_keys=TOKEN_KEYS) as running:
        yield running


class FakeContext:
    function_name = "tickweave-api"
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 25_000


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return event


@pytest.fixture
def lambda_api(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    settings = stack.settings
    for name, value in {
        "DATABASE_URL": settings.database_url, "S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "TICKWEAVE_BUCKET": settings.bucket, "TICKWEAVE_STORAGE_ROLE_ARN": STORAGE_ROLE,
        "TICKWEAVE_PUBLIC_URL": stack.base_url, "TICKWEAVE_TICK_SECRET": settings.tick_secret,
        "TICKWEAVE_TOKEN_KEYS": ",".join(f"{kid}:{key}" for kid, key in settings.token_keys),
    }.items():
        monkeypatch.setenv(name, value)
    import handler.api

    module = importlib.reload(handler.api)
    yield module
    module.app.state.get_engine().close()


def test_api_gateway_v2_event_triggers_a_run_that_completes(stack: Stack, lambda_api: ModuleType) -> None:
    stack.engine.create_pipeline(WORKSPACE, {"id": "lambda-demo", "steps": [
        {"id": "one", "task": "echo"}, {"id": "two", "task": "echo"}]})
    event = load_event("apigw_v2_post_run.json")
    event["headers"]["authorization"] = f"Bearer {API_KEY}"

    response = lambda_api.lambda_handler(event, FakeContext())

    assert response["statusCode"] == 201, response
    body = json.loads(response["body"])
    assert body["pipeline_id"] == "lambda-demo" and body["params"] == {"source": "lambda"}
    assert body["trigger"] == "manual"
    run = stack.wait_for_run(body["id"], tick=False)  # eager dispatch alone carries it through
    assert run["status"] == "succeeded"
    assert lambda_api.app.state.get_engine().settings.mode == "lambda"


def test_api_gateway_event_without_key_is_401(lambda_api: ModuleType) -> None:
    event = load_event("apigw_v2_post_run.json")
    del event["headers"]["authorization"]
    response = lambda_api.lambda_handler(event, FakeContext())
    assert response["statusCode"] == 401
    assert json.loads(response["body"])["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("event_file", ["eventbridge_scheduled.json", "scheduler_tick.json"])
def test_scheduled_event_runs_a_tick(stack: Stack, lambda_api: ModuleType, event_file: str) -> None:
    stack.engine.create_pipeline(WORKSPACE, {"id": "ticked", "nodes": [{"id": "x", "task": "echo"}]})
    run = stack.engine.trigger_run(WORKSPACE, "ticked", dispatch_now=False)

    summary = lambda_api.lambda_handler(load_event(event_file), FakeContext())

    assert summary["claimed"] == 1 and summary["dispatched"] == 1, summary
    assert set(summary["durations_ms"]) >= {"schedules", "expire_leases", "claim", "dispatch", "notifications", "total"}
    done = wait_until(lambda: stack.engine.get_run(WORKSPACE, run.id)[0]["status"] == "succeeded", 30,
                      "the ticked run did not finish")
    assert done
    again = lambda_api.lambda_handler(load_event(event_file), FakeContext())
    assert again["claimed"] == 0  # nothing runs twice


def test_api_gateway_event_for_the_tick_route_still_needs_the_secret(lambda_api: ModuleType) -> None:
    event = load_event("apigw_v2_post_run.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/api/tick"
    del event["headers"]["authorization"]
    assert lambda_api.lambda_handler(event, FakeContext())["statusCode"] == 401
