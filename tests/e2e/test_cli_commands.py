"""The `tickweave` commands for what the API does beyond trigger and watch (issue 18): the DLQ
as a readable table and whole records, approvals and manual steps, cancel and retry,
templates, keys (through the API, so a second workspace needs no database access), workers,
pipelines (list, show, delete) and task logs. Each against the whole stack; each with the
errors a person meets: an unknown id (exit 3) and a missing key (exit 4), saying what to fix."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from infra.s3 import free_port
from orchestrator.cli import main
from orchestrator.worker import TaskContext, Worker

from .conftest import API_KEY, WORKSPACE, Stack, wait_until

NOBODY = "00000000-0000-0000-0000-000000000000"

APPROVAL = {"id": "gated", "nodes": [{"id": "gate", "kind": "approval"},
                                     {"id": "after", "task": "echo", "depends": ["gate"]}]}
MANUAL = {"id": "by-hand", "nodes": [{"id": "step", "kind": "manual"},
                                     {"id": "after", "task": "echo", "depends": ["step"]}]}
# `list-files` with a count that is not a number raises ValueError: an error with a traceback,
# twice (two attempts, no delay between them), then dead-lettered.
CRASHES = {"id": "crashes", "nodes": [
    {"id": "list", "task": "list-files", "params": {"count": "many"},
     "retry": {"max_attempts": 2, "backoff": "fixed", "base_delay_s": 0}}]}
# Fails its first attempt for good; a retry (attempt 2) succeeds.
BREAKS = {"id": "breaks", "nodes": [
    {"id": "first", "task": "echo"},
    {"id": "boom", "task": "fail", "depends": ["first"], "params": {"times": 1, "retryable": False}}]}


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("TICKWEAVE_URL", "TICKWEAVE_API_KEY", "TICKWEAVE_PUBLIC_URL", "NO_COLOR", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str,
        key: str | None = API_KEY) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--url", stack.base_url, *(["--api-key", key] if key is not None else [])])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str, key: str = API_KEY) -> tuple[int, Any]:
    code, out, err = cli(stack, capsys, *argv, "--json", key=key)
    assert out, err
    return code, json.loads(out)  # stdout holds the JSON document and nothing else


def create(stack: Stack, definition: dict[str, Any]) -> None:
    response = stack.client.post("/api/pipelines", json=definition)
    assert response.status_code == 201, response.text


def trigger(stack: Stack, pipeline: str) -> str:
    response = stack.client.post(f"/api/pipelines/{pipeline}/runs", json={})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def waiting_task(stack: Stack, run_id: str, node: str) -> str:
    """The id of the run's task of `node` once it waits for a person."""
    def probe() -> str | None:
        tasks = stack.client.get(f"/api/runs/{run_id}").json()["tasks"]
        return next((str(t["id"]) for t in tasks if t["node"] == node and t["status"] == "waiting"), None)

    return str(wait_until(probe, 30, f"{node} of run {run_id} did not wait"))


