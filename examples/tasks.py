"""Example worker tasks, served by the module-level `worker`: `echo`, `sleep` and `fail`, and
the three steps of a map (examples/pipelines/files-fan-out.yaml): `list-files` finds the items,
`parse-file` runs once per item, `load-all` reduces their outputs.

The local transport runs `examples.tasks:worker` in-process; the same module works behind the
worker Lambda or an HTTP worker service.
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.worker import TaskContext, TaskFailed, Worker

# Settings are loaded on first use, so importing this module needs no environment.
worker = Worker()


@worker.task("echo")
def echo(ctx: TaskContext) -> dict[str, Any]:
    """Return what the task was given: handy to see data flow through a DAG."""
    return {"params": ctx.params, "inputs": ctx.inputs, "version": ctx.version, "node": ctx.node}


@worker.task("sleep")
def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleep `params.seconds` (default 1), reporting progress as it goes."""
    seconds = ctx.params.get("seconds", 1)
    total = max(0.0, float(seconds))
    # Progress goes out once per heartbeat interval (the background heartbeat keeps the lease
    # alive anyway); the loop wakes at least every second to notice a stale attempt.
    report_every = ctx.heartbeat_interval_s or 1.0
    started = time.monotonic()
    next_report = started + report_every
    while not ctx.stale:
        now = time.monotonic()
        if now - started >= total:
            break
        time.sleep(min(1.0, total - (now - started), max(0.0, next_report - now)) or 0.01)
        if time.monotonic() >= next_report:
            next_report += report_every
            ctx.heartbeat(progress=min(1.0, (time.monotonic() - started) / total), message="sleeping")
    return {"slept": seconds}


@worker.task("fail")
def fail(ctx: TaskContext) -> dict[str, Any]:
    """Fail the first `params.times` attempts (default 1), then succeed.

    `params.retryable: false` makes the failure permanent, to exercise dead-lettering.
    """
    times = int(ctx.params.get("times", 1))
    if ctx.attempt <= times:
        raise TaskFailed(
            f"failing on purpose (attempt {ctx.attempt} of {times})",
            retryable=ctx.params.get("retryable", True) is not False,
        )
    return {"attempts": ctx.attempt}


@worker.task("list-files")
def list_files(ctx: TaskContext) -> dict[str, Any]:
    """Find the files to process: `params.count` (default 12) names under `params.prefix`.

    A map node over `list.files` gets one task per name. Large lists belong in this output, not
    in the callback: the server reads the list from the stored object.
    """
    count = int(ctx.params.get("count", 12))
    prefix = str(ctx.params.get("prefix", "incoming")).rstrip("/")
    return {"files": [f"{prefix}/part-{i:03d}.csv" for i in range(count)]}


@worker.task("parse-file")
def parse_file(ctx: TaskContext) -> dict[str, Any]:
    """One item of a map: `ctx.item` is the file name, `ctx.index` its position in the list.

    A stand-in for real parsing: the row count is derived from the name. Fails for good (not
    retryable) for a name in `params.bad_files`, to show `tolerated_failures`; sleeps
    `params.seconds` (default 0) to make `max_concurrency` visible on the dashboard.
    """
    if ctx.index is None:
        raise TaskFailed("parse-file runs once per item of a map: give its node `map: {over: ...}`",
                         retryable=False, code="not_mapped")
    name = str(ctx.item)
    seconds = float(ctx.params.get("seconds", 0))
    if seconds > 0:
        time.sleep(seconds)
    if name in (ctx.params.get("bad_files") or []):
        raise TaskFailed(f"cannot parse {name}", retryable=False, code="bad_file")
    rows = 10 + sum(name.encode()) % 90
    return {"file": name, "index": ctx.index, "rows": rows}


@worker.task("load-all")
def load_all(ctx: TaskContext) -> dict[str, Any]:
    """The reducer of a map: every item's output, in index order, read one at a time.

    `params.items_from` names the mapped node (default `parse`). Its input is the manifest;
    `ctx.map_results` walks it lazily, so a map of 100,000 items never holds all their outputs.
    Failed items (within `tolerated_failures`) come with their error and no value.
    """
    node = str(ctx.params.get("items_from", "parse"))
    files: list[str] = []
    indexes: list[int] = []
    failed: list[dict[str, Any]] = []
    rows = 0
    for result in ctx.map_results(node):
        if result.status == "succeeded":
            files.append(result.value["file"])
            indexes.append(result.index)
            rows += int(result.value["rows"])
        else:
            failed.append({"index": result.index, "status": result.status,
                           "error": (result.error or {}).get("message")})
    return {"files": files, "indexes": indexes, "rows": rows, "failed": failed}
