"""Worker services register their tasks: routing follows registration, code hashes are kept as
history, and each attempt records the code version it was sent to."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from infra.s3 import free_port
from orchestrator.worker import TaskContext, Worker

from .conftest import Stack, wait_until

RENDER_SCHEMA = {"type": "object", "properties": {"page": {"type": "string"}}}


@pytest.fixture
def render_service(stack: Stack) -> Iterator[tuple[Worker, str]]:
    """A worker service with a task the orchestrator's own local worker does not have."""
    worker = Worker(settings=stack.settings)

    @worker.task("render", input_schema=RENDER_SCHEMA)
    def render(ctx: TaskContext) -> dict[str, Any]:
        return {"rendered": ctx.params.get("page", "index"), "attempt": ctx.attempt}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(worker.asgi_app(settings=stack.settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "the worker service did not start")
    yield worker, f"http://127.0.0.1:{port}/dispatch"
    server.should_exit = True
    thread.join(timeout=15)


def register(stack: Stack, endpoint: str, code_hash: str, **changes: Any) -> Any:
    body = {"service": "renderer", "version": "1.0.0", "transport": "http", "endpoint": endpoint,
            "tasks": [{"name": "render", "code_hash": code_hash,
                       "input_schema": {"type": "object", "properties": {"page": {"type": "string"}}}}],
            **changes}
    return stack.client.post("/api/workers/register", json=body)


def test_the_sdk_registers_its_tasks_with_code_hashes(stack: Stack, render_service: tuple[Worker, str]) -> None:
    from .conftest import API_KEY

    worker, endpoint = render_service
    answer = worker.register(stack.base_url, API_KEY, service="renderer", version="2.0.0", transport="http",
                             endpoint=endpoint)
    (task,) = answer["tasks"]
    assert task["name"] == "render" and task["new_code_version"] is True
    assert task["code_hash"] == worker.code_hash("render") and task["code_hash"].startswith("sha256:")
    (service,) = stack.client.get("/api/workers").json()["items"]
    assert service["endpoint"] == endpoint and service["tasks"][0]["input_schema"] == RENDER_SCHEMA
    again = worker.register(stack.base_url, API_KEY, service="renderer", version="2.0.1", transport="http",
                            endpoint=endpoint)
    assert again["tasks"][0]["new_code_version"] is False  # same code, new service version


def test_registration_routes_tasks_and_keeps_code_history(stack: Stack, render_service: tuple[Worker, str]) -> None:
    render_service_url = render_service[1]
    first = register(stack, render_service_url, "sha256:aaaaaaaa")
    assert first.status_code == 200 and first.json()["tasks"] == [
        {"name": "render", "code_hash": "sha256:aaaaaaaa", "new_code_version": True}]
    assert register(stack, render_service_url, "sha256:aaaaaaaa").json()["tasks"][0]["new_code_version"] is False
    changed = register(stack, render_service_url, "sha256:bbbbbbbb", version="1.1.0")
    assert changed.json()["tasks"][0]["new_code_version"] is True

    history = stack.client.get("/api/task-definitions/render/history").json()["versions"]
    assert [(v["code_hash"], v["service_version"]) for v in history] == [
        ("sha256:aaaaaaaa", "1.0.0"), ("sha256:bbbbbbbb", "1.1.0")]
    (service,) = stack.client.get("/api/workers").json()["items"]
    assert (service["service"], service["version"], service["transport"]) == ("renderer", "1.1.0", "http")
    assert service["tasks"][0]["input_schema"]["properties"] == {"page": {"type": "string"}}

    # `render` exists only in the registered service: the run succeeds only if routing followed it
    assert stack.client.post("/api/pipelines", json={"id": "site", "steps": [
        {"id": "page", "task": "render", "params": {"page": "about"}}, {"id": "after", "task": "echo"}]}).status_code == 201
    run = stack.wait_for_run(stack.client.post("/api/pipelines/site/runs").json()["id"])
    assert run["status"] == "succeeded"
    page = next(t for t in run["tasks"] if t["node"] == "page")
    detail = stack.client.get(f"/api/tasks/{page['id']}").json()
    assert detail["code_version"] == "sha256:bbbbbbbb"
    assert [a["code_version"] for a in detail["attempts"]] == ["sha256:bbbbbbbb"]
    after = stack.client.get(f"/api/tasks/{next(t for t in run['tasks'] if t['node'] == 'after')['id']}").json()
    assert after["code_version"] is None  # echo ran on the configured local worker


@pytest.mark.parametrize(("change", "path"), [
    ({"transport": "http", "endpoint": "ftp://nope"}, "endpoint"),
    ({"transport": "lambda", "endpoint": "not a function!"}, "endpoint"),
    ({"transport": "sqs", "endpoint": "https://example.com/queue"}, "endpoint"),
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"tasks": []}, "tasks"),
    ({"service": "Bad Name"}, "service"),
])
def test_bad_registrations_are_422(stack: Stack, change: dict[str, Any], path: str) -> None:
    endpoint = change.pop("endpoint", "http://127.0.0.1:1/dispatch")
    response = register(stack, endpoint, "sha256:aaaaaaaa", **change)
    assert response.status_code == 422, response.text
    assert any(d["path"].startswith(path) for d in response.json()["error"]["details"] or []), response.text
    assert stack.client.get("/api/workers").json()["items"] == []


def test_unknown_task_history_is_404(stack: Stack) -> None:
    assert stack.client.get("/api/task-definitions/nothing/history").status_code == 404
