"""The worker SDK: `Worker`, `@worker.task`, `TaskContext`, `TaskFailed`.

Imports only configuration, storage and HTTP client code, so a worker image does not need
psycopg or Starlette.
"""

from orchestrator.worker.sdk import Send, StaleAttempt, TaskContext, TaskFailed, TaskFunction, Worker
from orchestrator.worker.service import WorkerService

__all__ = ["Send", "StaleAttempt", "TaskContext", "TaskFailed", "TaskFunction", "Worker", "WorkerService"]
