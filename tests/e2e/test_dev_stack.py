"""`make dev`'s runner as a user runs it: a real process tree that serves a run end to end,
stops in order on SIGTERM or Ctrl-C leaving nothing behind, and keeps its data (rows and S3
objects) for the next start, in-flight local tasks included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import boto3
import httpx
import psutil
import pytest
from botocore.config import Config

from infra.s3 import free_port
from orchestrator.store.invariants import find_violations

from .conftest import wait_until

REPO = Path(__file__).resolve().parents[2]
DEV_KEY = "dev-test-key"
STOP_LINES = ["Stopping: ticker", "Stopping: local worker", "Stopping: API", "Stopping: S3", "Stopping: Postgres",
              "Tickweave stopped."]

# first -> slow -> last, where `last` also reads `first`'s output: after a restart it reads an
# object written before the stop.
SLOW_PIPELINE = """
id: slow-join
nodes:
  - {{id: first, task: echo}}
  - {{id: slow, task: sleep, depends: [first], params: {{seconds: {seconds}}}}}
  - {{id: last, task: echo, depends: [first, slow]}}
"""


class DevProcess:
    """`python -m infra.dev` in `root` (its .tickweave/ data dir) on free ports, as `make dev`
    runs it; its stdout and stderr collected line by line."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.port, self.moto_port = free_port(), free_port()
        full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_ENDPOINT_URL")}
        full_env.update({"PORT": str(self.port), "MOTO_PORT": str(self.moto_port), "TICK_INTERVAL_S": "0.5",
                         "PYTHONPATH": str(REPO), "TICKWEAVE_DEV_API_KEY": DEV_KEY, **env})
        self.process = subprocess.Popen([sys.executable, "-m", "infra.dev"], cwd=root, env=full_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        self._reader.start()
        wait_until(lambda: self._has("Ctrl-C stops everything") or self.process.poll() is not None,
                   120, "the dev stack did not start")
        assert self.process.poll() is None, self.output
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"x-api-key": DEV_KEY},
                                   timeout=30)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def stop(self, stop_signal: signal.Signals = signal.SIGTERM, timeout_s: float = 90) -> str:
        """Signal the stack and wait for it to exit 0; returns everything it printed."""
        self.client.close()
        self.process.send_signal(stop_signal)
        assert self.process.wait(timeout=timeout_s) == 0, self.output
        self._reader.join(timeout=10)
        return self.output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.client.close()

    def run_until_done(self, run_id: str, timeout_s: float = 90) -> dict[str, Any]:
        done: dict[str, Any] = wait_until(
            lambda: (body := self.client.get(f"/api/runs/{run_id}").json())["status"]
            in ("succeeded", "failed", "cancelled") and body,
            timeout_s, f"run {run_id} did not finish")
        return done

    def task_of(self, run_id: str, node: str) -> dict[str, Any]:
        tasks = self.client.get(f"/api/runs/{run_id}").json()["tasks"]
        task_id = next(t["id"] for t in tasks if t["node"] == node)
        body: dict[str, Any] = self.client.get(f"/api/tasks/{task_id}").json()
        return body


def _project(tmp_path: Path) -> Path:
    """A directory laid out as a checkout for `make dev`: the example pipelines to load."""
    shutil.copytree(REPO / "examples" / "pipelines", tmp_path / "examples" / "pipelines")
    return tmp_path


def _stopped_in_order(output: str) -> None:
    positions = [output.find(line) for line in STOP_LINES]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), output
    # Nothing says "stopped" before everything has: it is the last line printed.
    assert output.rstrip().splitlines()[-1] == "Tickweave stopped.", output
    assert output.count("Tickweave stopped.") == 1


def _books_balance(root: Path) -> None:
    """The invariant checker on the stack's own database (the Postgres is stopped: start it)."""
    from infra.postgres import server_url, start_embedded_postgres, stop_embedded_postgres, with_database

    handle = start_embedded_postgres(root / ".tickweave" / "pgdata")
    try:
        assert find_violations(with_database(server_url(handle), "tickweave")) == []
    finally:
        stop_embedded_postgres(handle)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_dev_stack_runs_a_pipeline_and_stops_cleanly(tmp_path: Path, stop_signal: signal.Signals) -> None:
    dev = DevProcess(_project(tmp_path))
    try:
        banner = dev.output
        assert f"http://127.0.0.1:{dev.port}/api" in banner and "hello-diamond v1" in banner
        assert "0 objects restored" in banner
        postmaster = psutil.Process(int((tmp_path / ".tickweave" / "pgdata" / "postmaster.pid").read_text().split()[0]))
        children = psutil.Process(dev.process.pid).children(recursive=True)

        run = dev.client.post("/api/pipelines/hello-diamond/runs", json={}).json()
        assert dev.run_until_done(run["id"], 60)["status"] == "succeeded"

        output = dev.stop(stop_signal)
        _stopped_in_order(output)
        wait_until(lambda: not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE, 30,
                   "postgres outlived the dev stack")
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        dev.kill()


