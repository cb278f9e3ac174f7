"""Faults with real processes and connections: a tick that dies between claim and dispatch, a
worker killed mid-task, and Postgres restarted under a running 200-task run. Each asserts the
final state of every task and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from infra.postgres import (
    create_database,
    server_url,
    start_embedded_postgres,
    stop_embedded_postgres,
    with_database,
)
from infra.s3 import MotoServer
from orchestrator.db.migrate import migrate

from .conftest import WORKSPACE, Stack, running_stack, wait_until

REPO = Path(__file__).resolve().parents[2]


def set_clock(url: str, instant: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::timestamptz - now())
                        ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """, (instant,))


def tick(stack: Stack) -> dict[str, Any]:
    response = stack.client.post("/api/tick", headers={"x-tick-secret": stack.settings.tick_secret})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def attempts_of(url: str, run_id: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(url) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            """SELECT t.node_id, a.attempt, a.status FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE t.run_id = %s ORDER BY t.node_id, a.attempt""", (run_id,)).fetchall()]


def python(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_tick_killed_between_claim_and_dispatch_is_healed_by_the_lease(stack: Stack) -> None:
    url = stack.settings.database_url
    start = datetime.now(UTC)
    set_clock(url, start)
    stack.engine.create_pipeline(WORKSPACE, {"id": "lost", "nodes": [{"id": "x", "task": "echo", "heartbeat_s": 10}]})
    run = stack.engine.trigger_run(WORKSPACE, "lost", dispatch_now=False)

    # A tick process that commits its claim and dies before dispatching anything.
    dying = python(
        "import os\n"
        "from orchestrator.db.connection import connect\n"
        "from orchestrator.store.tasks import claim_ready_tasks\n"
        "conn = connect(os.environ['DATABASE_URL'])\n"
        "with conn.transaction():\n"
        "    claimed = claim_ready_tasks(conn, 10)\n"
        "print(len(claimed), flush=True)\n"
        "os._exit(9)\n",
        {"DATABASE_URL": url},
    )
    out, _ = dying.communicate(timeout=60)
    assert dying.returncode == 9 and out.strip().endswith("1"), out
    assert tick(stack)["claimed"] == 0  # claimed by the dead tick: nobody else takes it

    set_clock(url, start + timedelta(seconds=25))  # past the 2 x heartbeat lease
    summary = tick(stack)
    assert summary["expired"] == 1 and summary["claimed"] == 1
    final = stack.wait_for_run(str(run.id))
    assert final["status"] == "succeeded"
    # the lost delivery did not spend the task's only attempt
    assert attempts_of(url, str(run.id)) == [("x", 1, "dispatch_failed"), ("x", 2, "succeeded")]


def test_a_worker_killed_mid_task_is_retried_and_its_late_token_refused(stack: Stack) -> None:
    url = stack.settings.database_url
    start = datetime.now(UTC)
    set_clock(url, start)
    stack.engine.create_pipeline(WORKSPACE, {"id": "crashy", "nodes": [
        {"id": "x", "task": "echo", "heartbeat_s": 5, "retry": {"max_attempts": 2, "base_delay_s": 0}}]})

    captured: list[dict[str, Any]] = []

    class Capture:
        name = "local"

        def send(self, message: dict[str, Any]) -> None:
            captured.append(message)

        def close(self) -> None:
            pass

    real = stack.engine.transports["local"]
    stack.engine.transports["local"] = Capture()
    run = stack.engine.trigger_run(WORKSPACE, "crashy")
    stack.engine.transports["local"] = real
    (message,) = captured

    # A worker process whose `echo` hangs: it heartbeats (the task is running), then is killed.
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import json, sys, threading\n"
         "from orchestrator.worker import Worker\n"
         "w = Worker()\n"
         "@w.task('echo')\n"
         "def hang(ctx):\n"
         "    print('started', flush=True)\n"
         "    threading.Event().wait()\n"
         "w.execute(json.loads(sys.argv[1]))\n",
         json.dumps(message)],
        cwd=REPO, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "started"
    task_id = message["task_id"]
    wait_until(lambda: stack.client.get(f"/api/tasks/{task_id}").json()["status"] == "running", 30,
               "the worker's heartbeat did not mark the task running")
    worker.kill()
    worker.wait(timeout=30)

    set_clock(url, start + timedelta(seconds=15))  # past the 10 s lease: the worker is gone
    summary = tick(stack)
    assert summary["expired"] == 1 and summary["claimed"] == 1  # attempt 2 goes to the real worker
    final = stack.wait_for_run(str(run.id))
    assert final["status"] == "succeeded"
    assert attempts_of(url, str(run.id)) == [("x", 1, "expired"), ("x", 2, "succeeded")]

    late = stack.client.post(f"/api/callback/{task_id}", json={
        "token": message["token"], "status": "succeeded", "output": {"key": "whatever"}})
    assert late.status_code in (409, 422)  # attempt 1's token changes nothing
    assert stack.client.get(f"/api/tasks/{task_id}").json()["attempt"] == 2


def test_postgres_restarted_under_a_200_task_run(moto_server: MotoServer) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="tickweave-restart-")) / "pgdata"
    handle = start_embedded_postgres(data_dir)
    try:
        create_database(server_url(handle), "restart")
        url = with_database(server_url(handle), "restart")
        migrate(url)
        with running_stack(url, moto_server) as stack:
            stack.engine.create_api_key(WORKSPACE, "admin", raw_key="restart-key")
            stack.client.headers["Authorization"] = "Bearer restart-key"
            stack.engine.create_pipeline(WORKSPACE, {"id": "big", "nodes": [
                {"id": "x", "task": "echo", "heartbeat_s": 5, "retry": {"max_attempts": 5, "base_delay_s": 0}}]})
            versions = [f"v{i:03d}" for i in range(200)]
            run = stack.engine.trigger_run(WORKSPACE, "big", versions=versions)  # 100 dispatched at once

            handle.stop()  # under the running tasks and their callbacks
            handle.start()

            def finished() -> bool:
                try:
                    stack.client.post("/api/tick", headers={"x-tick-secret": stack.settings.tick_secret})
                    return bool(stack.client.get(f"/api/runs/{run.id}").json()["status"] == "succeeded")
                except Exception:
                    return False

            wait_until(finished, 120, "the run did not finish after the restart")
            _, tasks = stack.engine.get_run(WORKSPACE, run.id)
            assert sorted(t["version"] for t in tasks) == versions
            assert Counter(t["status"] for t in tasks) == {"succeeded": 200}
            succeeded = Counter(node_version for node_version, _, status in _attempts_by_version(url, run.id)
                                if status == "succeeded")
            assert succeeded == dict.fromkeys(versions, 1)  # every task ended exactly once
    finally:
        stop_embedded_postgres(handle)


def _attempts_by_version(url: str, run_id: uuid.UUID) -> list[tuple[str, int, str]]:
    with psycopg.connect(url) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            """SELECT t.version, a.attempt, a.status FROM task_attempts a JOIN tasks t ON t.id = a.task_id
               WHERE t.run_id = %s""", (run_id,)).fetchall()]
