"""Two real processes: the API and engine here (uvicorn on a thread), the example worker as an HTTP
worker service in a child process (`worker.asgi_app()` under uvicorn). Dispatches, heartbeats,
callbacks and outputs all cross process boundaries: HTTP both ways and S3 (moto server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.s3 import FAKE_AWS_ENV, MotoServer, free_port
from orchestrator.storage.s3 import orchestrator_s3

from .conftest import running_stack, wait_until

REPO = Path(__file__).resolve().parents[2]
SECRET = "two-process-secret"


@pytest.fixture
def worker_process() -> Iterator[str]:
    """The worker service in its own process; yields its base URL, terminates it at the end."""
    port = free_port()
    code = (
        "import uvicorn, examples.tasks\n"
        f"uvicorn.run(examples.tasks.worker.asgi_app(), host='127.0.0.1', port={port}, log_level='warning')\n"
    )
    # The worker reads its settings from its environment, as a deployed one would: the default
    # (dev) token keys, which the test stack also uses, and the shared bearer secret.
    env = {name: value for name, value in os.environ.items() if not name.startswith("TICKWEAVE_")}
    env.update(FAKE_AWS_ENV, PYTHONPATH=str(REPO), TICKWEAVE_WORKER_AUTH_TOKEN=SECRET)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the worker process exited with {process.returncode}:\n{output}")
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 30, "the worker process did not become healthy")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stdout:
            process.stdout.close()


def test_a_pipeline_runs_with_the_worker_in_another_process(
    database_url: str, moto_server: MotoServer, worker_process: str,
) -> None:
    with running_stack(
        database_url, moto_server, transports={"*": "http"}, worker_url=f"{worker_process}/dispatch",
        worker_auth_token=SECRET, local_worker=None,
    ) as stack:
        assert set(stack.engine.transports) == {"http"}
        diamond = (REPO / "examples" / "pipelines" / "hello-diamond.yaml").read_text()
        created = stack.client.post("/api/pipelines", content=diamond, headers={"Content-Type": "application/yaml"})
        assert created.status_code == 201, created.text
        triggered = stack.client.post("/api/pipelines/hello-diamond/runs", json={"params": {"who": "two-process"}})
        assert triggered.status_code == 201, triggered.text

        run = stack.wait_for_run(triggered.json()["id"])

        assert run["status"] == "succeeded", run
        tasks = {t["node"]: t for t in run["tasks"]}
        assert {node: t["status"] for node, t in tasks.items()} == dict.fromkeys(
            ("fetch", "left", "right", "report"), "succeeded")
        assert all(t["attempt"] == 1 for t in tasks.values())
        s3 = orchestrator_s3(stack.settings)
        report = json.loads(s3.get_object(Bucket=stack.settings.bucket, Key=tasks["report"]["output"]["key"])["Body"]
                            .read())
        assert report["params"] == {"greeting": "hello", "who": "two-process"}
        assert set(report["inputs"]) == {"left", "right"}
        assert report["inputs"]["right"] == {"slept": 1}

        # the service enforces the secret it read from its environment
        refused = httpx.post(f"{worker_process}/dispatch", json={"task_id": "x"})
        assert refused.status_code == 401
        health = httpx.get(f"{worker_process}/health").json()
        assert health["in_flight"] == 0 and "sleep" in health["tasks"]
