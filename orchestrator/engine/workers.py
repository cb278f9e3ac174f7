"""Worker services register their tasks: routing follows the latest registration of a task
name, and every code hash a task name has had is kept as its history.

A registered http endpoint is a tenant's choice of URL that the orchestrator will POST to from
its own network: it must be public (orchestrator.dispatch.addresses), and it gets its own
signing secret (orchestrator.storage.signatures), never the platform's worker secret.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.dispatch.addresses import endpoint_problem
from orchestrator.engine.errors import InvalidInput
from orchestrator.storage.signatures import endpoint_secret, signing_root_key
from orchestrator.store import keys as key_store
from orchestrator.store import workers as worker_store

log = logging.getLogger(__name__)

# How often a worker's last_seen_at is written, at most, from heartbeats and callbacks. Well
# under the stale threshold (Settings.worker_stale_after_s, 300 s by default), so a worker that
# keeps talking never looks stale; far over the per-task rate, so callbacks stay one statement.
WORKER_SEEN_EVERY_S = 30.0

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


def list_workers(db: Database, workspace_id: str, stale_after_s: int) -> list[Row]:
    with db.connection() as conn:
        rows = worker_store.list_workers(conn, workspace_id, stale_after_s)
    for row in rows:
        row["stale_after_s"] = stale_after_s
    return rows


class WorkerSightings:
    """Registered workers heard from over the API (a heartbeat or a callback with a valid token),
    written to workers.last_seen_at without touching the callback's statement.

    The write is throttled twice: in this process, a (workspace, task name) is written at most
    once per `every_s` (so nearly every callback issues nothing more); in the database, the
    UPDATE leaves a worker seen within `every_s` alone (so many API processes write a worker at
    most once per `every_s` between them). A sighting is best effort: a failure to write one is
    logged, never the caller's error."""

    def __init__(self, every_s: float = WORKER_SEEN_EVERY_S, max_entries: int = 10_000) -> None:
        self.every_s = every_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._written: dict[tuple[str, str], float] = {}

    def _due(self, heard: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        now = time.monotonic()
        due: dict[str, list[str]] = {}
        with self._lock:
            if len(self._written) > self.max_entries:
                self._written.clear()  # bounded memory; the database guard still throttles
            for key in set(heard):
                last = self._written.get(key)
                if last is None or now - last >= self.every_s:
                    self._written[key] = now
                    due.setdefault(key[0], []).append(key[1])
        return due

    def record(self, db: Database, heard: Iterable[tuple[str, str]]) -> int:
        """Write the sightings that are due; the number of workers updated."""
        due = self._due(heard)
        if not due:
            return 0
        updated = 0
        try:
            with db.connection() as conn:
                for workspace_id, names in sorted(due.items()):
                    updated += worker_store.note_seen(conn, workspace_id, sorted(names), self.every_s)
        except psycopg.Error as exc:
            log.warning("worker sighting not recorded: %s", exc)
        return updated


def code_history(db: Database, workspace_id: str, task_name: str) -> list[Row]:
    with db.connection() as conn:
        return worker_store.code_history(conn, workspace_id, task_name)
