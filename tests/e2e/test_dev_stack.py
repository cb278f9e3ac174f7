"""`make dev`'s runner as a user runs it: a real process tree that serves a run end to end and
leaves nothing behind on SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from infra.s3 import free_port

from .conftest import wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_dev_stack_runs_a_pipeline_and_stops_cleanly(tmp_path: Path, stop_signal: signal.Signals) -> None:
    shutil.copytree(REPO / "examples" / "pipelines", tmp_path / "examples" / "pipelines")
    port, moto_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_ENDPOINT_URL")}
    env.update({"PORT": str(port), "MOTO_PORT": str(moto_port), "TICK_INTERVAL_S": "0.5",
                "PYTHONPATH": str(REPO), "TICKWEAVE_DEV_API_KEY": "dev-test-key"})
    process = subprocess.Popen([sys.executable, "-m", "infra.dev"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("Ctrl-C stops everything" in line for line in output) or process.poll() is not None,
                   120, "the dev stack did not start")
        assert process.poll() is None, "".join(output)
        banner = "".join(output)
        assert f"http://127.0.0.1:{port}/api" in banner and "hello-diamond v1" in banner
        postmaster = psutil.Process(int((tmp_path / ".tickweave" / "pgdata" / "postmaster.pid").read_text().split()[0]))
        children = psutil.Process(process.pid).children(recursive=True)

        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"x-api-key": "dev-test-key"}, timeout=30)
        run = client.post("/api/pipelines/hello-diamond/runs", json={}).json()
        done = wait_until(
            lambda: (body := client.get(f"/api/runs/{run['id']}").json())["status"] in ("succeeded", "failed") and body,
            60, "the example run did not finish")
        assert done["status"] == "succeeded"
        client.close()

        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert "Tickweave stopped." in "".join(output)
        wait_until(lambda: not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE, 30,
                   "postgres outlived the dev stack")
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if process.poll() is None:
            process.kill()
