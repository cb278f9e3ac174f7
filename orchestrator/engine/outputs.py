"""Pipeline outputs: checked against their JSON Schema when the producing task succeeds,
persisted to `outputs/{workspace}/{pipeline}/{execution}/{version}/{output}/attempts/{n}.json`,
indexed, listed and read back.

The I/O (reading the node's output, up to 64 MiB, and writing the persisted copies) happens
before the transaction that records the task's success (`prepare_task_outputs`), so that no row
lock is held across S3 calls; the transaction only indexes what was written
(`record_task_outputs`). Because the objects are written before the attempt is known to be
accepted, their keys carry the attempt: a stale attempt's callback can write its own copy, but
never over the accepted attempt's, and only the transaction whose guarded update accepts the
attempt records the index row that readers follow. A failed write fails the callback, which the
worker retries. A schema violation is not retried: the attempt is recorded as failed with the
violation in its error, and the task dead-letters.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import InvalidInput, NotFound, TooLarge
from orchestrator.storage.layout import pipeline_output_key
from orchestrator.store import outputs as output_store

# A node output that produces a pipeline output is read by the server to check its schema;
# larger objects are refused rather than held in a request's memory.
MAX_CHECKED_OUTPUT_BYTES = 64 * 1024 * 1024
# What a content answer may carry: Lambda's response limit is 6 MB, headers and all.
MAX_CONTENT_ANSWER_BYTES = 5 * 1024 * 1024


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


def check_node_output(settings: Settings, bucket: str, node_output: dict[str, Any]) -> None:
    """Check a succeeded callback's output reference against the object, with one HeadObject
    (the object is not read) and outside any transaction: it must exist, have the reported
    `size`, and, where the callback reports a `sha256` and the object carries S3's own SHA-256
    checksum (the SDK's credential PUTs do), that checksum. Raises OutputRejected (retryable:
    the attempt fails and the task is tried again) naming the key."""
    from orchestrator.storage.s3 import ObjectMissing, head_object_facts

    key = str(node_output["key"])
    size, sha256 = node_output.get("size"), node_output.get("sha256")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise InvalidInput("output.size must be an integer (bytes)")
    if sha256 is not None and not isinstance(sha256, str):
        raise InvalidInput("output.sha256 must be a hex string")
    try:
        facts = head_object_facts(settings, key, bucket=bucket)
    except ObjectMissing:
        raise _rejected("output_missing", f"the output object {key!r} the callback names is not in the bucket",
                        key) from None
    if size is not None and size != facts.size:
        raise _rejected("output_size_mismatch",
                        f"the output object {key!r} has {facts.size} bytes, the callback reported {size}", key,
                        expected=size, actual=facts.size)
    if sha256 is not None and facts.sha256 is not None and sha256.lower() != facts.sha256:
        raise _rejected("output_checksum_mismatch",
                        f"the output object {key!r} has sha256 {facts.sha256}, the callback reported {sha256}",
                        key, expected=sha256, actual=facts.sha256)


def _rejected(code: str, message: str, key: str, **details: Any) -> OutputRejected:
    return OutputRejected({"code": code, "message": message, "key": key, **details, "retryable": True},
                          retryable=True)


def prepare_task_outputs(
    db: Database, settings: Settings, task: Row, node_output: dict[str, Any] | None
) -> list[output_store.NewOutput]:
    """Check and write the pipeline outputs a succeeded attempt produces (`task["output_names"]`),
    outside any transaction; returns the index rows for `record_task_outputs`.

    `task` is the task's row as the guarded finish returned it (id, workspace_id, pipeline_id,
    run_id, version, attempt, output_names). Raises OutputRejected when the value is missing, not
    JSON or breaks a schema.
    """
    from orchestrator.storage.s3 import ObjectMissing, put_object_bytes, read_object_bytes, sha256_hex

    names: list[str] = list(task.get("output_names") or [])
    if not names:
        return []
    with db.connection() as conn:  # a plain read: no transaction, no lock
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
    # The bytes are at hand: the callback's sha256 is checked here too, for objects that carry no
    # checksum of S3's own (a presigned PUT), which the HEAD before could not compare.
    claimed, actual = (node_output or {}).get("sha256"), sha256_hex(body)
    if isinstance(claimed, str) and claimed.lower() != actual:
        raise _rejected("output_checksum_mismatch",
                        f"the output object {key!r} has sha256 {actual}, the callback reported {claimed}",
                        key, expected=claimed, actual=actual)
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
                                        task["version"], name, int(task["attempt"])),
                size=len(body), sha256=actual, schema_sha256=schema_sha256(schema),
            )
        )
    for row in rows:
        put_object_bytes(settings, row.key, body)
    return rows


def record_task_outputs(conn: Connection, task: Row, prepared: list[output_store.NewOutput]) -> None:
    """Index the outputs `prepare_task_outputs` wrote, in the transaction that accepted the
    attempt (called only after its guarded update succeeded); no S3 call here."""
    if prepared:
        output_store.insert_outputs(conn, task, prepared)


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
        return read_object_bytes(settings, str(row["key"]), max_bytes=MAX_CONTENT_ANSWER_BYTES)
    except ObjectMissing:
        raise NotFound(f"the object of output '{output_id}' is no longer in the bucket") from None
    except ValueError:
        raise TooLarge(_too_large_to_answer(f"output '{output_id}'", str(row["key"]))) from None


def task_output_content(db: Database, settings: Settings, workspace_id: str, task_id: uuid.UUID) -> bytes:
    """The stored output of one task (what its last successful attempt wrote), whether or not
    the pipeline declares it under `outputs:`. NotFound: not a task of the workspace, it has
    no output (not succeeded, or a step that writes none), or the object left the bucket."""
    from orchestrator.storage.s3 import ObjectMissing, read_object_bytes
    from orchestrator.store import tasks as task_store

    with db.connection() as conn:
        task = task_store.get_task(conn, workspace_id, task_id)
    if task is None:
        raise NotFound(f"task '{task_id}' not found")
    reference = task["output"]
    key = reference.get("key") if isinstance(reference, dict) else None
    if not isinstance(key, str) or not key:
        raise NotFound(f"task '{task_id}' has no stored output (status {task['status']})")
    try:
        return read_object_bytes(settings, key, max_bytes=MAX_CONTENT_ANSWER_BYTES)
    except ObjectMissing:
        raise NotFound(f"the output of task '{task_id}' is no longer in the bucket") from None
    except ValueError:
        raise TooLarge(_too_large_to_answer(f"the output of task '{task_id}'", key)) from None


def _too_large_to_answer(what: str, key: str) -> str:
    return (f"{what} is larger than {MAX_CONTENT_ANSWER_BYTES} bytes, more than an API answer may carry "
            f"(Lambda answers stop at 6 MB); read it from the bucket, key {key!r}")
