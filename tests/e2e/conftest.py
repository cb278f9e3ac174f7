"""The whole stack on loopback: real Postgres, a moto S3/STS server, the Starlette app under
uvicorn, and the local transport running the example worker, which calls back over HTTP."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from infra.s3 import MotoServer, free_port
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.engine.service import Engine
from orchestrator.storage.s3 import ensure_bucket

API_KEY = "e2e-admin-key"
WORKSPACE = "e2e"
STORAGE_ROLE = "arn:aws:iam::123456789012:role/tickweave-worker-storage"


@dataclass
class Stack:
    settings: Settings
    engine: Engine
    client: httpx.Client
    base_url: str

    def wait_for_run(self, run_id: str, timeout_s: float = 60.0, tick: bool = True) -> dict[str, Any]:
        """Poll the run until it is terminal, ticking as EventBridge would; fail at the deadline."""
        return wait_until(
            lambda: self._terminal_run(run_id, tick), timeout_s, f"run {run_id} did not finish"
        )

    def _terminal_run(self, run_id: str, tick: bool) -> dict[str, Any] | None:
        if tick:
            assert self.client.post("/api/tick", headers={"x-tick-secret": self.settings.tick_secret}).status_code == 200
        body: dict[str, Any] = self.client.get(f"/api/runs/{run_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None


def wait_until(probe: Callable[[], Any], timeout_s: float, message: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message)
        threading.Event().wait(0.05)  # poll interval, not a wait for state


@pytest.fixture
def stack(database_url: str, moto_server: MotoServer) -> Iterator[Stack]:
    with running_stack(database_url, moto_server) as running:
        yield running


@contextmanager
def running_stack(database_url: str, moto_server: MotoServer, **overrides: Any) -> Iterator[Stack]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = Settings(
        database_url=database_url, s3_endpoint_url=moto_server.endpoint_url,
        bucket=f"e2e-{uuid.uuid4().hex[:10]}", storage_role_arn=STORAGE_ROLE, public_url=base_url,
        local_worker="examples.tasks:worker", tick_secret="e2e-tick-secret",
        allow_private_worker_endpoints=True,  # the worker services under test listen on loopback
    ).with_overrides(**overrides)
    ensure_bucket(settings)
    engine = Engine(settings)
    engine.create_api_key(WORKSPACE, "admin", raw_key=API_KEY)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "uvicorn did not start")
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    try:
        yield Stack(settings, engine, client, base_url)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=15)
        engine.close()
