"""Example worker tasks: `echo`, `sleep` and `fail`, served by the module-level `worker`.

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