def _s3_client(dev: DevProcess) -> Any:
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{dev.moto_port}", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(s3={"addressing_style": "path"}))


def _object_facts(head: dict[str, Any]) -> dict[str, Any]:
    """What a restart must keep of an object: its type, ETag, size and S3's own checksum."""
    return {name: head.get(name) for name in ("ContentType", "ETag", "ContentLength", "ChecksumSHA256")}


def test_a_restart_keeps_the_outputs_readable(tmp_path: Path) -> None:
    """The issue's complaint: after a restart Postgres still has the rows, and S3 must still have
    the objects they name, so old outputs read and resumed runs do not fail on NoSuchKey."""
    root = _project(tmp_path)
    dev = DevProcess(root)
    try:
        run = dev.client.post("/api/pipelines/daily-sales/runs", json={}).json()
        assert dev.run_until_done(run["id"])["status"] == "succeeded"
        outputs = dev.client.get("/api/outputs", params={"pipeline": "daily-sales"}).json()["items"]
        assert {o["version"] for o in outputs} == {"eu", "us"}
        before = {o["id"]: dev.client.get(f"/api/outputs/{o['id']}/content").content for o in outputs}
        output_key = dev.task_of(run["id"], "collect")["output"]["key"]
        s3 = _s3_client(dev)
        written = _object_facts(s3.head_object(Bucket="tickweave-outputs", Key=output_key, ChecksumMode="ENABLED"))
        # Grants are presigned URLs, whose PUTs carry no checksum of S3's own; a PUT with
        # credentials (`storage: credentials`) does, and the snapshot must keep it.
        body = b'{"written": "with a checksum"}'
        s3.put_object(Bucket="tickweave-outputs", Key="checked/object.json", Body=body,
                      ContentType="application/json", ChecksumAlgorithm="SHA256")
        checked = _object_facts(s3.head_object(Bucket="tickweave-outputs", Key="checked/object.json",
                                               ChecksumMode="ENABLED"))
        assert checked["ChecksumSHA256"]
        dev.stop()
    finally:
        dev.kill()

    dev = DevProcess(root)
    try:
        assert "objects restored" in dev.output and "0 objects restored" not in dev.output
        for output_id, content in before.items():
            answer = dev.client.get(f"/api/outputs/{output_id}/content")
            assert answer.status_code == 200, answer.text
            assert answer.content == content
        # The node output too, with the content type, ETag and checksum (if any) it was written
        # with (the callback's check of an output relies on S3's own SHA-256 when there is one).
        s3 = _s3_client(dev)
        assert written["ContentType"] == "application/json"
        assert _object_facts(s3.head_object(Bucket="tickweave-outputs", Key=output_key,
                                            ChecksumMode="ENABLED")) == written
        assert _object_facts(s3.head_object(Bucket="tickweave-outputs", Key="checked/object.json",
                                            ChecksumMode="ENABLED")) == checked
        assert s3.get_object(Bucket="tickweave-outputs", Key="checked/object.json")["Body"].read() == body
        # A run started after the restart reads the persisted output of one from before it.
        report = dev.client.post("/api/pipelines/sales-report/runs", json={"versions": ["eu", "us"]}).json()
        assert dev.run_until_done(report["id"])["status"] == "succeeded"
        summary = dev.client.get("/api/outputs", params={"pipeline": "sales-report", "version": "eu"}).json()["items"]
        totals = next(o for o in outputs if o["version"] == "eu")
        read = dev.client.get(f"/api/outputs/{summary[0]['id']}/content").json()
        assert read["inputs"]["daily-sales/totals"] == json.loads(before[totals["id"]])
        dev.stop()
    finally:
        dev.kill()
    _books_balance(root)