def assert_needs_key(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> None:
    code, out, err = cli(stack, capsys, *argv, key=None)
    assert code == 4, (argv, err)
    assert out == ""
    assert "TICKWEAVE_API_KEY" in err and "--api-key" in err, err


def assert_unknown(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str, words: str = "not found") -> None:
    code, out, err = cli(stack, capsys, *argv)
    assert code == 3, (argv, err)
    assert out == ""
    assert err.startswith("error: ") and words in err, err


# --- approvals and manual steps ------------------------------------------------------------


def test_approve_and_reject_an_approval(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, APPROVAL)
    first, second = trigger(stack, "gated"), trigger(stack, "gated")
    gate = waiting_task(stack, first, "gate")

    # `run --status waiting` is how a person finds the approval's task id.
    code, out, _ = cli(stack, capsys, "run", first, "--status", "waiting")
    assert code == 0 and gate in out

    code, out, _ = cli(stack, capsys, "task", gate)
    assert code == 0
    assert f"task {gate}  gate[default]  waiting" in out

    code, out, _ = cli(stack, capsys, "approve", gate, "--comment", "numbers look right")
    assert code == 0, out
    assert out.startswith("approved: the task is succeeded;") and first in out
    assert stack.wait_for_run(first)["status"] == "succeeded"

    code, _, err = cli(stack, capsys, "approve", gate)
    assert code == 1  # decided already: a conflict
    assert err.startswith("error: ")

    other = waiting_task(stack, second, "gate")
    code, answer = cli_json(stack, capsys, "reject", other, "--comment", "not today")
    assert code == 0
    assert answer["task_status"] == "failed" and answer["run_id"] == second
    assert stack.wait_for_run(second)["status"] == "failed"

    assert_unknown(stack, capsys, "approve", NOBODY)
    assert_unknown(stack, capsys, "reject", NOBODY)
    assert_unknown(stack, capsys, "task", NOBODY)
    assert_needs_key(stack, capsys, "approve", gate)
    assert_needs_key(stack, capsys, "reject", gate)


def test_complete_a_manual_step_then_cancel_and_retry_runs(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, MANUAL)
    done, failed = trigger(stack, "by-hand"), trigger(stack, "by-hand")

    code, out, _ = cli(stack, capsys, "complete", waiting_task(stack, done, "step"), "--comment", "uploaded")
    assert code == 0, out
    assert out.startswith("completed: the task is succeeded;")
    assert stack.wait_for_run(done)["status"] == "succeeded"

    code, answer = cli_json(stack, capsys, "complete", waiting_task(stack, failed, "step"), "--failed")
    assert code == 0 and answer["task_status"] == "failed"
    assert stack.wait_for_run(failed)["status"] == "failed"

    # Retry (redrive) the failed run: the manual step waits for a person again; then cancel it.
    code, out, _ = cli(stack, capsys, "retry", failed)
    assert code == 0, out
    assert out.startswith(f"run {failed} running: 2 task(s) to run again")  # the step, and the step after it
    waiting_task(stack, failed, "step")
    code, run = cli_json(stack, capsys, "cancel", failed)
    assert code == 0 and run["status"] == "cancelled"

    code, _, err = cli(stack, capsys, "cancel", failed)
    assert code == 1 and "only pending or running runs can be cancelled" in err
    code, _, err = cli(stack, capsys, "retry", done)
    assert code == 1 and "only a failed run can be retried" in err

    assert_unknown(stack, capsys, "complete", NOBODY)
    assert_unknown(stack, capsys, "cancel", NOBODY)
    assert_unknown(stack, capsys, "retry", NOBODY)
    assert_needs_key(stack, capsys, "complete", NOBODY)
    assert_needs_key(stack, capsys, "cancel", failed)
    assert_needs_key(stack, capsys, "retry", failed)


def test_retry_wait_follows_the_redriven_run(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, BREAKS)
    run_id = trigger(stack, "breaks")
    assert stack.wait_for_run(run_id)["status"] == "failed"
    code, out, _ = cli(stack, capsys, "retry", run_id, "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 0, out  # the retry is attempt 2, which the `fail` task lets succeed
    assert out.splitlines()[-1].startswith(f"run {run_id} succeeded")


# --- dead letters --------------------------------------------------------------------------


def test_dlq_list_is_a_table_and_show_prints_the_whole_record(stack: Stack,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, CRASHES)
    run_id = trigger(stack, "crashes")
    assert stack.wait_for_run(run_id)["status"] == "failed"

    code, page = cli_json(stack, capsys, "dlq", "list")
    assert code == 0
    (entry,) = page["items"]  # --json is the API's answer, untouched
    assert entry["run_id"] == run_id and "Traceback" in json.dumps(entry)

    code, out, _ = cli(stack, capsys, "dlq", "list")
    assert code == 0
    header, line, *rest = out.splitlines()
    assert header.split() == ["ID", "PIPELINE", "NODE", "TASK", "ATTEMPTS", "WHEN", "(UTC)", "LAST", "ERROR"]
    assert rest == []  # one line per entry, whatever its error and attempts hold
    assert line.split()[:5] == [entry["id"], "crashes", "list", "list-files", "2"]
    assert line.endswith("invalid literal for int() with base 10: 'many'")
    assert "Traceback" not in out and "[{" not in out and "{'" not in out

    code, out, _ = cli(stack, capsys, "dlq", "show", entry["id"])
    assert code == 0, out
    assert out.startswith(f"dead letter {entry['id']}\n")
    assert f"run       {run_id}" in out and "attempts  2" in out
    assert out.count("Traceback (most recent call last)") == 3  # the last error, and each attempt's
    assert "ValueError: invalid literal for int() with base 10: 'many'" in out

    # `dlq show --json` is GET /api/dlq/{id}: the whole entry.
    direct = stack.client.get(f"/api/dlq/{entry['id']}")
    assert direct.status_code == 200, direct.text
    code, shown = cli_json(stack, capsys, "dlq", "show", entry["id"])
    assert code == 0 and shown == direct.json()
    assert len(shown["attempts"]) == 2

    assert_unknown(stack, capsys, "dlq", "show", NOBODY)
    assert_unknown(stack, capsys, "dlq", "retry", NOBODY)
    assert_needs_key(stack, capsys, "dlq", "show", entry["id"])
    assert_needs_key(stack, capsys, "dlq", "retry", entry["id"])


# --- templates -----------------------------------------------------------------------------


def test_templates_create_list_show_update(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "greet.yaml"
    file.write_text("id: greet\ndescription: say hello\ntask: echo\nparams: {greeting: hello}\n")

    code, out, _ = cli(stack, capsys, "templates", "create", str(file))
    assert code == 0, out
    assert out.strip() == "template greet: created (version 1)"

    code, out, _ = cli(stack, capsys, "templates", "list")
    assert code == 0
    assert out.splitlines()[1].split()[:3] == ["greet", "v1", "echo"] and "say hello" in out

    file.write_text("id: greet\ndescription: say hello\ntask: echo\nparams: {greeting: bonjour}\n")
    code, out, _ = cli(stack, capsys, "templates", "update", str(file))
    assert code == 0
    assert out.startswith("template greet: updated to version 2")
    code, out, _ = cli(stack, capsys, "templates", "update", str(file))
    assert code == 0 and out.strip() == "template greet: unchanged (version 2)"

    code, out, _ = cli(stack, capsys, "templates", "show", "greet")
    assert code == 0
    assert out.startswith("template greet  v2  task echo") and "greeting: bonjour" in out
    code, shown = cli_json(stack, capsys, "templates", "show", "greet")
    assert code == 0 and shown["version"] == 2 and shown["body"]["params"] == {"greeting": "bonjour"}

    assert_unknown(stack, capsys, "templates", "show", "nope")
    (tmp_path / "nope.yaml").write_text("id: nope\ntask: echo\n")
    assert_unknown(stack, capsys, "templates", "update", str(tmp_path / "nope.yaml"))
    assert_needs_key(stack, capsys, "templates", "create", str(file))
    code, _, err = cli(stack, capsys, "templates", "create", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: no such file" in err


# --- keys ----------------------------------------------------------------------------------


def test_keys_through_the_api_and_a_second_workspace(stack: Stack, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, made = cli_json(stack, capsys, "keys", "create", "--role", "operator", "--name", "ci")
    assert code == 0
    assert made["role"] == "operator" and made["workspace"] == WORKSPACE and made["name"] == "ci"
    assert stack.client.get("/api/runs", headers={"Authorization": f"Bearer {made['key']}"}).status_code == 200

    code, out, _ = cli(stack, capsys, "keys", "list")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(str(made["id"])))
    assert line.split()[2:5] == ["operator", "ci", *line.split()[4:5]] and line.endswith("active")

    code, out, _ = cli(stack, capsys, "keys", "revoke", str(made["id"]))
    assert code == 0 and "revoked" in out
    code, _, err = cli(stack, capsys, "runs", key=str(made["key"]))
    assert code == 4  # the revoked key no longer opens the API
    code, _, err = cli(stack, capsys, "keys", "revoke", str(made["id"]))
    assert code == 1 and "already revoked" in err
    assert_unknown(stack, capsys, "keys", "revoke", NOBODY)
    assert_needs_key(stack, capsys, "keys", "create")
    assert_needs_key(stack, capsys, "keys", "list")
    code, _, err = cli(stack, capsys, "keys", "list", key=str(made["key"]))
    assert code == 4

    # A second workspace: its first admin key from the database, the rest through the API with it.
    monkeypatch.setenv("DATABASE_URL", stack.settings.database_url)
    code, first = cli_json(stack, capsys, "keys", "create", "--workspace", "second", "--name", "bootstrap")
    assert code == 0 and first["workspace"] == "second" and first["role"] == "admin"
    monkeypatch.delenv("DATABASE_URL")
    code, operator = cli_json(stack, capsys, "keys", "create", "--role", "operator", key=str(first["key"]))
    assert code == 0 and operator["workspace"] == "second"
    code, listed = cli_json(stack, capsys, "keys", "list", key=str(first["key"]))
    assert {k["id"] for k in listed["items"]} == {first["id"], operator["id"]}


# --- workers -------------------------------------------------------------------------------


def test_workers_list_shows_health_and_last_seen(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(stack, capsys, "workers", "list")
    assert code == 0 and out.strip() == "no worker has registered in this workspace"

    registered = stack.client.post("/api/workers/register", json={
        "service": "renderer", "version": "1.2.0", "transport": "http", "endpoint": "http://127.0.0.1:9/dispatch",
        "tasks": [{"name": "render", "code_hash": "sha256:" + "0" * 64}]})
    assert registered.status_code == 200, registered.text

    code, listed = cli_json(stack, capsys, "workers", "list")
    assert code == 0
    (worker,) = listed["items"]
    code, out, _ = cli(stack, capsys, "workers", "list")
    assert code == 0
    header, line = out.splitlines()
    assert header.split()[:5] == ["SERVICE", "VERSION", "TRANSPORT", "HEALTH", "LAST"]
    assert worker["health"] == "healthy"  # just registered
    assert line.split()[:4] == ["renderer", "1.2.0", "http", "healthy"]
    assert line.split()[4] == str(worker["last_seen_at"])[:10]  # the date of the last-seen time shown
    assert "render" in line and "http://127.0.0.1:9/dispatch" in line


# --- pipelines -----------------------------------------------------------------------------


def test_pipelines_list_show_pause_resume(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, {**BREAKS, "description": "fails once", "schedule": "0 3 * * *"})
    code, out, _ = cli(stack, capsys, "pipelines", "list")
    assert code == 0
    header, line = out.splitlines()
    assert header.split() == ["PIPELINE", "NAME", "VERSION", "STATE", "NEXT", "RUN", "(UTC)", "DESCRIPTION"]
    assert line.split()[:4] == ["breaks", "-", "v1", "active"] and line.endswith("fails once")

    code, out, _ = cli(stack, capsys, "pipelines", "pause", "breaks")
    assert code == 0 and out.startswith("pipeline breaks is paused")
    code, out, _ = cli(stack, capsys, "pipelines", "show", "breaks")
    assert code == 0
    assert out.startswith("pipeline breaks  v1  paused") and "schedule     0 3 * * * (UTC)" in out
    assert "- id: boom" in out  # the definition, as YAML
    code, shown = cli_json(stack, capsys, "pipelines", "resume", "breaks")
    assert code == 0 and shown["paused"] is False

    assert_unknown(stack, capsys, "pipelines", "show", "nope")
    assert_unknown(stack, capsys, "pipelines", "pause", "nope")
    assert_needs_key(stack, capsys, "pipelines", "pause", "breaks")


def test_pipeline_names_and_delete(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, {**MANUAL, "name": "Upload by hand"})
    code, out, _ = cli(stack, capsys, "pipelines", "list")
    assert code == 0 and out.splitlines()[1].split()[:5] == ["by-hand", "Upload", "by", "hand", "v1"]
    code, out, _ = cli(stack, capsys, "pipelines", "show", "by-hand")
    assert code == 0 and out.startswith("pipeline by-hand  (Upload by hand)  v1")

    run_id = trigger(stack, "by-hand")
    waiting_task(stack, run_id, "step")
    code, _, err = cli(stack, capsys, "pipelines", "delete", "by-hand")
    assert code == 1  # a run is active: refused, and the message says how to go on
    assert "--cancel-runs" in err
    code, out, _ = cli(stack, capsys, "pipelines", "delete", "by-hand", "--cancel-runs")
    assert code == 0, out
    assert out.strip() == "pipeline by-hand deleted; 1 active run(s) cancelled; its runs and outputs stay readable"
    assert stack.client.get(f"/api/runs/{run_id}").json()["status"] == "cancelled"
    code, out, _ = cli(stack, capsys, "pipelines", "list")
    assert code == 0 and "by-hand" not in out

    assert_unknown(stack, capsys, "pipelines", "delete", "by-hand")
    assert_needs_key(stack, capsys, "pipelines", "delete", "by-hand")


# --- runs that succeeded with failures -----------------------------------------------------


def test_runs_that_succeeded_with_failures_say_so(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, {"id": "tolerant", "nodes": [
        {"id": "first", "task": "echo"},
        {"id": "flaky", "task": "fail", "depends": ["first"], "on_failure": "continue",
         "params": {"times": 1, "retryable": False}},
        {"id": "last", "task": "echo", "depends": ["first"]}]})
    code, out, _ = cli(stack, capsys, "trigger", "tolerant", "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 0, out  # it succeeded: the failure was tolerated
    last = out.splitlines()[-1]
    run_id = last.split()[1]
    assert last.startswith(f"run {run_id} succeeded with failures (1 failed)")

    code, out, _ = cli(stack, capsys, "runs", "--pipeline", "tolerant")
    assert code == 0 and "succeeded with failures (1 failed)" in out.splitlines()[1]
    code, out, _ = cli(stack, capsys, "run", run_id)
    assert code == 0 and out.startswith(f"run {run_id}  tolerant v1  succeeded with failures (1 failed)")
    assert "failed (in DLQ)" in out


# --- task logs -----------------------------------------------------------------------------


@pytest.fixture
def chatty_service(stack: Stack) -> Iterator[None]:
    """A worker service with a task that logs and prints, across a heartbeat (the log is
    flushed on heartbeats while the attempt runs)."""
    worker = Worker(settings=stack.settings)

    @worker.task("chatty")
    def chatty(ctx: TaskContext) -> dict[str, Any]:
        logging.getLogger("chatty").warning("starting on %s", ctx.version)
        ctx.heartbeat(progress=0.5, message="half way")
        threading.Event().wait(0.5)  # the task's own work: long enough to be read while it runs
        print("héllo from print")
        logging.getLogger("chatty").warning("done")
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(worker.asgi_app(settings=stack.settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "the worker service did not start")
    worker.register(stack.base_url, API_KEY, service="chatty", version="1.0.0", transport="http",
                    endpoint=f"http://127.0.0.1:{port}/dispatch")
    yield
    server.should_exit = True
    thread.join(timeout=15)


def test_logs_prints_and_follows_an_attempts_log(stack: Stack, chatty_service: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    create(stack, {"id": "talks", "nodes": [{"id": "speak", "task": "chatty"}]})
    run_id = trigger(stack, "talks")
    task_id = str(stack.client.get(f"/api/runs/{run_id}").json()["tasks"][0]["id"])

    code, followed, _ = cli(stack, capsys, "logs", task_id, "--follow", "--interval", "0.05")
    assert code == 0, followed
    assert followed.index("starting on default") < followed.index("done")
    assert stack.wait_for_run(run_id)["status"] == "succeeded"

    code, whole, _ = cli(stack, capsys, "logs", task_id, "--attempt", "1")
    assert code == 0
    assert whole.index("starting on default") < whole.index("héllo from print") < whole.index("done")
    # The task runs in this process: its print also reached the captured stdout while following.
    printed = "héllo from print\n"
    assert followed.replace(printed, "") == whole.replace(printed, "")  # read piece by piece, the same log
    code, answer = cli_json(stack, capsys, "logs", task_id)
    assert code == 0 and answer["attempt"] == 1 and answer["complete"] is True and answer["log"] == whole

    assert_unknown(stack, capsys, "logs", task_id, "--attempt", "7", words="has no attempt 7")
    assert_unknown(stack, capsys, "logs", NOBODY)
    assert_needs_key(stack, capsys, "logs", task_id)
