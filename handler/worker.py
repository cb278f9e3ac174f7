"""Lambda entry for worker functions: an async invoke whose payload is one dispatch message (the
`lambda` transport), or an SQS batch of them (answered with `batchItemFailures`).

Deploy your own tasks by pointing TICKWEAVE_WORKER at `module:attribute` of your Worker
(default: the example tasks). The worker needs the token keys (TICKWEAVE_TOKEN_KEYS, or
TICKWEAVE_TOKEN_KEYS_FROM naming a secret), nothing else: no database, no storage credentials of
its own (they come inside each dispatch's token).

Nothing happens at import: the first event resolves `NAME_FROM` references into the process
environment (where the worker SDK reads its settings, as if they had been set in the function
configuration) and imports the worker module (and with it the SDK and boto3).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import TYPE_CHECKING, Any

from orchestrator.config import resolve_references

if TYPE_CHECKING:
    from orchestrator.worker import Worker

_worker: Worker | None = None
_resolved = False
_lock = threading.Lock()


def resolve_environment() -> None:
    """Once per process: fill `NAME` from `NAME_FROM` (Secrets Manager / SSM) in os.environ."""
    global _resolved
    with _lock:
        if not _resolved:
            os.environ.update(resolve_references(os.environ))
            _resolved = True


def get_worker() -> Worker:
    global _worker
    with _lock:
        if _worker is None:
            from orchestrator.worker import Worker

            spec = os.environ.get("TICKWEAVE_WORKER", "examples.tasks:worker")
            module_name, _, attribute = spec.partition(":")
            worker = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(worker, Worker):
                raise TypeError(f"TICKWEAVE_WORKER={spec} is not an orchestrator.worker.Worker")
            _worker = worker
        return _worker


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    resolve_environment()
    from orchestrator.logs import configure_logging  # standard library only; not at import

    configure_logging()  # JSON lines at LOG_LEVEL / ApplicationLogLevel; idempotent
    result: dict[str, Any] = get_worker().lambda_handler(event, context)
    return result