def test_a_stop_lets_a_running_local_task_finish(tmp_path: Path) -> None:
    root = _project(tmp_path)
    dev = DevProcess(root)
    try:
        assert dev.client.post("/api/pipelines", content=SLOW_PIPELINE.format(seconds=3),
                               headers={"Content-Type": "application/yaml"}).status_code == 201
        run = dev.client.post("/api/pipelines/slow-join/runs", json={}).json()
        wait_until(lambda: dev.task_of(run["id"], "slow")["status"] == "running", 30, "`slow` did not start")
        output = dev.stop()
        # The task ended and called back while the API was still up: it succeeded, not failed.
        assert "handed back" not in output
        _stopped_in_order(output)
    finally:
        dev.kill()

    dev = DevProcess(root)
    try:
        done = dev.run_until_done(run["id"])
        assert done["status"] == "succeeded", done
        slow = dev.task_of(run["id"], "slow")
        assert [(a["attempt"], a["status"]) for a in slow["attempts"]] == [(1, "succeeded")]
        dev.stop()
    finally:
        dev.kill()
    _books_balance(root)


def test_a_local_task_still_running_at_the_deadline_is_handed_back(tmp_path: Path) -> None:
    root = _project(tmp_path)
    dev = DevProcess(root, TICKWEAVE_DEV_STOP_GRACE_S="0.5")
    try:
        assert dev.client.post("/api/pipelines", content=SLOW_PIPELINE.format(seconds=6),
                               headers={"Content-Type": "application/yaml"}).status_code == 201
        run = dev.client.post("/api/pipelines/slow-join/runs", json={}).json()
        wait_until(lambda: dev.task_of(run["id"], "slow")["status"] == "running", 30, "`slow` did not start")
        output = dev.stop()
        assert "handed back 1 unfinished task(s)" in output
        _stopped_in_order(output)
    finally:
        dev.kill()

    dev = DevProcess(root)
    try:
        done = dev.run_until_done(run["id"])
        assert done["status"] == "succeeded", done
        slow = dev.task_of(run["id"], "slow")
        # The stopped attempt is given back, not failed, and did not spend the retry budget.
        assert [(a["attempt"], a["status"]) for a in slow["attempts"]] == [(1, "cancelled"), (2, "succeeded")]
        assert slow["attempts"][0]["error"]["code"] == "handed_back"
        assert slow["max_attempts"] == dev.task_of(run["id"], "last")["max_attempts"] + 1
        dev.stop()
    finally:
        dev.kill()
    _books_balance(root)


def _readme_block(after: str, opening: str, closing: str) -> str:
    """The text between `opening` and `closing` in the README, first found after `after`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index(opening, readme.index(after)) + len(opening)
    return readme[start:readme.index(closing, start)]


def test_the_readme_recipe_runs_your_own_task_beside_the_examples(tmp_path: Path) -> None:
    """README "Your own task against `make dev`", as written: a worker service registers its
    task with the dev stack, runs it, and an example task reads its output."""
    recipe = "**Your own task against `make dev`.**"
    root = _project(tmp_path)
    dev = DevProcess(root)
    worker_port = free_port()
    code = (_readme_block(recipe, "```python\n", "```")
            .replace("http://127.0.0.1:8000", f"http://127.0.0.1:{dev.port}")
            .replace("9000", str(worker_port)).replace('"dev-key"', f'"{DEV_KEY}"'))
    (root / "mytasks.py").write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    service = subprocess.Popen([sys.executable, "mytasks.py"], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: service.poll() is not None or any(
            w["service"] == "mytasks" for w in dev.client.get("/api/workers").json()["items"]),
            60, "the worker service did not register")
        wait_until(lambda: service.poll() is not None or _answers(f"http://127.0.0.1:{worker_port}/health"),
                   60, "the worker service did not start")
        assert service.poll() is None, service.stdout.read()  # type: ignore[union-attr]

        definition = _readme_block(recipe, "cat > shout.yaml <<'EOF'\n", "EOF\n")
        created = dev.client.post("/api/pipelines", content=definition, headers={"Content-Type": "application/yaml"})
        assert created.status_code == 201, created.text
        run = dev.client.post("/api/pipelines/shout/runs", json={}).json()
        done = dev.run_until_done(run["id"], 60)
        assert done["status"] == "succeeded", done
        first = dev.task_of(run["id"], "first")
        assert first["attempts"][0]["code_version"], first  # sent to the registered service
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{dev.moto_port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(s3={"addressing_style": "path"}))
        then = dev.task_of(run["id"], "then")["output"]["key"]
        echoed = json.loads(s3.get_object(Bucket="tickweave-outputs", Key=then)["Body"].read())
        assert echoed["inputs"] == {"first": {"text": "HI"}}
        dev.stop()
    finally:
        service.terminate()
        service.wait(timeout=30)
        dev.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
