"""A registered HTTP worker service, end to end: the SDK registers and keeps its signing secret;
every dispatch to it is signed and carries no platform secret; the SDK's app refuses unsigned,
forged or stale dispatches and tokens replayed with another task or other params; a failing
endpoint's answer never reaches the task error."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from infra.s3 import MotoServer, free_port
from orchestrator.storage.signatures import SIGNATURE_HEADER, sign_dispatch, verify_dispatch
from orchestrator.worker import TaskContext, Worker

from .conftest import API_KEY, Stack, running_stack, wait_until

PLATFORM_SECRET = "platform-wide-worker-secret"
LEAK = "INTERNAL-ADMIN-PAGE aws_secret_access_key=wJalrXUtnFEMI"

Asgi = Callable[..., Any]


@pytest.fixture
def stack(database_url: str, moto_server: MotoServer) -> Iterator[Stack]:
    """A stack whose configured http transport has a platform secret (no worker URL: nothing uses it)."""
    with running_stack(database_url, moto_server, worker_auth_token=PLATFORM_SECRET) as running:
        yield running


@contextmanager
def serve(app: Asgi) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "the service did not start")
    try:
        yield f"http://127.0.0.1:{port}/dispatch"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class Recording:
    """Wraps an ASGI app and keeps each dispatch request's headers and body."""

    def __init__(self, app: Asgi) -> None:
        self.app = app
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/dispatch":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.requests.append(({k.decode().lower(): v.decode() for k, v in scope["headers"]}, body))
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@pytest.fixture
def render_service(stack: Stack) -> Iterator[tuple[Worker, Recording, str]]:
    # The worker's own settings have no platform secret: it is a tenant's service.
    worker = Worker(settings=stack.settings.with_overrides(worker_auth_token=None))

    @worker.task("render")
    def render(ctx: TaskContext) -> dict[str, Any]:
        return {"rendered": ctx.params.get("page", "index")}

    recording = Recording(worker.asgi_app())
    with serve(recording) as url:
        yield worker, recording, url


def test_dispatches_are_signed_per_registration_and_verified_by_the_sdk(
    stack: Stack, render_service: tuple[Worker, Recording, str]
) -> None:
    worker, recording, url = render_service
    answer = worker.register(stack.base_url, API_KEY, service="renderer", version="1", transport="http", endpoint=url)
    secret = answer["signing_secret"]
    assert secret and worker.dispatch_secrets == (secret,)

    assert stack.client.post("/api/pipelines", json={"id": "site", "nodes": [
        {"id": "page", "task": "render", "params": {"page": "about"}}]}).status_code == 201
    run = stack.wait_for_run(stack.client.post("/api/pipelines/site/runs").json()["id"])
    assert run["status"] == "succeeded", run

    (headers, body), *_ = recording.requests
    assert "authorization" not in headers and PLATFORM_SECRET not in json.dumps(headers)
    assert verify_dispatch([secret], headers, body) is None
    message = json.loads(body)
    assert message["task"] == "render" and message["params"] == {"page": "about"}

    def post(raw: bytes, extra: dict[str, str]) -> httpx.Response:
        return httpx.post(url, content=raw, headers={"content-type": "application/json", **extra}, timeout=10)

    # Not signed, signed with another secret, signed too long ago, signature of another body: 401.
    assert post(body, {}).json() == {"accepted": False, "error": "unauthorized", "reason": "signature_missing"}
    assert post(body, {"authorization": f"Bearer {PLATFORM_SECRET}"}).status_code == 401
    assert post(body, sign_dispatch("twsig_forged", body)).json()["reason"] == "signature_invalid"
    assert post(body, sign_dispatch(secret, body, now=time.time() - 3600)).json()["reason"] == "signature_expired"
    forged = {**sign_dispatch(secret, body), SIGNATURE_HEADER: sign_dispatch(secret, b"{}")[SIGNATURE_HEADER]}
    assert post(body, forged).json()["reason"] == "signature_invalid"

    # Even correctly signed (a stolen secret), the token runs only its own task with its own params.
    for change, reason in (({"task": "echo"}, "task_mismatch"), ({"params": {"page": "../admin"}}, "params_mismatch"),
                           ({"params": {"page": "about", "extra": 1}}, "params_mismatch")):
        replay = json.dumps({**message, **change}).encode()
        refused = post(replay, sign_dispatch(secret, replay))
        assert refused.status_code == 401 and refused.json()["reason"] == reason, refused.text


async def broken_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An endpoint that answers every dispatch with a page the tenant must not read back."""
    await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/html")]})
    await send({"type": "http.response.body", "body": f"<html>{LEAK}</html>".encode()})


def test_a_failing_endpoint_leaves_only_its_status_in_the_task_error(stack: Stack) -> None:
    with serve(broken_app) as url:
        registered = stack.client.post("/api/workers/register", json={
            "service": "broken", "version": "1", "transport": "http", "endpoint": url,
            "tasks": [{"name": "leaky", "code_hash": "sha256:aaaaaaaa"}]})
        assert registered.status_code == 200, registered.text
        assert stack.client.post("/api/pipelines", json={"id": "leak", "nodes": [
            {"id": "n", "task": "leaky"}]}).status_code == 201
        run = stack.client.post("/api/pipelines/leak/runs").json()
        task_id = run["tasks"][0]["id"]

        def failed_dispatch() -> dict[str, Any] | None:
            task: dict[str, Any] = stack.client.get(f"/api/tasks/{task_id}").json()
            return task if task["attempts"] and task["attempts"][0]["error"] else None

        task = wait_until(failed_dispatch, 30, "the dispatch did not fail")
        text = json.dumps(task)
        assert "answered 500" in text and LEAK not in text and "INTERNAL-ADMIN-PAGE" not in text, text
        assert LEAK not in stack.client.get(f"/api/runs/{run['id']}").text
