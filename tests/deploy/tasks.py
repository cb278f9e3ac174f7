"""The worker the deployment tests' worker function runs (TICKWEAVE_WORKER=tests.deploy.tasks:worker).

A module of its own, reloaded per test, so that each test's worker reads its settings (token
keys resolved from that test's secret) afresh."""

from __future__ import annotations

from typing import Any

from orchestrator.worker import TaskContext, TaskFailed, Worker

worker = Worker()


@worker.task("echo")
def echo(ctx: TaskContext) -> dict[str, Any]:
    return {"node": ctx.node, "params": ctx.params, "inputs": ctx.inputs}


@worker.task("fail")
def fail(ctx: TaskContext) -> None:
    raise TaskFailed("failing on purpose", retryable=False)
