"""Recorded Lambda event shapes replayed through both handlers, in-process, against the real
database and moto: the worker function's async invoke and SQS batch with real dispatch messages
(a task claimed like a tick claims it, a token and storage grant built by the dispatcher), and the
API function's admin invokes."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import boto3
import pytest

from orchestrator.db.connection import Row
from orchestrator.engine.dispatcher import Dispatcher
from orchestrator.store import tasks as task_store

from .conftest import FakeContext, Stack, generated_token_key, load_event


@pytest.fixture
def worker_function(monkeypatch: pytest.MonkeyPatch, restore_environ: None) -> Iterator[ModuleType]:
    """handler.worker as a fresh cold start, running tests.deploy.tasks with the default (dev)
    token keys, which are the e2e stack's."""
    for name in ("TICKWEAVE_TOKEN_KEYS", "TICKWEAVE_TOKEN_KEYS_FROM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TICKWEAVE_WORKER", "tests.deploy.tasks:worker")
    import handler.worker
    import tests.deploy.tasks

    importlib.reload(tests.deploy.tasks)
    yield importlib.reload(handler.worker)


def dispatch_messages(stack: Stack, pipeline: dict[str, Any], count: int) -> list[tuple[Row, dict[str, Any]]]:
    """Trigger `pipeline` without dispatching, claim its ready tasks as a tick would, and build
    their dispatch messages (token with a storage grant, callback URLs of the live API)."""
    stack.engine.create_pipeline("e2e", pipeline)
    stack.engine.trigger_run("e2e", pipeline["id"], dispatch_now=False)
    with stack.engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 10)
    assert len(claimed) == count
    dispatcher = Dispatcher(stack.settings, stack.engine.db, stack.engine.keyring, transports={})
    return [(task, dispatcher.build_message(task, {})) for task in claimed]


def task_status(stack: Stack, task: Row) -> str:
    row, _ = stack.engine.get_task("e2e", task["id"])
    status: str = row["status"]
    return status


def test_async_invoke_of_the_worker_runs_the_task_and_calls_back(stack: Stack, worker_function: ModuleType) -> None:
    ((task, message),) = dispatch_messages(stack, {"id": "deploy-demo", "nodes": [
        {"id": "one", "task": "echo", "params": {"n": 1}}]}, 1)
    # the recorded event documents the shape the lambda transport sends
    assert set(load_event("lambda_async_dispatch.json")) == set(message)

    answer = worker_function.lambda_handler(json.loads(json.dumps(message)), FakeContext())

    assert answer["accepted"] is True and answer["outcome"] == "succeeded", answer
    assert task_status(stack, task) == "succeeded"
    row, _ = stack.engine.get_task("e2e", task["id"])
    s3 = boto3.client("s3", endpoint_url=stack.settings.s3_endpoint_url, region_name="us-east-1")
    stored = json.loads(s3.get_object(Bucket=stack.settings.bucket, Key=row["output"]["key"])["Body"].read())
    assert stored["params"] == {"n": 1} and stored["node"] == "one"


def test_sqs_batch_reports_only_the_record_that_failed(stack: Stack, worker_function: ModuleType) -> None:
    (first, first_message), (second, second_message) = dispatch_messages(stack, {"id": "batch", "nodes": [
        {"id": "a", "task": "echo"}, {"id": "b", "task": "fail"}]}, 2)
    event = load_event("sqs_worker_batch.json")
    good, broken = event["Records"]
    good["body"] = json.dumps(first_message if first["node_id"] == "a" else second_message)
    failing = event["Records"][1:]  # the recorded second body is truncated JSON
    extra = dict(good, messageId="f5c2b1a0-3e6f-4a51-9d38-000000000003",
                 body=json.dumps(second_message if first["node_id"] == "a" else first_message))
    event["Records"] = [good, *failing, extra]

    answer = worker_function.lambda_handler(event, FakeContext())

    # the unreadable record goes back to the queue; a task that failed is not a failed delivery:
    # the worker reported it, and the orchestrator decides about retries
    assert answer == {"batchItemFailures": [{"itemIdentifier": broken["messageId"]}]}
    by_node = {t["node_id"]: t for t in (first, second)}
    assert task_status(stack, by_node["a"]) == "succeeded"
    assert task_status(stack, by_node["b"]) == "failed"  # non-retryable: no attempt left


def test_the_worker_refuses_a_tampered_token_without_calling_back(stack: Stack, worker_function: ModuleType) -> None:
    ((task, message),) = dispatch_messages(stack, {"id": "tampered", "nodes": [{"id": "x", "task": "echo"}]}, 1)
    header, key, iv, ciphertext, tag = message["token"].split(".")
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    message["token"] = ".".join([header, key, iv, flipped, tag])

    answer = worker_function.lambda_handler(message, FakeContext())

    assert answer == {"status": "rejected", "reason": "tampered"}
    assert task_status(stack, task) == "dispatched"  # left to lease expiry, then retried


def test_the_worker_function_loads_its_worker_on_the_first_event(worker_function: ModuleType,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_function._worker is None  # nothing at import
    monkeypatch.setenv("TICKWEAVE_WORKER", "tests.deploy.tasks:echo")
    with pytest.raises(TypeError, match=r"is not an orchestrator\.worker\.Worker"):
        worker_function.get_worker()


@pytest.fixture
def api_function(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """handler.api as a fresh cold start with the database set directly (no references)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("TICKWEAVE_LOCAL_WORKER", "")
    # Lambda mode starts only with its secrets (no development fallback).
    monkeypatch.setenv("TICKWEAVE_TOKEN_KEYS", f"k1:{generated_token_key()}")
    monkeypatch.setenv("TICKWEAVE_TICK_SECRET", "lambda-events-tick-secret")
    import handler.api

    module = importlib.reload(handler.api)
    yield module
    if module._runtime is not None:
        module._runtime.engine.close()


def test_create_key_invoke_makes_a_key_the_api_accepts(api_function: ModuleType) -> None:
    created = api_function.lambda_handler(load_event("create_key_invoke.json"), FakeContext())
    event = load_event("apigw_v2_get_health.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/api/runs"
    event["headers"]["authorization"] = f"Bearer {created['key']}"
    response = api_function.lambda_handler(event, FakeContext())
    assert response["statusCode"] == 200, response
    assert json.loads(response["body"]) == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(("event", "message"), [
    ({"tickweave": "create-key", "workspace": "Not A Slug"}, "workspace must be a slug"),
    ({"tickweave": "create-key", "workspace": "ok", "role": "root"}, "role must be one of"),
    ({"tickweave": "drop-everything"}, "unknown tickweave command 'drop-everything'"),
])
def test_admin_invokes_refuse_bad_input(api_function: ModuleType, event: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        api_function.lambda_handler(event, FakeContext())


def test_migrate_invoke_without_a_database_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL_FROM", raising=False)
    import handler.api

    module = importlib.reload(handler.api)
    with pytest.raises(ValueError, match="DATABASE_URL_FROM"):
        module.lambda_handler(load_event("migrate_invoke.json"), FakeContext())
