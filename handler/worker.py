"""Lambda entry for worker functions: an async invoke whose payload is one dispatch message.

Deploy your own tasks by pointing TICKWEAVE_WORKER at `module:attribute` of your Worker
(default: the example tasks)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from orchestrator.worker import Worker

_worker: Worker | None = None


def get_worker() -> Worker:
    global _worker
    if _worker is None:
        module_name, _, attribute = os.environ.get("TICKWEAVE_WORKER", "examples.tasks:worker").partition(":")
        _worker = getattr(importlib.import_module(module_name), attribute)
    assert _worker is not None
    return _worker


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    result: dict[str, Any] = get_worker().lambda_handler(event, context)
    return result
