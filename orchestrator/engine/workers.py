"""Worker services register their tasks: routing follows the latest registration of a task
name, and every code hash a task name has had is kept as its history."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import InvalidInput
from orchestrator.store import keys as key_store
from orchestrator.store import workers as worker_store

_LAMBDA_NAME = re.compile(r"^(arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:)?[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9$_-]+)?$")


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    code_hash: str
    new_code_version: bool


def check_endpoint(transport: str, endpoint: str) -> None:
    if transport == "http" and not re.match(r"^https?://[^\s/]+(/\S*)?$", endpoint):
        raise InvalidInput("an http worker's endpoint must be an http(s) URL, e.g. https://worker.example/dispatch",
                           details=[{"path": "endpoint", "message": "not an http(s) URL"}])
    if transport == "lambda" and not _LAMBDA_NAME.match(endpoint):
        raise InvalidInput("a lambda worker's endpoint must be a function name or ARN",
                           details=[{"path": "endpoint", "message": "not a Lambda function name or ARN"}])
    if transport == "sqs" and not re.match(r"^https?://\S+/\d{12}/[A-Za-z0-9_.-]+$", endpoint):
        raise InvalidInput("an sqs worker's endpoint must be a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)",
                           details=[{"path": "endpoint", "message": "not an SQS queue URL"}])


def register(
    db: Database, workspace_id: str, *, service: str, version: str, transport: str, endpoint: str,
    tasks: list[dict[str, Any]],
) -> list[RegisteredTask]:
    check_endpoint(transport, endpoint)

    def work(conn: Connection) -> list[RegisteredTask]:
        key_store.ensure_workspace(conn, workspace_id)
        worker_store.upsert_worker(conn, workspace_id, service, version, transport, endpoint)
        registered = []
        for task in tasks:
            worker_store.route_task(conn, workspace_id, task["name"], service, task["code_hash"],
                                    task.get("input_schema"))
            new = worker_store.record_code_version(conn, workspace_id, task["name"], task["code_hash"], service, version)
            registered.append(RegisteredTask(task["name"], task["code_hash"], new))
        return registered

    return db.run_in_transaction(work)


def list_workers(db: Database, workspace_id: str) -> list[Row]:
    with db.connection() as conn:
        return worker_store.list_workers(conn, workspace_id)


def code_history(db: Database, workspace_id: str, task_name: str) -> list[Row]:
    with db.connection() as conn:
        return worker_store.code_history(conn, workspace_id, task_name)
