"""Pipeline outputs: checked against their JSON Schema when the producing task succeeds,
persisted to `outputs/{workspace}/{pipeline}/{execution}/{version}/{output}`, indexed, listed
and read back.

The check and the write happen in the transaction that records the task's success, after the
guarded update of the task row: only the attempt whose outcome is accepted writes (a stale
attempt's callback is refused before it can touch the persisted object), and a failed write
rolls the success back so the worker's callback is retried. A schema violation is not retried:
the attempt is recorded as failed with the violation in its error, and the task dead-letters.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import NotFound
from orchestrator.storage.layout import pipeline_output_key
from orchestrator.store import outputs as output_store

# A node output that produces a pipeline output is read by the server to check its schema;
# larger objects are refused rather than held in a request's memory.
MAX_CHECKED_OUTPUT_BYTES = 64 * 1024 * 1024


class OutputRejected(Exception):
    """The produced value cannot become the declared output; `error` goes into the attempt."""

    def __init__(self, error: dict[str, Any], *, retryable: bool) -> None:
        super().__init__(error["message"])
        self.error = error
        self.retryable = retryable


def schema_sha256(schema: dict[str, Any] | None) -> str | None:
    if schema is None:
        return None
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def schema_violation(schema: dict[str, Any], value: Any) -> str | None:
    """The most relevant reason `value` breaks `schema` (Draft 2020-12), or None."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} (at /{where})" if where else error.message


def persist_task_outputs(conn: Connection, settings: Settings, task: Row, node_output: dict[str, Any] | None) -> None:
    """Check and persist the pipeline outputs a succeeded task produces (`task["output_names"]`).

    Raises OutputRejected when the value is missing, not JSON or breaks a schema.
    """
    from orchestrator.storage.s3 import ObjectMissing, put_object_bytes, read_object_bytes, sha256_hex

    names: list[str] = list(task.get("output_names") or [])
    if not names:
        return
    spec = output_store.output_specs_of_task(conn, task["id"])
    declared: dict[str, Any] = (spec or {}).get("outputs") or {}
    key = (node_output or {}).get("key")
    if not isinstance(key, str):
        raise OutputRejected(
            {"code": "output_missing", "message": "the task reported no output object", "retryable": False},
            retryable=False,
        )
    try:
        body = read_object_bytes(settings, key, max_bytes=MAX_CHECKED_OUTPUT_BYTES)
    except ObjectMissing:
        raise OutputRejected(
            {"code": "output_missing", "message": f"the output object {key!r} is not in the bucket",
             "retryable": True},
            retryable=True,
        ) from None
    except ValueError as exc:
        raise OutputRejected({"code": "output_too_large", "message": str(exc), "retryable": False}, retryable=False) from None
    try:
        value = json.loads(body)
    except ValueError:
        raise OutputRejected(
            {"code": "output_not_json", "message": f"the output object {key!r} is not JSON", "retryable": False},
            retryable=False,
        ) from None
    rows: list[output_store.NewOutput] = []
    for name in names:
        schema = (declared.get(name) or {}).get("schema")
        if schema is not None:
            violation = schema_violation(schema, value)
            if violation is not None:
                raise OutputRejected(
                    {
                        "code": "output_schema_invalid",
                        "message": f"output {name!r} does not match its schema: {violation}",
                        "output": name, "retryable": False,
                    },
                    retryable=False,
                )
        rows.append(
            output_store.NewOutput(
                id=uuid.uuid4(), output=name,
                key=pipeline_output_key(task["workspace_id"], task["pipeline_id"], str(task["run_id"]),
                                        task["version"], name),
                size=len(body), sha256=sha256_hex(body), schema_sha256=schema_sha256(schema),
            )
        )
    for row in rows:
        put_object_bytes(settings, row.key, body)
    output_store.insert_outputs(conn, task, rows)


def list_outputs(
    db: Database, workspace_id: str, *, pipeline_id: str | None, version: str | None, output: str | None,
    limit: int, before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    with db.connection() as conn:
        return output_store.list_outputs(
            conn, workspace_id, pipeline_id=pipeline_id, version=version, output=output, limit=limit, before=before
        )


def get_output(db: Database, workspace_id: str, output_id: uuid.UUID) -> Row:
    with db.connection() as conn:
        row = output_store.get_output(conn, workspace_id, output_id)
    if row is None:
        raise NotFound(f"output '{output_id}' not found")
    return row


def output_content(db: Database, settings: Settings, workspace_id: str, output_id: uuid.UUID) -> bytes:
    from orchestrator.storage.s3 import ObjectMissing, read_object_bytes

    row = get_output(db, workspace_id, output_id)
    try:
        return read_object_bytes(settings, str(row["key"]))
    except ObjectMissing:
        raise NotFound(f"the object of output '{output_id}' is no longer in the bucket") from None
