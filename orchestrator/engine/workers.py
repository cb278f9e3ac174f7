"""Worker services register their tasks: routing follows the latest registration of a task
name, and every code hash a task name has had is kept as its history.

A registered http endpoint is a tenant's choice of URL that the orchestrator will POST to from
its own network: it must be public (orchestrator.dispatch.addresses), and it gets its own
signing secret (orchestrator.storage.signatures), never the platform's worker secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.dispatch.addresses import endpoint_problem
from orchestrator.engine.errors import InvalidInput
from orchestrator.storage.signatures import endpoint_secret, signing_root_key
from orchestrator.store import keys as key_store
from orchestrator.store import workers as worker_store

_LAMBDA_NAME = re.compile(r"^(arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:)?[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9$_-]+)?$")


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    code_hash: str
    new_code_version: bool


@dataclass(frozen=True)
class Registration:
    tasks: list[RegisteredTask]
    # The secret that signs this registration's http dispatches (None for lambda and sqs).
    signing_secret: str | None


def check_endpoint(transport: str, endpoint: str, *, allow_private: bool = False) -> None:
    if transport == "http" and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise InvalidInput("an http worker's endpoint must be an http(s) URL, e.g. https://worker.example/dispatch",
                           details=[{"path": "endpoint", "message": "not an http(s) URL"}])
    if transport == "http":
        problem = endpoint_problem(endpoint, allow_private=allow_private)
        if problem is not None:
            raise InvalidInput(
                f"the endpoint {endpoint!r} is refused: {problem}; register an address reachable on the "
                "public network (loopback, link-local, private, unspecified and multicast addresses are "
                "only allowed where the operator set TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS)",
                details=[{"path": "endpoint", "message": problem}],
            )
    if transport == "lambda" and not _LAMBDA_NAME.match(endpoint):
        raise InvalidInput("a lambda worker's endpoint must be a function name or ARN",
                           details=[{"path": "endpoint", "message": "not a Lambda function name or ARN"}])
    if transport == "sqs" and not re.match(r"^https?://\S+/\d{12}/[A-Za-z0-9_.-]+$", endpoint):
        raise InvalidInput("an sqs worker's endpoint must be a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)",
                           details=[{"path": "endpoint", "message": "not an SQS queue URL"}])


def register(
    db: Database, settings: Settings, workspace_id: str, *, service: str, version: str, transport: str,
    endpoint: str, tasks: list[dict[str, Any]],
) -> Registration:
    check_endpoint(transport, endpoint, allow_private=settings.allow_private_worker_endpoints)

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

    registered = db.run_in_transaction(work)
    # Derived, not stored: every replica computes the same secret, and re-registering the same
    # (workspace, service, endpoint) hands the worker the same one again.
    secret = (
        endpoint_secret(signing_root_key(settings), workspace_id, service, endpoint) if transport == "http" else None
    )
    return Registration(registered, secret)


def list_workers(db: Database, workspace_id: str) -> list[Row]:
    with db.connection() as conn:
        return worker_store.list_workers(conn, workspace_id)


def code_history(db: Database, workspace_id: str, task_name: str) -> list[Row]:
    with db.connection() as conn:
        return worker_store.code_history(conn, workspace_id, task_name)
