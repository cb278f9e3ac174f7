"""Give back the attempts a stopping worker will not finish, so they run again.

`make dev` stops its in-process worker in order (infra/dev.py): it lets running tasks finish
for a grace period, then hands back the rest here, before the API and the local S3 go. A
handed-back task is `ready` at once, keeps its retry budget, and the next start of the stack
runs it again; the stopped attempt shows as `cancelled` with the error code `handed_back`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from orchestrator.db.connection import Connection, Database
from orchestrator.logs import log_event
from orchestrator.store import hand_back as hand_back_store

log = logging.getLogger(__name__)


def hand_back(db: Database, attempts: Sequence[tuple[str, int]], *, reason: str) -> list[str]:
    """Hand back each (task id, attempt) that is still current and unfinished; returns the ids
    of the tasks handed back. One transaction per task: each is independent, and a callback
    that lands first wins (its attempt is no longer active)."""
    error = {"code": "handed_back", "message": reason, "retryable": True}
    handed: list[str] = []
    for task_id, attempt in attempts:

        def work(conn: Connection, task_id: str = task_id, attempt: int = attempt) -> bool:
            return hand_back_store.hand_back_attempt(conn, uuid.UUID(task_id), attempt, error) is not None

        if db.run_in_transaction(work):
            handed.append(task_id)
            log_event(log, "task.handed_back", f"task {task_id} attempt {attempt} handed back: {reason}",
                      task_id=task_id, attempt=attempt)
    return handed
