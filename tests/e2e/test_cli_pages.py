"""`tickweave run` and the `--wait` progress on a run bigger than one page (issue 17): counts by
status and by node from the run answer, tasks a page at a time, never the whole list."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from orchestrator.cli import ProgressView, main

from .conftest import API_KEY, WORKSPACE, Stack

VERSIONS = [f"v{i:03d}" for i in range(50)]
GATED = {
    "id": "gated-many", "versions": VERSIONS,
    "nodes": [{"id": "extract", "task": "echo"}, {"id": "gate", "kind": "approval"},
              {"id": "load", "task": "echo", "depends": ["extract", "gate"]}],
}


def cli(stack: Stack, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*argv, "--url", stack.base_url, "--api-key", API_KEY])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TICKWEAVE_URL", "TICKWEAVE_API_KEY", "TICKWEAVE_PUBLIC_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def test_run_shows_counts_and_pages_through_the_tasks(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    stack.engine.create_pipeline(WORKSPACE, GATED)
    run_id = str(stack.engine.trigger_run(WORKSPACE, "gated-many", dispatch_now=False).id)

    code, out, _ = cli(stack, capsys, "run", run_id)
    assert code == 0, out
    assert "  tasks     150: ready 50, waiting 50, pending 50" in out
    assert "NODE     TASKS  BY STATUS" in out and "gate     50     waiting 50" in out
    assert out.count(" ready ") + out.count(" waiting ") + out.count(" pending ") >= 100  # the first page
    assert "more: --cursor " in out

    seen: list[dict[str, Any]] = []
    cursor: list[str] = []
    while True:
        code, out, _ = cli(stack, capsys, "run", run_id, "--node", "load", "--status", "pending", "--limit", "20",
                           "--json", *cursor)
        assert code == 0
        page = json.loads(out)
        assert page["counts"] == {"ready": 50, "waiting": 50, "pending": 50}
        seen += page["tasks"]
        if not page["tasks_next_cursor"]:
            break
        cursor = ["--cursor", page["tasks_next_cursor"]]
    assert [t["version"] for t in seen] == VERSIONS and {t["node"] for t in seen} == {"load"}

    code, out, err = cli(stack, capsys, "run", run_id, "--status", "nope")
    assert code == 2 and "invalid choice" in err


def _big_snapshot(status: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": "r1", "pipeline_id": "p", "pipeline_version": 1, "status": status, "versions": ["a", "b"],
            "created_at": "2026-11-28T10:00:00Z", "started_at": "2026-11-28T10:00:00Z", "finished_at": None,
            "task_count": 100_000, "node_count": 50_000, "counts": counts,
            "nodes": [{"node": "first", "position": 0, "tasks": 2, "counts": {"running": 2}}],
            "nodes_next_cursor": "x", "tasks": [{"id": "t", "node": "first", "version": "a", "status": "running",
                                                  "attempt": 1, "max_attempts": 1}], "tasks_next_cursor": "y"}


def test_progress_of_a_big_run_is_its_counts_not_a_line_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    screen = io.StringIO()
    ProgressView(screen, tty=True).update(_big_snapshot("running", {"running": 2, "pending": 99_998}))
    frame = screen.getvalue()
    assert "0/100000 tasks" in frame and "running 2, pending 99998" in frame
    assert "first       2 tasks  running 2" in frame and "49999 more nodes" in frame

    log = io.StringIO()
    view = ProgressView(log, tty=False)
    view.update(_big_snapshot("running", {"running": 2, "pending": 99_998}))
    view.update(_big_snapshot("running", {"running": 2, "pending": 99_998}))  # no change, no line
    view.update(_big_snapshot("running", {"succeeded": 2, "running": 1, "pending": 99_997}))
    lines = [line.split(" ", 1)[1] for line in log.getvalue().splitlines()]
    assert lines == ["run r1: p v1, 100000 tasks, running", "  tasks: running 2, pending 99998",
                     "  tasks: running 1, pending 99997, succeeded 2"]
