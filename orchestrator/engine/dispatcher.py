"""Turn claimed task rows into dispatch messages (token, storage grant, inputs) and send them.

Runs after the claiming transaction committed: a crash between commit and send leaves the
task `dispatched` until its lease expires, and the tick retries it (at-least-once delivery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.dispatch.base import DispatchError, DispatchThrottled, Transport
from orchestrator.dispatch.routing import RoutedTransports
from orchestrator.engine.completion import settle_terminal
from orchestrator.engine.kept_threads import KeptThreads
from orchestrator.engine.mapping import ensure_manifest
from orchestrator.logs import log_context, log_event
from orchestrator.storage.layout import (
    attempt_log_key,
    map_item_attempt_prefix,
    map_item_log_key,
    map_item_output_key,
    map_items_prefix,
    node_attempt_prefix,
    node_output_key,
    node_prefix,
    run_prefix,
)
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, map_digest, params_digest
from orchestrator.store import dispatch as dispatch_store
from orchestrator.store import dispatch_targets as target_store
from orchestrator.store import storage_access
from orchestrator.store import tasks as task_store
from orchestrator.store import workers as worker_store
from orchestrator.store.dispatch import DispatchContext

log = logging.getLogger(__name__)

# A dispatch that failed goes back to `ready` after this delay, doubling per consecutive failure.
DISPATCH_RETRY_DELAY_S = 5.0
# Tokens outlive the attempt's timeout a little, so a late but honest callback can be told why
# it is refused rather than failing token validation; with no timeout, a day.
_TOKEN_SLACK_S = 300
# Threads sending to transports that wait on a network (HTTP, Lambda, SQS), kept by the
# dispatcher for its life and shared by its dispatch rounds; the S3/STS clients they share keep at
# least this many connections (storage.s3.CLIENT_POOL_CONNECTIONS).
DISPATCH_THREADS = 16
_DEFAULT_TOKEN_TTL_S = 86_400


# How long this process trusts "no target is throttled" (an empty dispatch_targets) before
# reading again: a target another API environment saw throttle is known here within this time,
# and a healthy system reads the empty table at most this often, not once per callback.
TARGETS_REFRESH_S = 2.0


@dataclass(frozen=True)
class DispatchSummary:
    sent: int
    failed: int
    # Given back without being sent, or sent and refused as throttled: no attempt spent.
    throttled: int = 0


@dataclass
class _Round:
    """What one target did in one dispatch round."""

    sent: int = 0
    throttled: int = 0
    limited: bool = False
    fresh_window: bool = False
    rest_s: float = 0.0
    error: str = ""


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
        # This process's copy of dispatch_targets (target -> row with `available` and `rest_s`).
        self._targets_lock = threading.Lock()
        self._targets: dict[str, Row] = {}
        self._targets_read_at = float("-inf")
        # Run id -> its nodes with `storage: credentials`, each with whether it is a map node (a
        # run's definition never changes).
        self._credential_nodes_lock = threading.Lock()
        self._credential_nodes: dict[Any, dict[str, bool]] = {}
        # Started at the first round with two network sends or more, and kept.
        self._sending = KeptThreads(DISPATCH_THREADS, "tickweave-dispatch")

    def close(self) -> None:
        """Stop the send threads (after the sends under way)."""
        self._sending.close()

    def _sending_threads(self) -> ThreadPoolExecutor:
        return self._sending.pool()

    def throttled_targets(self, *, fresh: bool = False) -> dict[str, Row]:
        """The targets under backpressure, as of at most TARGETS_REFRESH_S ago (`fresh`: now).

        Kept in the database, not only in this process: the API is a stateless Lambda, each tick
        and each callback's eager dispatch may run in another (possibly new) environment, and
        every one of them must hold back from a target any of them saw throttle."""
        with self._targets_lock:
            # Only "none" is trusted for a while: the common answer, and the one that costs a
            # healthy system nothing per callback. While some target pushes back its window is
            # read each time (one row per such target), so what it has left is never stale.
            if fresh or self._targets or time.monotonic() - self._targets_read_at > TARGETS_REFRESH_S:
                with self.db.connection() as conn:
                    rows = target_store.list_targets(conn)
                self._targets = {r["target"]: r for r in rows}
                self._targets_read_at = time.monotonic()
            return dict(self._targets)

    def _forget_targets(self) -> None:
        with self._targets_lock:
            self._targets_read_at = float("-inf")

    def claim_limit(self, batch_size: int) -> int:
        """The batch size, bounded by what the transports can start now when all of them say: a
        local pool its free threads, a target under backpressure what its window has left (a
        healthy remote target does not say: it scales out)."""
        if not self.transports:
            return batch_size
        throttled: dict[str, Row] | None = None  # read only when a transport has no capacity of its own
        capacities: list[int | None] = []
        for transport in self.transports.values():
            capacity = getattr(transport, "capacity", None)
            target = getattr(transport, "target", None)
            if capacity is not None:
                capacities.append(capacity())
                continue
            if target is not None and throttled is None:
                throttled = self.throttled_targets()
            if target is not None and throttled is not None and target in throttled:
                capacities.append(int(throttled[target]["available"]))
            else:
                capacities.append(None)
        if any(c is None for c in capacities):
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
        # (task, reason, minimum delay in seconds, target): given back without spending anything.
        throttled: list[tuple[Row, str, float, str | None]] = []
        refused = 0  # sends a target answered as throttled
        windows: dict[int, list[Row]] = {}  # start window (s) -> tasks handed to such a transport

        # Each task's transport first (a registered route wins over the configuration), so that
        # a target under backpressure is sent only what its window grants, before any message
        # (token, storage grant) is built for the rest.
        transport_of: dict[Any, Transport | None] = {}
        unroutable: dict[Any, str] = {}
        for task in claimed:
            route = routes.get((task["workspace_id"], task["task_name"]))
            if route is None:
                transport_of[task["id"]] = self.transports.get(task["transport"])
                continue
            try:
                transport_of[task["id"]] = self.routed.get(
                    route["transport"], route["endpoint"], workspace=task["workspace_id"], service=route["service"]
                )
            except Exception as exc:  # a registration this server cannot serve: a dispatch failure
                transport_of[task["id"]] = None
                unroutable[task["id"]] = f"{type(exc).__name__}: {exc}"
        rounds: dict[str, _Round] = {}
        by_target: dict[str, list[Row]] = {}
        for task in claimed:
            target = getattr(transport_of[task["id"]], "target", None)
            if target is not None:
                by_target.setdefault(target, []).append(task)
                rounds.setdefault(target, _Round())
        to_send = list(claimed)
        known = self.throttled_targets() if by_target else {}
        limited = {t: len(tasks) for t, tasks in by_target.items() if t in known}
        if limited:
            with self.db.connection() as conn:
                grants = target_store.take_grants(conn, limited, self.settings.throttle_window_s)
            held_ids: set[Any] = set()
            for target, (granted, fresh) in grants.items():
                state = rounds[target]
                state.limited, state.fresh_window = True, fresh
                state.rest_s = float(known[target]["rest_s"])
                for task in by_target[target][granted:]:
                    held_ids.add(task["id"])
                    throttled.append((task, f"held back: {target} is throttled (capacity "
                                            f"{known[target]['capacity']} per {self.settings.throttle_window_s:g} s)",
                                      max(state.rest_s, self.settings.throttle_window_s), target))
            to_send = [t for t in claimed if t["id"] not in held_ids]
        outcome_lock = threading.Lock()

        def send_one(task: Row) -> None:
            with log_context(**_ids(task)):
                _send_one(task)

        def _send_one(task: Row) -> None:
            nonlocal refused
            log_event(log, "task.claimed", level=logging.DEBUG, task=task["task_name"])
            transport = transport_of[task["id"]]
            target = getattr(transport, "target", None)
            try:
                if task["id"] in unroutable:
                    raise DispatchError(unroutable[task["id"]])
                if transport is None:
                    raise DispatchError(f"no transport named {task['transport']!r} is configured")
                for ref in inputs.get(task["id"], {}).values():
                    if ref["key"] in unwritten:
                        raise DispatchError(unwritten[ref["key"]])
                message = self.build_message(
                    task, inputs.get(task["id"], {}), upstream.get(task["id"], {}), maps.get(task["id"])
                )
                route = routes.get((task["workspace_id"], task["task_name"]))
                if route is not None:
                    message["code_version"] = route["code_hash"]
                transport.send(message)
            except DispatchThrottled as exc:
                # The target pushed back: not the task's failure (nothing spent), and a reason to
                # send it less for a while.
                with outcome_lock:
                    refused += 1
                    throttled.append((task, str(exc), exc.retry_after_s or 0.0, target))
                    if target is not None:
                        rounds[target].throttled += 1
                        rounds[target].error = str(exc)
                return
            except Exception as exc:  # any other failure to hand over is a dispatch failure
                with outcome_lock:
                    failures.append((task, f"{type(exc).__name__}: {exc}"))
                return
            with outcome_lock:
                if target is not None:
                    rounds[target].sent += 1
                window = getattr(transport, "start_window_s", None)
                if window:
                    windows.setdefault(int(window), []).append(task)
            log_event(log, "task.dispatched", task=task["task_name"], transport=getattr(transport, "name", None))

        # Sends that wait on a network go out in parallel; a transport that hands its message over
        # in memory (`sends_in_memory`: the local worker's queue) is sent to here, as are the
        # tasks with no transport (a dispatch failure at once): threads would only add their
        # switches to the work of building the messages, which the GIL runs one at a time.
        networked = [t for t in to_send if transport_of[t["id"]] is not None
                     and not getattr(transport_of[t["id"]], "sends_in_memory", False)]
        if len(networked) < 2:
            networked = []
        parallel = {t["id"] for t in networked}
        for task in to_send:
            if task["id"] not in parallel:
                send_one(task)
        if networked:
            list(self._sending_threads().map(send_one, networked))
        if throttled or windows or any(r.limited or r.throttled for r in rounds.values()):
            self.db.run_in_transaction(lambda conn: self._record_pushback(conn, throttled, windows, rounds))
        for task, reason in failures:

            def record(conn: Connection, task: Row = task, reason: str = reason) -> None:
                self._dispatch_failed(conn, task, reason)

            self.db.run_in_transaction(record)
        return DispatchSummary(len(to_send) - len(failures) - refused, len(failures), len(throttled))

    def _record_pushback(
        self, conn: Connection, throttled: Sequence[tuple[Row, str, float, str | None]],
        windows: Mapping[int, Sequence[Row]],
        rounds: Mapping[str, _Round],
    ) -> None:
        """One transaction for what a round learnt about its targets: leases of tasks a transport
        may hold before starting them, claims given back (throttled or held back), and each
        target's capacity (halved where it throttled, grown where a window went clean)."""
        settings = self.settings
        for window, tasks in windows.items():
            task_store.extend_start_leases(conn, [(t["id"], int(t["attempt"]), t["claim_token"]) for t in tasks], window)
        throttled_targets = {target: state for target, state in rounds.items() if state.throttled}
        rests: dict[str, float] = {}
        for target, state in sorted(throttled_targets.items()):
            row = target_store.record_throttled(
                conn, target, sent=state.sent, throttled=state.throttled, base_rest_s=settings.throttle_window_s,
                max_rest_s=settings.throttle_rest_max_s, error=state.error,
            )
            if row is not None:
                rests[target] = settings.throttle_window_s * (2 ** min(int(row["throttles"]) - 1, 30))
                log_event(log, "dispatch.throttled", f"{target} throttled {state.throttled} of "
                          f"{state.sent + state.throttled} dispatches; capacity now {row['capacity']} per window",
                          level=logging.WARNING, target=target, sent=state.sent, throttled=state.throttled,
                          capacity=row["capacity"], rest_until=str(row["window_ends_at"]))
        clean = sorted(t for t, s in rounds.items() if s.limited and s.fresh_window and not s.throttled and s.sent)
        target_store.record_clean(conn, clean, settings.throttle_capacity_ceiling)
        if throttled:
            claims = [
                (task["id"], int(task["attempt"]), task["claim_token"],
                 min(max(minimum, rests.get(target, 0.0) if target is not None else 0.0),
                     settings.throttle_retry_max_delay_s), reason[:2000])
                for task, reason, minimum, target in throttled
            ]
            released = task_store.release_claims(
                conn, claims, base_delay_s=settings.throttle_retry_delay_s,
                max_delay_s=settings.throttle_retry_max_delay_s,
            )
            log_event(log, "task.dispatch_throttled", f"{len(released)} dispatches given back (throttled)",
                      level=logging.INFO, count=len(released))
        if throttled_targets or clean:
            self._forget_targets()

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

    def _nodes_wanting_credentials(self, run_id: Any) -> dict[str, bool]:
        with self._credential_nodes_lock:
            nodes = self._credential_nodes.get(run_id)
            if nodes is None:
                # One query per run and process, under the lock: the dispatch threads of a round
                # wait for the first one rather than each asking.
                with self.db.connection() as conn:
                    nodes = storage_access.credential_nodes(conn, [run_id]).get(run_id, {})
                if len(self._credential_nodes) >= 4096:
                    self._credential_nodes.clear()
                self._credential_nodes[run_id] = nodes
            return nodes

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
        # Storage access (issue 15): presigned URLs by default, no STS call per task. The nodes
        # with `storage: credentials` share one session per run, which writes under their own
        # prefixes (any data version; a map node's items, never its manifest) and reads the run's
        # objects (storage.s3.run_session_policy); the node's own scope is the fallback.
        wanting = self._nodes_wanting_credentials(task["run_id"])
        access = "credentials" if task["node_id"] in wanting else "urls"
        lifetime = (int(task["timeout_s"]) + _TOKEN_SLACK_S) if task["timeout_s"] else None
        # A child's session stops at the items: the map node's manifest, beside them, is the
        # orchestrator's to write.
        scope = map_items_prefix(*node) if item is not None else node_prefix(*node)
        runs_prefix = run_prefix(*node[:3])
        run_writes = [f"{runs_prefix}*/nodes/{n}/{'items/' if mapped else ''}*" for n, mapped in sorted(wanting.items())]
        # A reader of a map node's manifest reads the children's outputs it lists.
        read_prefixes = [str(ref["items_prefix"]) for ref in inputs.values()
                         if ref.get("manifest") and ref.get("items_prefix")]
        grant = self._issue_grant(
            self.settings, output_key=output_key, write_prefix=write_prefix,
            read_keys=[ref["key"] for ref in (*inputs.values(), *upstream.values())],
            task_id=task_id, log_key=log_key, **({"read_prefixes": read_prefixes} if read_prefixes else {}),
            access=access, scope_prefix=scope, run_prefix=runs_prefix, lifetime_s=lifetime,
            **({"run_writes": run_writes} if access == "credentials" else {}),
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


def record_not_started(conn: Connection, settings: Settings, row: Row) -> Row | None:
    """A task whose lease lapsed while still `dispatched` (`row`: from lock_expired_leases): no
    worker started it. The delivery was lost, or it is still waiting in a throttled transport;
    neither is the task's failure, and neither is fixed by sending it again at once. It is tried
    again (at once, then after a delay doubling per such delivery), and fails (dead-lettered,
    code `not_started`) only `not_started_give_up_s` after it was first found not started."""
    give_up = settings.not_started_give_up_s
    lost = task_store.record_not_started(
        conn, row["id"], row["attempt"], row["claim_token"], base_delay_s=settings.not_started_retry_delay_s,
        max_delay_s=settings.not_started_retry_max_delay_s, give_up_s=give_up,
        retry_error={"code": "not_started", "retryable": True,
                     "message": "no worker started the task before its lease expired; it is dispatched again"},
        final_error={"code": "not_started", "retryable": True,
                     "message": f"no worker started the task in the {give_up} s since a delivery of it was "
                                f"first found not started (TICKWEAVE_NOT_STARTED_GIVE_UP_S): every delivery "
                                f"was lost or left waiting in the transport"},
    )
    if lost is None:
        return None
    log_event(log, "task.not_started", f"task {row['id']} was not started by a worker before its lease expired",
              level=logging.WARNING, task_id=row["id"], attempt=row["attempt"], status=lost["status"],
              not_started=lost["not_started_count"], since=str(lost["not_started_since"]))
    if lost["status"] == "failed":
        settle_terminal(conn, lost, dead_letter=True)
    return lost


def _map_slot(item: dict[str, Any]) -> dict[str, Any]:
    """A child's `map` field: its index, its item and the map's width."""
    return {"index": int(item["index"]), "item": item["item"], "count": item["count"]}


def _ids(task: Row) -> dict[str, Any]:
    """The ids a log line about a claimed task carries."""
    return {"workspace_id": task["workspace_id"], "pipeline_id": task["pipeline_id"], "run_id": task["run_id"],
            "task_id": task["id"], "attempt": task["attempt"]}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
