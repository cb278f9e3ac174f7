"""Reading a task attempt's log: what the worker SDK stored beside the attempt's output.

The worker uploads the whole (capped) log on heartbeats while the task runs and once more
before its callback, so: while the attempt is active, the stored log is what was there at
the last flush; once the attempt is finished (its callback recorded, or it expired or was
cancelled), the stored log is the whole log. The attempt's row is read before the object, so a
reader told `complete` read the object after the final upload.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.errors import InvalidInput, NotFound
from orchestrator.storage.layout import attempt_log_key, map_item_log_key
from orchestrator.store import tasks as task_store

__all__ = ["MAX_ATTEMPT", "AttemptLog", "attempt_log_key_of", "read_attempt_log"]

# Attempt numbers are a Postgres integer.
MAX_ATTEMPT = 2_147_483_647
# The attempt statuses during which the worker may still store a newer log.
_ACTIVE_ATTEMPT = frozenset({"dispatched", "running"})


@dataclass(frozen=True)
class AttemptLog:
    """`body`: the log's bytes from the offset asked for; `size`: the whole stored log's size
    now; `complete`: the attempt is finished, so the log will not change any more."""

    body: bytes
    size: int
    complete: bool


def attempt_log_key_of(workspace_id: str, task: Mapping[str, Any], attempt: int) -> str:
    """The key the dispatcher granted attempt `attempt` of `task` for its log (a map item's
    beside its item-scoped output)."""
    node = (workspace_id, str(task["pipeline_id"]), str(task["run_id"]), str(task["version"]), str(task["node_id"]))
    index = task.get("map_index")
    if isinstance(index, int) and index >= 0:
        return map_item_log_key(*node, index, attempt)
    return attempt_log_key(*node, attempt)


def read_attempt_log(
    db: Database, settings: Settings, workspace_id: str, task_id: uuid.UUID, attempt: int, offset: int = 0,
) -> AttemptLog:
    """The log of attempt `attempt` of a task of the workspace, from byte `offset` on.

    NotFound: the task is not in the workspace, it has no such attempt, or the attempt is
    finished and stored no log (it failed before running its function, or its worker keeps no
    logs). An active attempt without a log yet has an empty one, not complete."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or not 1 <= attempt <= MAX_ATTEMPT:
        raise InvalidInput(f"attempt must be an integer from 1 to {MAX_ATTEMPT}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInput("offset must be an integer >= 0 (a byte offset into the log)")
    with db.connection() as conn:
        task = task_store.get_task(conn, workspace_id, task_id)
        if task is None:
            raise NotFound(f"task '{task_id}' not found")
        attempts = task_store.list_attempts(conn, [task_id])
    row = next((a for a in attempts if a["attempt"] == attempt), None)
    if row is None:
        have = f"its attempts are 1 to {len(attempts)}" if attempts else "it has not been dispatched yet"
        raise NotFound(f"task '{task_id}' has no attempt {attempt} ({have})")
    complete = row["status"] not in _ACTIVE_ATTEMPT
    # Imported here, like the engine's other S3 reads: boto3 loads on the first read, not at import.
    from orchestrator.storage.s3 import ObjectMissing, read_object_from

    try:
        body, size = read_object_from(settings, attempt_log_key_of(workspace_id, task, attempt), offset)
    except ObjectMissing:
        if complete:
            raise NotFound(
                f"attempt {attempt} of task '{task_id}' stored no log (it ended ({row['status']}) before its "
                "worker ran the task function, or the worker keeps no logs)"
            ) from None
        return AttemptLog(b"", 0, False)
    return AttemptLog(body, size, complete)
