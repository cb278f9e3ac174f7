"""The worker the IAM-enforced deployment tests' worker function runs
(TICKWEAVE_WORKER=tests.deploy.enforced_tasks:worker, in its own process: tests/deploy/run_worker.py).

Callbacks give up after 5 s instead of the SDK's 5 minutes: a callback the API answers 500
(an AccessDenied inside it) fails the test quickly instead of stalling it."""

from __future__ import annotations

from typing import Any

from orchestrator.worker import TaskContext, Worker
from orchestrator.worker.http import HttpSender

worker = Worker(send=HttpSender(deadline_s=5, attempts=3, backoff_s=0.1))


@worker.task("echo")
def echo(ctx: TaskContext) -> dict[str, Any]:
    # ctx.inputs reads every upstream node output and upstream pipeline output (hydration) with
    # the task's grant
    return {"node": ctx.node, "params": ctx.params, "inputs": ctx.inputs, "rows": 3}
