"""`tickweave run` and the `--wait` progress on a run bigger than one page (issue 17): counts by
status and by node from the run answer, tasks a page at a time, never the whole list. A mapped
node (issue 19) is one line counting its items, and `--node` pages through its items."""

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


# --- mapped nodes (issue 19): the progress and `tickweave run` count a mapped node's items ----------


def _map_snapshot(items: dict[str, int], *, whole: bool) -> dict[str, Any]:
    summary = {"over": "list.files", "width": 1000, "max_concurrency": 50, "tolerated_failures": 0, "items": items}
    map_task = {"id": "m", "node": "parse", "version": "default", "kind": "map", "status": "running", "attempt": 0,
                "max_attempts": 1, "map": summary}
    item = {"id": "i0", "node": "parse", "version": "default", "kind": "task", "status": "succeeded", "attempt": 1,
            "max_attempts": 1, "map_index": 0, "map_item": "a.csv", "map_parent_id": "m"}
    listing = {"id": "l", "node": "list", "version": "default", "kind": "task", "status": "succeeded", "attempt": 1,
               "max_attempts": 1}
    counts = {"succeeded": 1 + items.get("succeeded", 0), "running": 1 + items.get("running", 0),
              "failed": items.get("failed", 0)}
    return {"id": "r1", "pipeline_id": "p", "pipeline_version": 1, "status": "running", "versions": ["default"],
            "created_at": "2026-11-28T10:00:00Z", "started_at": "2026-11-28T10:00:00Z", "finished_at": None,
            "task_count": 1002 if not whole else 3, "item_count": 1000, "node_count": 2, "counts": counts,
            "nodes": [{"node": "list", "position": 0, "kind": "task", "tasks": 1, "counts": {"succeeded": 1}},
                      {"node": "parse", "position": 1, "kind": "map", "tasks": 1, "counts": {"running": 1},
                       "map": summary}],
            "nodes_next_cursor": None, "tasks": [listing, map_task, item] if whole else [listing, map_task],
            "tasks_next_cursor": None if whole else "y"}


def test_progress_counts_a_mapped_nodes_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    items = {"succeeded": 980, "failed": 2, "dead": 1, "running": 10, "dispatched": 7}
    screen = io.StringIO()
    ProgressView(screen, tty=True).update(_map_snapshot(items, whole=False))
    frame = screen.getvalue()
    assert "(1,000 map items)" in frame
    assert "parse  map  1,000 items: 980 succeeded, 3 failed, 17 running" in frame

    # Every task listed: a line per node-level task, the mapped one with its items, no line per item.
    lines = ProgressView(io.StringIO(), tty=True).lines(_map_snapshot(items, whole=True), color=False)
    assert any(line.split() == ["parse", "running", "map", "1,000", "items:", "980", "succeeded,", "3", "failed,",
                                "17", "running"] for line in lines), lines
    assert not [line for line in lines if "#0" in line]

    log = io.StringIO()
    view = ProgressView(log, tty=False)
    view.update(_map_snapshot(items, whole=True))
    view.update(_map_snapshot(items, whole=True))  # no change, no line
    view.update(_map_snapshot({**items, "succeeded": 981, "dispatched": 6}, whole=True))
    lines = [line.split(" ", 1)[1] for line in log.getvalue().splitlines()]
    assert [line for line in lines if "parse" in line] == [
        "  parse running: map  1,000 items: 980 succeeded, 3 failed, 17 running",
        "  parse running: map  1,000 items: 981 succeeded, 3 failed, 16 running"]


MAPPED = {
    "id": "mapped", "params": {"files": [f"f{i:03d}.csv" for i in range(120)]},
    "nodes": [{"id": "prep", "task": "nothing-runs-this"},
              {"id": "parse", "task": "nothing-runs-this", "depends": ["prep"], "map": {"over": "params.files"}}],
}


def test_run_shows_a_mapped_node_with_its_items(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.engine.completion import finish_attempt
    from orchestrator.store import tasks as task_store

    engine = stack.engine
    engine.create_pipeline(WORKSPACE, MAPPED)
    run = engine.trigger_run(WORKSPACE, "mapped", dispatch_now=False).id

    def claim() -> list[Any]:
        with engine.db.transaction() as conn:
            return task_store.claim_ready_tasks(conn, 1000, run_id=run)

    def finish(task: Any, ok: bool) -> None:
        with engine.db.transaction() as conn:
            finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
                           output={"key": "k"} if ok else None, error=None if ok else {"message": "bad\nworse"},
                           retryable=False)

    (prep,) = claim()
    finish(prep, True)  # the map expands: 120 items
    claimed = claim()
    for task in claimed[:100]:
        finish(task, True)
    finish(claimed[100], False)

    code, out, _ = cli(stack, capsys, "run", str(run))
    assert code == 0, out
    assert "  tasks     122 (120 map items): " in out
    assert "NODE   TASKS      BY STATUS" in out
    assert "parse  120 items  map: 100 succeeded, 1 failed, 19 running" in out

    code, out, _ = cli(stack, capsys, "run", str(run), "--node", "parse", "--limit", "5")
    assert code == 0, out
    table = out[out.index("TASK ID"):].splitlines()
    assert [line.split()[1:5] for line in table[1:6]] == [
        ["parse", "default", "running", "-"], ["parse", "#0", "default", "succeeded"],
        ["parse", "#1", "default", "succeeded"], ["parse", "#2", "default", "succeeded"],
        ["parse", "#3", "default", "succeeded"]]
    assert "more: --cursor " in out
