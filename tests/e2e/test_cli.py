"""The `tickweave` CLI against the whole stack: real Postgres, moto, uvicorn and the example
worker. Most commands run in-process through `main([...])`; exit codes are also checked on a
real subprocess, as a script would see them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.s3 import free_port
from orchestrator.cli import ProgressView, main, parse_params

from .conftest import API_KEY, Stack

REPO = Path(__file__).resolve().parents[2]

DIAMOND = """\
id: diamond
params: {greeting: hi}
nodes:
  - {id: a, task: echo}
  - {id: b, task: echo, depends: [a]}
  - {id: c, task: echo, depends: [a]}
  - {id: d, task: echo, depends: [b, c]}
"""

BREAKS = {
    "id": "breaks",
    "nodes": [
        {"id": "first", "task": "echo"},
        # Fails its first attempt for good (not retryable): failed, in the DLQ; a retry succeeds.
        {"id": "boom", "task": "fail", "depends": ["first"], "params": {"times": 1, "retryable": False}},
    ],
}


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TICKWEAVE_URL", "TICKWEAVE_API_KEY", "TICKWEAVE_PUBLIC_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str, key: str = API_KEY) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--url", stack.base_url, "--api-key", key])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = cli(stack, capsys, *argv, "--json")
    return code, json.loads(out)  # stdout holds the JSON document and nothing else


def run_subprocess(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TICKWEAVE_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- apply ---------------------------------------------------------------------------------


def test_apply_creates_then_shows_a_diff_then_unchanged(stack: Stack, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    file = write(tmp_path / "diamond.yaml", DIAMOND)

    code, out, _ = cli(stack, capsys, "apply", file)
    assert code == 0
    assert "diamond: created (version 1)" in out
    assert "--- /dev/null" in out and "+id: diamond" in out

    changed = write(tmp_path / "diamond.yaml", DIAMOND.replace("greeting: hi", "greeting: hello"))
    code, out, _ = cli(stack, capsys, "apply", "--dry-run", changed)
    assert code == 0
    assert "diamond: would be updated from version 1 (dry run)" in out
    assert "-  greeting: hi" in out and "+  greeting: hello" in out
    assert stack.client.get("/api/pipelines/diamond").json()["version"] == 1  # a dry run stores nothing

    code, out, _ = cli(stack, capsys, "apply", changed)
    assert code == 0
    assert "--- diamond (version 1)" in out and f"+++ diamond ({changed})" in out
    assert "-  greeting: hi" in out and "+  greeting: hello" in out
    assert "diamond: updated to version 2" in out
    assert stack.client.get("/api/pipelines/diamond").json()["version"] == 2

    code, out, _ = cli(stack, capsys, "apply", changed)
    assert code == 0
    assert out.strip() == "diamond: unchanged (version 2)"

    code, answer = cli_json(stack, capsys, "apply", changed)
    assert code == 0
    assert answer["ok"] is True
    assert [(p["id"], p["action"], p["version"], p["diff"]) for p in answer["pipelines"]] == [
        ("diamond", "unchanged", 2, "")]


def test_apply_orders_upstream_first_and_stops_on_invalid_files(stack: Stack, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    down = write(tmp_path / "a-down.json", json.dumps(
        {"id": "down", "depends": [{"pipeline": "up", "outputs": ["report"]}], "nodes": [{"id": "x", "task": "echo"}]}))
    up = write(tmp_path / "b-up.yaml", "id: up\noutputs: {report: {from: y}}\nnodes: [{id: y, task: echo}]\n")
    code, answer = cli_json(stack, capsys, "apply", down, up)
    assert code == 0, answer
    assert [(p["id"], p["action"]) for p in answer["pipelines"]] == [("up", "created"), ("down", "created")]

    bad = write(tmp_path / "bad.yaml", "id: bad\nnodes: [{id: x, task: echo, depends: [nope]}]\n")
    fine = write(tmp_path / "fine.yaml", "id: fine\nnodes: [{id: x, task: echo}]\n")
    code, out, err = cli(stack, capsys, "apply", fine, bad)
    assert code == 1
    assert out == ""
    assert "nodes[0].depends[0]" in err and "nothing applied" in err
    assert stack.client.get("/api/pipelines/fine").status_code == 404  # all or nothing


# --- validate ------------------------------------------------------------------------------


def test_validate_good_and_bad_files(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.yaml", DIAMOND)
    code, out, _ = cli(stack, capsys, "validate", good, str(REPO / "examples" / "pipelines"))
    assert code == 0
    assert "ok       " in out and "(diamond)" in out and "(hello-diamond)" in out
    assert stack.client.get("/api/pipelines/diamond").status_code == 404  # nothing stored

    cycle = write(tmp_path / "cycle.yaml",
                  "id: cyclic\nnodes:\n  - {id: a, task: echo, depends: [b]}\n  - {id: b, task: echo, depends: [a]}\n")
    broken = write(tmp_path / "broken.yaml", "id: broken\nnodes: [ {id: a\n")
    orphan = write(tmp_path / "orphan.yaml", "id: orphan\ndepends: [{pipeline: nowhere}]\nnodes: [{id: a, task: echo}]\n")
    code, out, _ = cli(stack, capsys, "validate", good, cycle, broken, orphan)
    assert code == 1
    assert "invalid  " in out and "cycle" in out and "invalid YAML" in out

    code, answer = cli_json(stack, capsys, "validate", good, cycle, broken, orphan)
    assert code == 1
    assert answer["valid"] is False
    verdicts = {p["file"]: p for p in answer["pipelines"]}
    assert verdicts[good]["valid"] is True and verdicts[good]["errors"] == []
    assert verdicts[cycle]["valid"] is False and any("cycle" in e["message"] for e in verdicts[cycle]["errors"])
    assert verdicts[broken]["valid"] is False
    everything = json.dumps(answer)
    assert "nowhere" in everything  # the missing upstream pipeline is reported, wherever the server puts it


def test_offline_validation_works_without_a_server(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    good = write(tmp_path / "good.yaml", DIAMOND)
    bad = write(tmp_path / "bad.yaml", "id: bad\nnodes: [{id: a, task: echo, depends: [a]}]\n")

    done = run_subprocess("validate", "--offline", "--url", nowhere, good)
    assert done.returncode == 0, done.stderr
    assert "1 valid, 0 invalid (checked locally)" in done.stdout

    done = run_subprocess("--json", "validate", "--offline", good, bad, env={"TICKWEAVE_URL": nowhere})
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["checked_by"] == "local" and answer["valid"] is False
    assert [p["valid"] for p in answer["pipelines"]] == [True, False]

    done = run_subprocess("validate", "--url", nowhere, good)  # not offline: the server is needed
    assert done.returncode == 5
    assert "could not reach" in done.stderr


# --- trigger, runs, run --------------------------------------------------------------------


def test_trigger_wait_succeeds_and_runs_shows_it(stack: Stack, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(stack, capsys, "apply", write(tmp_path / "d.yaml", DIAMOND))[0] == 0

    code, out, _ = cli(stack, capsys, "trigger", "diamond", "--wait", "--interval", "0.05", "--timeout", "120",
                       "--param", "who=cli", "--param", "n=3")
    assert code == 0, out
    # Not a terminal: appended lines, one per change of a task's status.
    lines = out.splitlines()
    assert any(line.endswith("d succeeded (attempt 1/1)") for line in lines), out
    assert "\x1b[" not in out
    assert lines[-1].startswith("run ") and " succeeded" in lines[-1]
    run_id = lines[-1].split()[1]

    code, run = cli_json(stack, capsys, "run", run_id)
    assert code == 0
    assert run["status"] == "succeeded" and run["params"] == {"who": "cli", "n": 3}
    assert {t["node"]: t["status"] for t in run["tasks"]} == dict.fromkeys("abcd", "succeeded")

    code, out, _ = cli(stack, capsys, "run", run_id)
    assert code == 0
    assert f"run {run_id}  diamond v1  succeeded" in out
    assert "NODE" in out and "a     default" in out

    code, out, _ = cli(stack, capsys, "runs", "--pipeline", "diamond")
    assert code == 0
    assert run_id in out and "succeeded" in out and "manual" in out
    code, page = cli_json(stack, capsys, "runs", "--status", "succeeded", "--limit", "5")
    assert code == 0
    assert [r["id"] for r in page["items"]] == [run_id]

    code, run = cli_json(stack, capsys, "trigger", "diamond", "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 0
    assert run["status"] == "succeeded" and len(run["tasks"]) == 4


def test_trigger_without_wait_versions_and_idempotency(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert stack.client.post("/api/pipelines", json={
        "id": "gated", "versions": ["v1", "v2", "v3"],
        "nodes": [{"id": "gate", "kind": "manual"}, {"id": "after", "task": "echo", "depends": ["gate"]}]}).status_code == 201

    code, run = cli_json(stack, capsys, "trigger", "gated", "--versions", "v1,v3", "--idempotency-key", "k-1")
    assert code == 0
    assert run["versions"] == ["v1", "v3"] and run["created"] is True
    code, again = cli_json(stack, capsys, "trigger", "gated", "--versions", "v1,v3", "--idempotency-key", "k-1")
    assert again["id"] == run["id"] and again["created"] is False

    # The gate waits for a person: the watch gives up at the timeout, and the run goes on.
    code, out, err = cli(stack, capsys, "run", run["id"], "--wait", "--timeout", "0.2", "--interval", "0.05")
    assert code == 124
    assert "timed out" in err and "the run goes on" in err
    assert "gate[v1] waiting" in out


def test_trigger_wait_failure_then_dlq_list_and_retry(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert stack.client.post("/api/pipelines", json=BREAKS).status_code == 201

    code, out, _ = cli(stack, capsys, "trigger", "breaks", "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 1
    assert "boom failed (attempt 1/1): failing on purpose" in out
    assert out.splitlines()[-1].split()[2] == "failed"

    code, run = cli_json(stack, capsys, "trigger", "breaks", "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 1
    assert run["status"] == "failed"

    code, page = cli_json(stack, capsys, "dlq", "list", "--pipeline", "breaks")
    assert code == 0
    assert len(page["items"]) == 2 and {e["node_id"] for e in page["items"]} == {"boom"}
    entry = next(e for e in page["items"] if e["run_id"] == run["id"])

    code, out, _ = cli(stack, capsys, "dlq", "list")
    assert code == 0
    assert entry["id"] in out and "failing on purpose" in out

    code, out, _ = cli(stack, capsys, "dlq", "retry", entry["id"])
    assert code == 0
    assert f"run {run['id']} is" in out
    code, after = cli_json(stack, capsys, "run", run["id"], "--wait", "--interval", "0.05", "--timeout", "120")
    assert code == 0  # the retry is attempt 2, which the `fail` task lets succeed
    assert after["status"] == "succeeded"

    code, out, err = cli(stack, capsys, "dlq", "retry", entry["id"])
    assert code == 1  # already retried: a conflict
    assert "already retried" in err
    code, page = cli_json(stack, capsys, "dlq", "list", "--pipeline", "breaks")
    assert [e["id"] for e in page["items"]] != [] and entry["id"] not in [e["id"] for e in page["items"]]


# --- errors and exit codes -----------------------------------------------------------------


def test_errors_map_to_documented_exit_codes(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(stack, capsys, "runs", key="not-a-key")
    assert code == 4 and out == ""
    assert err.startswith("error: ")

    code, out, err = cli(stack, capsys, "trigger", "no-such-pipeline")
    assert code == 3 and out == ""
    assert "no-such-pipeline" in err

    code, _, err = cli(stack, capsys, "run", "00000000-0000-0000-0000-000000000000")
    assert code == 3
    code, _, err = cli(stack, capsys, "dlq", "retry", "not-a-uuid")
    assert code == 3

    code, _, err = cli(stack, capsys, "trigger", "diamond", "--param", "no-equals-sign")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = cli(stack, capsys, "apply", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such file" in err
    assert main(["runs", "--limit", "0"]) == 2  # argparse usage error, returned not raised

    code, _, err = cli(stack, capsys, "dlq", "list", "--cursor", "not-a-cursor")
    assert code == 2  # the API rejected the request (422)
    assert err.startswith("error: cursor is not one this API returned")


def test_exit_codes_seen_by_a_script(stack: Stack) -> None:
    base = ["--url", stack.base_url]
    done = run_subprocess("runs", *base, "--api-key", "wrong")
    assert done.returncode == 4 and done.stdout == ""
    assert "error:" in done.stderr

    done = run_subprocess("runs", *base)  # no key at all
    assert done.returncode == 4
    assert "TICKWEAVE_API_KEY" in done.stderr

    done = run_subprocess("trigger", "nope", *base, env={"TICKWEAVE_API_KEY": API_KEY})
    assert done.returncode == 3
    assert "nope" in done.stderr

    stack.client.post("/api/pipelines", content=DIAMOND, headers={"Content-Type": "application/yaml"})
    done = run_subprocess("trigger", "diamond", "--wait", "--interval", "0.05", "--timeout", "120", "--json", *base,
                          env={"TICKWEAVE_API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"

    done = run_subprocess("runs", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", API_KEY)
    assert done.returncode == 5
    assert "could not reach" in done.stderr


# --- the progress display ------------------------------------------------------------------


def _snapshot(status: str, tasks: dict[str, str]) -> dict[str, Any]:
    return {"id": "r1", "pipeline_id": "p", "pipeline_version": 1, "status": status,
            "created_at": "2026-11-28T10:00:00Z", "started_at": "2026-11-28T10:00:00Z",
            "finished_at": "2026-11-28T10:00:02Z" if status in ("succeeded", "failed") else None,
            "tasks": [{"id": n, "node": n, "version": "default", "status": s, "attempt": 1 if s != "pending" else 0,
                       "max_attempts": 1, "error": None, "message": None} for n, s in tasks.items()]}


def test_progress_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    screen = io.StringIO()
    view = ProgressView(screen, tty=True)
    view.update(_snapshot("running", {"a": "running", "b": "pending"}))
    first = screen.getvalue()
    assert first.startswith("\x1b[2Krun r1  p v1  running")  # the first frame starts where the cursor is
    assert first.count("\n") == 3  # header + a line per task
    view.update(_snapshot("running", {"a": "succeeded", "b": "running"}))
    second = screen.getvalue()[len(first):]
    assert second.startswith("\x1b[3F")  # back up over the three lines drawn, then redraw them
    assert second.count("\x1b[2K") == 3 and "succeeded" in second


def test_progress_appends_changes_when_not_a_terminal() -> None:
    log = io.StringIO()
    view = ProgressView(log, tty=False)
    view.update(_snapshot("running", {"a": "running", "b": "pending"}))
    view.update(_snapshot("running", {"a": "running", "b": "pending"}))  # nothing changed: nothing printed
    view.finish(_snapshot("succeeded", {"a": "succeeded", "b": "succeeded"}))
    lines = [line.split(" ", 1)[1] for line in log.getvalue().splitlines()[:-1]]
    assert lines == ["run r1: p v1, 2 tasks, running", "  a running (attempt 1/1)", "  b pending",
                     "  a succeeded (attempt 1/1)", "  b succeeded (attempt 1/1)", "run r1: succeeded"]
    assert log.getvalue().splitlines()[-1] == "run r1 succeeded in 2.0s"
    assert "\x1b[" not in log.getvalue()


def test_param_values_are_json_when_they_parse() -> None:
    assert parse_params(["n=3", "flag=true", "day=2026-11-28", "s=\"3\"", "l=[1,2]", "e="]) == {
        "n": 3, "flag": True, "day": "2026-11-28", "s": "3", "l": [1, 2], "e": ""}



def test_server_validation_answers_are_mapped_to_the_files(tmp_path: Path) -> None:
    import httpx

    from orchestrator.cli import load_documents, validate_documents
    from orchestrator.client import TickweaveClient

    seen: list[Any] = []

    def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/pipelines/validate"
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={
            "valid": False,
            "pipelines": [{"id": "one", "valid": True, "errors": []},
                          {"id": "two", "valid": False, "errors": [{"path": "nodes[0].task", "message": "no"}]}],
            "errors": [{"path": "two.depends[0].pipeline", "message": "missing"}]})

    one = write(tmp_path / "one.yaml", "id: one\nnodes: [{id: a, task: echo}]\n")
    two = write(tmp_path / "two.json", '{"id": "two", "nodes": [{"id": "a", "task": "echo"}]}')
    broken = write(tmp_path / "broken.yaml", "id: [\n")
    client = TickweaveClient("http://api.invalid", "k", transport=httpx.MockTransport(server))
    validation = validate_documents(load_documents([one, two, broken]), client)
    assert [d["id"] for d in seen[0]["pipelines"]] == ["one", "two"]  # what did not parse is not sent
    assert validation.checked_by == "server" and not validation.valid
    assert [(r["file"], r["valid"]) for r in validation.results] == [(one, True), (two, False), (broken, False)]
    assert validation.results[1]["errors"] == [{"path": "nodes[0].task", "message": "no"}]
    assert validation.errors == [{"path": "two.depends[0].pipeline", "message": "missing"}]
