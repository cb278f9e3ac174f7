"""Turn claimed task rows into dispatch messages (token, storage grant, inputs) and send them.

Runs after the claiming transaction committed: a crash between commit and send leaves the
task `dispatched` until its lease expires, and the tick retries it (at-least-once delivery).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.dispatch.base import DispatchError, Transport
from orchestrator.dispatch.routing import RoutedTransports
from orchestrator.engine.completion import settle_terminal
from orchestrator.engine.mapping import ensure_manifest
from orchestrator.logs import log_context, log_event
from orchestrator.storage.layout import (
    attempt_log_key,
    map_item_attempt_prefix,
    map_item_log_key,
    map_item_output_key,
    node_attempt_prefix,
    node_output_key,
)
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, map_digest, params_digest
from orchestrator.store import dispatch as dispatch_store
from orchestrator.store import tasks as task_store
from orchestrator.store import workers as worker_store
from orchestrator.store.dispatch import DispatchContext

log = logging.getLogger(__name__)

# A dispatch that failed goes back to `ready` after this delay, doubling per consecutive failure.
DISPATCH_RETRY_DELAY_S = 5.0
# Tokens outlive the attempt's timeout a little, so a late but honest callback can be told why
# it is refused rather than failing token validation; with no timeout, a day.
_TOKEN_SLACK_S = 300
_DEFAULT_TOKEN_TTL_S = 86_400


@dataclass(frozen=True)
class DispatchSummary:
    sent: int
    failed: int


class Dispatcher:
    def __init__(
        self, settings: Settings, db: Database, keyring: TokenKeyring,
        transports: Mapping[str, Transport], *, grant_issuer: Callable[..., Any] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.transports = transports
        self.routed = RoutedTransports(settings)
        self._grant_issuer = grant_issuer

    def claim_limit(self, batch_size: int) -> int:
        """The batch size, bounded by what the transports can start now when all of them say."""
        capacities: list[int | None] = [
            getattr(t, "capacity", lambda: None)() for t in self.transports.values()
        ]
        if not capacities or any(c is None for c in capacities):
            return batch_size
        return min(batch_size, sum(int(c) for c in capacities if c is not None))

    def dispatch(self, claimed: Sequence[Row], context: DispatchContext | None = None) -> DispatchSummary:
        """Send the claimed tasks. `context`: their dispatch context when the statement that
        claimed them read it (tw_complete_attempts, which also recorded their code versions)."""
        if not claimed:
            return DispatchSummary(0, 0)
        unwritten: dict[str, str] = {}
        if context is None:
            with self.db.connection() as conn:
                # Node inputs, the pipeline outputs the runs read (resolved when each run started;
                # never an upstream run's raw results), and the registered routes: one statement.
                # A registered worker service serves its task names, whatever the configuration says.
                context = dispatch_store.dispatch_context(
                    conn, [t["id"] for t in claimed],
                    sorted({(t["workspace_id"], t["task_name"]) for t in claimed if t["task_name"]}),
                )
                unwritten = self._write_manifests(conn, context)
                worker_store.record_dispatched_code(conn, [
                    (t["id"], int(t["attempt"]), context.routes[(t["workspace_id"], t["task_name"])]["code_hash"])
                    for t in claimed if (t["workspace_id"], t["task_name"]) in context.routes
                ])
        elif context.manifests:
            with self.db.connection() as conn:
                unwritten = self._write_manifests(conn, context)
        inputs, upstream, routes, maps = context.inputs, context.upstream, context.routes, context.maps
        failures: list[tuple[Row, str]] = []

        def send_one(task: Row) -> None:
            with log_context(**_ids(task)):
                _send_one(task)

        def _send_one(task: Row) -> None:
            log_event(log, "task.claimed", level=logging.DEBUG, task=task["task_name"])
            try:
                for ref in inputs.get(task["id"], {}).values():
                    if ref["key"] in unwritten:
                        raise DispatchError(unwritten[ref["key"]])
                message = self.build_message(
                    task, inputs.get(task["id"], {}), upstream.get(task["id"], {}), maps.get(task["id"])
                )
                route = routes.get((task["workspace_id"], task["task_name"]))
                if route is not None:
                    transport: Transport | None = self.routed.get(
                        route["transport"], route["endpoint"], workspace=task["workspace_id"], service=route["service"]
                    )
                    message["code_version"] = route["code_hash"]
                else:
                    transport = self.transports.get(task["transport"])
                if transport is None:
                    raise DispatchError(f"no transport named {task['transport']!r} is configured")
                transport.send(message)
            except Exception as exc:  # any failure to hand over is a dispatch failure
                failures.append((task, f"{type(exc).__name__}: {exc}"))
                return
            log_event(log, "task.dispatched", task=task["task_name"], transport=getattr(transport, "name", None))

        if len(claimed) == 1:
            send_one(claimed[0])
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(claimed))) as pool:
                list(pool.map(send_one, claimed))
        for task, reason in failures:

            def record(conn: Connection, task: Row = task, reason: str = reason) -> None:
                self._dispatch_failed(conn, task, reason)

            self.db.run_in_transaction(record)
        return DispatchSummary(len(claimed) - len(failures), len(failures))

    def _write_manifests(self, conn: Connection, context: DispatchContext) -> dict[str, str]:
        """A task reading a map node's output reads its manifest: written here, before the task
        is sent, from the settled children (once; later dispatches find it). Returns the keys
        that could not be written, with the reason (their readers' dispatch fails, and is
        retried like any)."""
        unwritten: dict[str, str] = {}
        for key, parent_id in context.manifests.items():
            try:
                ensure_manifest(self.settings, conn, parent_id, key)
            except Exception as exc:
                unwritten[key] = f"the manifest {key} could not be written: {type(exc).__name__}: {exc}"
        return unwritten

    def _dispatch_failed(self, conn: Connection, task: Row, reason: str) -> None:
        row = task_store.record_dispatch_failure(
            conn, task["id"], task["attempt"], task["claim_token"], base_delay_s=DISPATCH_RETRY_DELAY_S,
            max_failures=self.settings.max_dispatch_failures,
            error={"code": "dispatch_failed", "message": reason[:2000], "retryable": True},
        )
        # `status`: ready (tried again after a delay) or failed (too many failures in a row:
        # dead-lettered).
        log_event(log, "task.dispatch_failed", f"dispatch of task {task['id']} failed: {reason[:500]}",
                  level=logging.WARNING, error=reason[:500], status=None if row is None else row["status"],
                  **_ids(task))
        if row is not None and row["status"] == "failed":
            settle_terminal(conn, row, dead_letter=True)

    def _issue_grant(self, settings: Settings, **kwargs: Any) -> Any:
        # boto3 is imported on the first dispatch, not with the engine: a cold Lambda serving a
        # request that dispatches nothing does not pay its ~150 ms import.
        if self._grant_issuer is None:
            from orchestrator.storage.s3 import issue_storage_grant

            self._grant_issuer = issue_storage_grant
        return self._grant_issuer(settings, **kwargs)

    def build_message(
        self, task: Row, inputs: dict[str, dict[str, Any]], upstream: dict[str, dict[str, Any]] | None = None,
        item: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        upstream = upstream or {}
        task_id = str(task["id"])
        # The attempt's own key and prefix: a stale attempt keeps a valid grant for up to the
        # credentials' lifetime, and must not be able to overwrite what a newer attempt wrote.
        # A map node's child writes under its item's own prefix.
        node = (task["workspace_id"], task["pipeline_id"], str(task["run_id"]), task["version"], task["node_id"])
        if item is not None:
            index = int(item["index"])
            output_key = map_item_output_key(*node, index, int(task["attempt"]))
            write_prefix = map_item_attempt_prefix(*node, index, int(task["attempt"]))
            log_key = map_item_log_key(*node, index, int(task["attempt"]))
        else:
            output_key = node_output_key(*node, int(task["attempt"]))
            write_prefix = node_attempt_prefix(*node, int(task["attempt"]))
            log_key = attempt_log_key(*node, int(task["attempt"]))
        # A reader of a map node's manifest reads the children's outputs it lists.
        read_prefixes = [str(ref["items_prefix"]) for ref in inputs.values()
                         if ref.get("manifest") and ref.get("items_prefix")]
        grant = self._issue_grant(
            self.settings, output_key=output_key, write_prefix=write_prefix,
            read_keys=[ref["key"] for ref in (*inputs.values(), *upstream.values())],
            task_id=task_id, log_key=log_key, **({"read_prefixes": read_prefixes} if read_prefixes else {}),
        )
        ttl = (task["timeout_s"] or _DEFAULT_TOKEN_TTL_S) + _TOKEN_SLACK_S
        token = self.keyring.issue(
            TaskClaims(
                task_id=task_id, attempt=int(task["attempt"]), claim_token=str(task["claim_token"]),
                workspace=task["workspace_id"], task_name=task["task_name"], params_sha256=params_digest(task["params"]),
                expires_at=int(time.time()) + ttl, storage=grant,
                # A child's item and index are bound to its token like its params.
                map_sha256=None if item is None else map_digest(_map_slot(item)),
            )
        )
        base = self.settings.public_url
        deadline = None
        if task["timeout_s"]:
            deadline = (task["dispatched_at"].timestamp() + task["timeout_s"])
        message: dict[str, Any] = {
            "task_id": task_id,
            "run_id": str(task["run_id"]),
            "workspace": task["workspace_id"],
            "pipeline": task["pipeline_id"],
            "node": task["node_id"],
            "attempt": int(task["attempt"]),
            "task": task["task_name"],
            "params": task["params"],
            "version": task["version"],
            "inputs": inputs,
            "upstream": upstream,
            "token": token,
            "callback_url": f"{base}/api/callback/{task_id}",
            "heartbeat_url": f"{base}/api/heartbeat",
            "heartbeat_interval_s": int(task["heartbeat_s"]),
            "deadline": None if deadline is None else _iso(deadline),
        }
        if item is not None:
            message["map"] = _map_slot(item)
        return message


def _map_slot(item: dict[str, Any]) -> dict[str, Any]:
    """A child's `map` field: its index, its item and the map's width."""
    return {"index": int(item["index"]), "item": item["item"], "count": item["count"]}


def _ids(task: Row) -> dict[str, Any]:
    """The ids a log line about a claimed task carries."""
    return {"workspace_id": task["workspace_id"], "pipeline_id": task["pipeline_id"], "run_id": task["run_id"],
            "task_id": task["id"], "attempt": task["attempt"]}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
