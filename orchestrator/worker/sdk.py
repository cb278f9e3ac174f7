"""The worker SDK: register task functions, execute dispatch messages, report back.

A dispatch message carries an encrypted token; everything the worker is allowed to do (which
task attempt it speaks for, which objects it may read and write) comes from the token, not from
the plain fields of the message, which are only routing and convenience.

Protocol, per dispatch:
  1. decrypt the token (refuse the dispatch on any problem, without calling back: the server
     expires the lease and retries);
  2. an unknown task name fails the attempt, not retryable;
  3. a first heartbeat marks the task running and tells whether this attempt is still current;
  4. run the function with background heartbeats, store its JSON result at the granted key;
     while it runs, what it logs and prints is its attempt's log (orchestrator.worker.task_log),
     stored beside the output on heartbeats and once more at the end, before the callback;
  5. call back with `succeeded` (output key, size, sha256) or `failed` (error, retryable).

Where the worker holds several outcomes at once (an SQS batch: `Worker.execute_many`, used by
`lambda_handler` and `run_sqs`), their callbacks go in one `POST /api/callbacks` (each still
fenced and answered alone); an orchestrator without that route gets them one by one.

Callbacks and heartbeats are safe to repeat (the server fences them; a callback that already
committed answers `duplicate`), so the default sender (orchestrator.worker.http.HttpSender)
retries them on 429, 500, 502-504 and connection failures with jittered backoff, up to a
deadline: a callback for 5 minutes, a heartbeat until its next interval is due, and within a
Lambda invocation never past the invocation's deadline (less LAMBDA_DEADLINE_MARGIN_S, kept
to answer the invocation). A batch of callbacks is retried as a batch, except that one the
orchestrator keeps answering 500 is sent one by one after BATCH_TRIES_ON_500 tries.

Once a heartbeat is refused (the attempt is stale: a newer attempt took over, or the task is no
longer active), the attempt stops: the next SDK call (`ctx.input`, `ctx.upstream`,
`ctx.heartbeat`, the next item of `ctx.map_results`) raises StaleAttempt, and whatever the
function does, its output is not written and no callback is sent.

Mapped nodes: a child of a mapped node is dispatched with `"map": {"index", "item", "count"}`
(`ctx.item`, `ctx.index`, `ctx.map_count`) and writes its output like any task, at the
item-scoped key its grant names. A task downstream of a mapped node (a reducer) gets a
manifest as that input; `ctx.map_results(node)` and `ctx.map_outputs(node)` walk it in index
order, reading each child's output only when the iteration reaches it.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from orchestrator.storage.s3 import encode_json, sha256_hex
from orchestrator.storage.tokens import TaskClaims, TokenInvalid, TokenKeyring, map_digest, params_digest
from orchestrator.worker.grant_io import GrantStorage, ObjectUnavailable
from orchestrator.worker.http import HttpSender, TransientHTTPError, retry_limits
from orchestrator.worker.task_log import LogUploader, TaskLog, capturing

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from orchestrator.config import Settings

__all__ = [
    "MANIFEST_FORMAT",
    "MalformedDispatch",
    "MapResult",
    "Send",
    "StaleAttempt",
    "TaskContext",
    "TaskFailed",
    "TaskFunction",
    "Worker",
]

log = logging.getLogger("tickweave.worker")

Send = Callable[[str, dict[str, Any]], dict[str, Any]]
TaskFunction = Callable[["TaskContext"], Any]
F = TypeVar("F", bound=TaskFunction)

# While a task runs, its log is stored at most this often (when it changed), and at each heartbeat.
LOG_FLUSH_INTERVAL_S = 10.0
MAX_TRACEBACK_CHARS = 4000
MAX_MESSAGE_CHARS = 4000
_HEARTBEAT_JOIN_TIMEOUT_S = 5.0
# The manifest a mapped node's reducer gets as that node's input (written by the server).
MANIFEST_FORMAT = "tickweave.map-manifest/1"
_MANIFEST_FAMILY = "tickweave.map-manifest/"
# Callbacks the SDK sends in one `POST /api/callbacks` (the server's default limit), and the
# JSON bytes it puts in one (half the server's default body limit: a token with STS credentials
# is a few KB, an error with its traceback up to 8 KB).
CALLBACK_BATCH = 100
CALLBACK_BATCH_BYTES = 512 * 1024
# Keys whose URLs a presigned-mode reducer asks for at once: one round trip per 100 items, and
# never more than 100 URLs (~1 KB each) held, whatever the width of the map.
READ_URL_BATCH = 100
# A heartbeat is retried until the next one is due; without an interval (the first beat of a
# dispatch that sets none), for this long.
HEARTBEAT_RETRY_S = 30.0
# A Lambda worker stops retrying this long before its invocation's deadline: time to log and to
# answer (an SQS batch's failed records go back to the queue only if the handler returns).
LAMBDA_DEADLINE_MARGIN_S = 2.0
# Tries of a batch of callbacks answered 500 before they are sent one by one: a 500 that
# persists may be caused by one of them, and alone each gets its own answer. Other failures
# (429, 502-504, connection) are retried as a batch: one by one they would meet the same throttle.
BATCH_TRIES_ON_500 = 3
_MAP_STATUSES = frozenset({"succeeded", "failed", "skipped", "cancelled"})


class TaskFailed(Exception):
    """Raise from a task to fail the attempt with a chosen code and retry behaviour."""

    def __init__(self, message: str, *, retryable: bool = True, code: str = "task_failed") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code


class StaleAttempt(Exception):
    """The server refused a heartbeat of this attempt: it is no longer the current attempt, or
    the task is no longer active. Raised by the SDK's calls so that the task stops; the attempt
    then writes no output and sends no callback (the server would refuse it anyway, and its
    output would only cost storage)."""

    def __init__(self, task_id: str, attempt: int, reason: str) -> None:
        super().__init__(f"task {task_id} attempt {attempt} is no longer current ({reason})")
        self.reason = reason


class MalformedDispatch(ValueError):
    """A dispatch whose token is valid but whose fields cannot be run as given (a `map` field
    that is not {index, item, count}); the attempt fails, not retryable: the same message would
    fail the same way."""


@dataclass(frozen=True)
class MapResult:
    """One child of a mapped node, as a reducer sees it: its position in the mapped list, its
    final status (succeeded, failed, skipped or cancelled), its output (None unless it
    succeeded) and its error (None if it succeeded)."""

    index: int
    status: str
    value: Any
    error: dict[str, Any] | None


class _Refused(Exception):
    """A dispatch the worker will not act on; becomes {"status": "rejected", "reason": ...}."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TaskContext:
    """What a task function sees: identity, parameters, inputs, heartbeats and a logger."""

    def __init__(
        self,
        *,
        dispatch: Mapping[str, Any],
        claims: TaskClaims,
        token: str,
        send: Send,
    ) -> None:
        # Identity that matters for fencing comes from the authenticated claims.
        self.task_id: str = claims.task_id
        self.attempt: int = claims.attempt
        self.workspace: str = claims.workspace
        self.run_id: str = str(dispatch.get("run_id", ""))
        self.pipeline: str = str(dispatch.get("pipeline", ""))
        self.node: str = str(dispatch.get("node", ""))
        self.task: str = str(dispatch.get("task", ""))
        self.version: str = str(dispatch.get("version", ""))
        params = dispatch.get("params")
        self.params: dict[str, Any] = dict(params) if isinstance(params, Mapping) else {}
        self.heartbeat_interval_s: float = float(dispatch.get("heartbeat_interval_s") or 0)
        self.deadline: datetime | None = _parse_deadline(dispatch.get("deadline"))
        self.log: logging.Logger = logging.getLogger(f"tickweave.task.{self.task or 'unknown'}")
        # For a child of a mapped node: its item, its index in the list and the list's length;
        # None for any other task (an item may itself be null: check `index`, not `item`).
        map_slot = _parse_map(dispatch.get("map"))
        self.item: Any = map_slot["item"] if map_slot is not None else None
        self.index: int | None = map_slot["index"] if map_slot is not None else None
        self.map_count: int | None = map_slot["count"] if map_slot is not None else None
        self.claims = claims
        self._token = token
        self._send = send
        self._heartbeat_url = str(dispatch["heartbeat_url"])
        self._read_urls_url = _read_urls_url(self._heartbeat_url, str(dispatch.get("callback_url") or ""))
        self._input_refs = _refs(dispatch.get("inputs"))
        self._upstream_refs = _refs(dispatch.get("upstream"))
        self._storage = GrantStorage(claims.storage) if claims.storage is not None else None
        self._cache: dict[str, Any] = {}
        self._cache_lock = threading.Lock()
        self._stale = threading.Event()
        self._refusal: dict[str, Any] | None = None

    @property
    def task_name(self) -> str:
        return self.task

    @property
    def storage(self) -> GrantStorage | None:
        return self._storage

    @property
    def stale(self) -> bool:
        """True once the server said this attempt is no longer current; long tasks may stop
        (the SDK's calls raise StaleAttempt from then on, and nothing is stored or reported)."""
        return self._stale.is_set()

    @property
    def refusal(self) -> dict[str, Any] | None:
        """The server's answer to the heartbeat that found this attempt stale, if one did."""
        return self._refusal

    def _check_current(self) -> None:
        if self._stale.is_set():
            reason = str((self._refusal or {}).get("reason") or "stale")
            raise StaleAttempt(self.task_id, self.attempt, reason)

    def time_left(self) -> float | None:
        """Seconds until the dispatch deadline, if it has one."""
        if self.deadline is None:
            return None
        return self.deadline.timestamp() - time.time()

    def input(self, node_id: str) -> Any:
        """The output of upstream node `node_id` in this run (same data version)."""
        key = self._input_refs.get(node_id)
        if key is None:
            known = ", ".join(sorted(self._input_refs)) or "none"
            raise KeyError(f"{node_id!r} is not an input of node {self.node!r} (inputs: {known})")
        self._check_current()
        return self._read(key, f"the output of upstream node {node_id!r}")

    @property
    def input_ids(self) -> tuple[str, ...]:
        return tuple(self._input_refs)

    @property
    def upstream_ids(self) -> tuple[str, ...]:
        """The upstream pipeline outputs available, as `pipeline/output`."""
        return tuple(self._upstream_refs)

    @property
    def input_names(self) -> tuple[str, ...]:
        """What this task can read: upstream node ids, then `pipeline/output` of upstream pipelines."""
        return (*self._input_refs, *self._upstream_refs)

    @property
    def inputs(self) -> dict[str, Any]:
        """Everything available to this task by name (see `input_names`), each value read on first
        access: upstream node outputs by node id, upstream pipeline outputs as `pipeline/output`."""
        values = {node_id: self.input(node_id) for node_id in self._input_refs}
        for ref in self._upstream_refs:
            pipeline, _, output = ref.partition("/")
            values[ref] = self.upstream(pipeline, output)
        return values

    def upstream(self, pipeline: str, output: str) -> Any:
        """A declared output of an upstream pipeline (a pipeline-level dependency), for this
        task's data version: from the run of the same orchestration, or hydrated from the latest
        succeeded execution of that pipeline. The same call either way."""
        ref = f"{pipeline}/{output}"
        key = self._upstream_refs.get(ref)
        if key is None:
            known = ", ".join(sorted(self._upstream_refs)) or "none"
            raise KeyError(
                f"{ref!r} is not an upstream output of pipeline {self.pipeline!r} (upstream: {known})"
            )
        self._check_current()
        return self._read(key, f"the output {output!r} of upstream pipeline {pipeline!r}")

    def manifest(self, node_id: str) -> dict[str, Any]:
        """The manifest of mapped upstream node `node_id`: its children's statuses and output
        keys in index order, with counts (format `tickweave.map-manifest/1`). Read once and kept;
        do not change it. Raises TaskFailed (not retryable) if that input is not a manifest."""
        value = self.input(node_id)
        if not isinstance(value, Mapping) or value.get("format") != MANIFEST_FORMAT:
            fmt = value.get("format") if isinstance(value, Mapping) else None
            if isinstance(fmt, str) and fmt.startswith(_MANIFEST_FAMILY):
                message = (f"input {node_id!r} is a map manifest of format {fmt!r}, which this worker "
                           f"does not read (it reads {MANIFEST_FORMAT!r}); upgrade the worker")
            else:
                message = f"input {node_id!r} is not the output of a mapped node"
            raise TaskFailed(f"node {self.node!r}: {message}", retryable=False, code="not_a_manifest")
        if not isinstance(value.get("items"), list):
            raise TaskFailed(f"node {self.node!r}: the manifest of mapped node {node_id!r} has no items list",
                             retryable=False, code="manifest_invalid")
        # A shallow copy (a dozen keys; the items list is shared): typed as what JSON gives.
        return dict(value)

    def map_results(self, node_id: str) -> Iterator[MapResult]:
        """Every child of mapped upstream node `node_id`, in index order, lazily: a succeeded
        child's output is read when the iteration reaches it, so a reducer of 100,000 items
        holds the manifest and one item (plus at most READ_URL_BATCH URLs), never every output.
        A failed, skipped or cancelled child comes with value None and its error."""
        manifest = self.manifest(node_id)
        return _MapReader(self, node_id, manifest["items"]).results()

    def map_outputs(self, node_id: str) -> Iterator[Any]:
        """The outputs of the children of mapped upstream node `node_id` that succeeded, in index
        order, each read when the iteration reaches it (see `map_results`)."""
        return (result.value for result in self.map_results(node_id) if result.status == "succeeded")

    def heartbeat(self, progress: float | None = None, message: str | None = None) -> dict[str, Any]:
        """Extend the lease and report progress; returns the server's answer. Raises StaleAttempt
        when the attempt is (or turns out to be) no longer current."""
        self._check_current()
        answer = self._beat(progress, message)
        self._check_current()
        return answer

    def _beat(self, progress: float | None = None, message: str | None = None) -> dict[str, Any]:
        """Send one heartbeat; a fencing refusal marks the attempt stale (never raises for it)."""
        body: dict[str, Any] = {
            "token": self._token,
            "progress": float(progress) if progress is not None else None,
            "message": message,
        }
        # Retried (throttled, 5xx, unreachable) only until the next heartbeat is due: a late one
        # extends nothing the next would not.
        budget = self.heartbeat_interval_s if self.heartbeat_interval_s > 0 else HEARTBEAT_RETRY_S
        with retry_limits(within_s=budget):
            answer = self._send(self._heartbeat_url, body)
        # Only the server's fencing verdict (`accepted: false`: another attempt is current, or
        # the task is finished, cancelled or gone) makes the attempt stale. An error answer
        # without it (a 5xx, an expired token) says nothing about the attempt: the lease is
        # longer than the interval, and the callback is fenced anyway.
        if answer.get("accepted") is False:
            self._refusal = dict(answer)
            self._stale.set()
        return answer

    def _read(self, key: str, what: str) -> Any:
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
        if self._storage is None:
            raise PermissionError("this task's token carries no storage grant")
        try:
            value = self._storage.read_json(key)
        except ObjectUnavailable as exc:
            raise self._unavailable(exc, what) from None
        with self._cache_lock:
            self._cache[key] = value
        return value

    def _unavailable(self, exc: ObjectUnavailable, what: str) -> TaskFailed:
        """A failure of this attempt that names what is missing, not a botocore trace."""
        if exc.reason == "missing":
            message, code = f"{what} is not in the bucket (key {exc.key!r}; {exc.detail})", "input_missing"
        else:
            message, code = (f"{what} could not be read with this task's storage grant (key {exc.key!r}; "
                             f"{exc.detail}): it is missing, or the grant does not cover it"), "input_unreadable"
        return TaskFailed(f"node {self.node!r}: {message}", code=code, retryable=True)

    def _request_read_urls(self, keys: Sequence[str], what: str) -> dict[str, str]:
        """Presigned GET URLs for keys under the grant's read prefixes, from the orchestrator
        (`POST /api/worker/read-urls`, authenticated by this attempt's token), through the same
        `send` as heartbeats and callbacks."""
        if self._read_urls_url is None:
            raise TaskFailed(
                f"node {self.node!r}: {what} needs read URLs from the orchestrator, and the dispatch "
                "names no orchestrator API to ask (its heartbeat_url does not end in /api/heartbeat)",
                retryable=False, code="input_unreadable")
        answer = self._send(self._read_urls_url, {"token": self._token, "keys": list(keys)})
        urls = answer.get("urls")
        if isinstance(urls, Mapping) and all(isinstance(urls.get(key), str) for key in keys):
            return {key: str(urls[key]) for key in keys}
        problem = answer.get("error")
        detail = (f"{problem.get('code')}: {problem.get('message')}" if isinstance(problem, Mapping)
                  else "the answer has no URL for every key")
        # Retryable: the orchestrator was reachable but refused or failed (an expired token, a
        # deployment in progress); a new attempt gets a new token and asks again.
        raise TaskFailed(f"node {self.node!r}: the orchestrator gave no read URLs for {what} ({detail})",
                         retryable=True, code="input_unreadable")


class _MapReader:
    """Walks a manifest's items for `TaskContext.map_results`: validates each item as it comes,
    reads a succeeded child's output when the iteration reaches it, and in presigned mode asks
    for URLs READ_URL_BATCH keys ahead (a URL is used within one batch of its issue, long
    before its expiry, unless the task dawdles: then a refused one is asked for again)."""

    def __init__(self, ctx: TaskContext, node_id: str, items: list[Any]) -> None:
        self._ctx = ctx
        self._node_id = node_id
        self._items = items
        # URLs of the current batch, consumed (popped) as items are read.
        self._urls: dict[str, str] = {}

    def results(self) -> Iterator[MapResult]:
        previous = -1
        for position, raw in enumerate(self._items):
            index, status, key, error = self._item(position, raw)
            if index <= previous:
                raise self._invalid(position, "items are not in increasing index order")
            previous = index
            if status != "succeeded" or key is None:
                # A child that succeeded without storing anything (no grant) returned None.
                self._ctx._check_current()
                yield MapResult(index=index, status=status, value=None, error=error)
                continue
            yield MapResult(index=index, status=status, value=self._value(position, index, key, raw), error=None)

    def _item(self, position: int, raw: Any) -> tuple[int, str, str | None, dict[str, Any] | None]:
        if not isinstance(raw, Mapping):
            raise self._invalid(position, "an item is not an object")
        index, status, key, error = raw.get("index"), raw.get("status"), raw.get("key"), raw.get("error")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise self._invalid(position, "an item's index is not an integer >= 0")
        if status not in _MAP_STATUSES:
            raise self._invalid(position, f"item {index} has status {status!r}")
        if status == "succeeded":
            if key is not None and (not isinstance(key, str) or not key):
                raise self._invalid(position, f"succeeded item {index} has an output key that is not a string")
            return index, status, key, None
        return index, status, None, dict(error) if isinstance(error, Mapping) else None

    def _invalid(self, position: int, problem: str) -> TaskFailed:
        return TaskFailed(
            f"node {self._ctx.node!r}: the manifest of mapped node {self._node_id!r} is invalid at "
            f"items[{position}]: {problem}", retryable=False, code="manifest_invalid")

    def _value(self, position: int, index: int, key: str, raw: Mapping[str, Any]) -> Any:
        ctx = self._ctx
        ctx._check_current()
        storage = ctx.storage
        what = f"the output of item {index} of mapped node {self._node_id!r}"
        if storage is None:
            raise PermissionError("this task's token carries no storage grant")
        if not storage.may_read(key):
            # The server wrote both the manifest and the grant; a key outside the grant is its
            # bug (or tampering), and trying again gets the same manifest and the same grant.
            raise TaskFailed(f"node {ctx.node!r}: {what} (key {key!r}) is not under a read prefix of this "
                             "task's storage grant", retryable=False, code="input_not_granted")
        url: str | None = None
        if storage.needs_read_url(key):
            if key not in self._urls:
                self._urls = ctx._request_read_urls(self._batch(position, storage), what)
            url = self._urls.pop(key)
        try:
            try:
                body = storage.read_bytes(key, url=url)
            except ObjectUnavailable as exc:
                if url is None or exc.reason != "denied":
                    raise
                # Most likely the URL expired while the task worked on earlier items: one fresh
                # URL for this key, then the read's answer stands.
                body = storage.read_bytes(key, url=ctx._request_read_urls([key], what)[key])
        except ObjectUnavailable as exc:
            raise ctx._unavailable(exc, what) from None
        self._check_digest(position, index, key, body, raw)
        try:
            return json.loads(body)
        except ValueError:
            raise TaskFailed(f"node {ctx.node!r}: {what} (key {key!r}) is not JSON", retryable=False,
                             code="input_invalid") from None

    def _batch(self, position: int, storage: GrantStorage) -> list[str]:
        """The keys of the next READ_URL_BATCH succeeded items from `position` that need a URL
        (the one at `position` first). Keys the grant does not cover are left out: the
        orchestrator would refuse the whole batch for one, and the iteration fails on it by
        itself when it gets there."""
        keys: dict[str, None] = {}
        # By position, not a slice: slicing would copy the rest of a 100,000-item list per batch.
        for ahead in range(position, len(self._items)):
            if len(keys) == READ_URL_BATCH:
                break
            raw = self._items[ahead]
            if not isinstance(raw, Mapping) or raw.get("status") != "succeeded":
                continue
            key = raw.get("key")
            if isinstance(key, str) and storage.needs_read_url(key):
                keys[key] = None
        return list(keys)

    def _check_digest(self, position: int, index: int, key: str, body: bytes, raw: Mapping[str, Any]) -> None:
        # The manifest records what the server accepted from the child. The child's grant can
        # still write its key until it expires; what is read now must be what was accepted.
        size, sha256 = raw.get("size"), raw.get("sha256")
        changed = (isinstance(size, int) and not isinstance(size, bool) and size != len(body)) or (
            isinstance(sha256, str) and sha256 != "" and sha256.lower() != sha256_hex(body))
        if changed:
            raise TaskFailed(
                f"node {self._ctx.node!r}: the output of item {index} of mapped node {self._node_id!r} "
                f"(key {key!r}) is not what was accepted (size or sha256 differs from the manifest)",
                retryable=False, code="input_changed")


class _Heartbeater:
    """Sends heartbeats every interval while the task function runs, and stores the task's log
    when it changed: at each heartbeat, and every LOG_FLUSH_INTERVAL_S between heartbeats that
    are further apart (a `tickweave logs --follow` reader would otherwise wait a minute)."""

    def __init__(self, ctx: TaskContext, interval_s: float, uploader: LogUploader | None = None) -> None:
        self._ctx = ctx
        self._interval_s = interval_s
        self._uploader = uploader
        self._stop = threading.Event()
        # Run in a copy of the starting thread's context: its retry limits (a Lambda's deadline)
        # bound the heartbeats' retries too.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"heartbeat-{ctx.task_id}", daemon=True)

    def __enter__(self) -> _Heartbeater:
        if self._interval_s > 0 or self._uploader is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=_HEARTBEAT_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        beats = self._interval_s > 0
        # Wake for the next heartbeat, or sooner to store the log.
        intervals = [self._interval_s] if beats else []
        if self._uploader is not None:
            intervals.append(LOG_FLUSH_INTERVAL_S)
        step = min(intervals)
        next_beat = time.monotonic() + self._interval_s
        while True:
            wait = min(step, next_beat - time.monotonic()) if beats else step
            # Event.wait, not sleep: stopping must not wait out a whole interval.
            if self._stop.wait(max(0.0, wait)):
                return
            if beats and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._interval_s
                try:
                    self._ctx._beat()
                except Exception:
                    # A missed heartbeat is not fatal: the lease is longer than the interval and
                    # the next one may get through; the callback is what counts.
                    log.warning("heartbeat for task %s failed", self._ctx.task_id, exc_info=True)
                if self._ctx.stale:
                    # Refused: a newer attempt owns the task. Further heartbeats would be
                    # refused too; the task function learns it at its next SDK call.
                    log.info("task %s attempt %s is no longer current; stopping its heartbeats",
                             self._ctx.task_id, self._ctx.attempt)
                    return
            if self._uploader is not None:
                self._uploader.flush()


class _Pending:
    """A callback ready to send: its URL and body, and the heartbeats that keep its attempt's
    lease while it waits for the other outcomes of a batch."""

    def __init__(
        self, url: str, body: dict[str, Any], task_id: str, ctx: TaskContext | None = None,
        heartbeater: _Heartbeater | None = None,
    ) -> None:
        self.url = url
        self.body = body
        self.task_id = task_id
        self.ctx = ctx
        self._heartbeater = heartbeater

    def stop_heartbeats(self) -> None:
        if self._heartbeater is not None:
            self._heartbeater.__exit__(None, None, None)
            self._heartbeater = None

    @property
    def stale(self) -> bool:
        return self.ctx is not None and self.ctx.stale

    def stale_answer(self, when: str = "while running; no output stored") -> dict[str, Any]:
        assert self.ctx is not None
        log.info("task %s attempt %s became stale %s, no callback", self.ctx.task_id, self.ctx.attempt, when)
        return dict(self.ctx.refusal or {"accepted": False, "reason": "stale_attempt"})


class _Waiting:
    """One callback in a CallbackBatcher: its answer once sent, or the turn to send a batch."""

    def __init__(self, item: _Pending) -> None:
        self.item = item
        self.answer: dict[str, Any] | Exception | None = None
        self.done = False
        self.woken = threading.Event()


class CallbackBatcher:
    """The callbacks of tasks that end while others are being reported go out together.

    For a process that runs many tasks at once on threads (the local worker of `make dev`):
    each thread whose task ended hands its callback here and waits for the answer. The first
    one finds no batch on its way and sends its own at once; callbacks of tasks that end while
    a batch is on its way queue, and the first of them sends them all next, in one
    `POST /api/callbacks` (chunks of CALLBACK_BATCH; a lone one as a single callback), and so
    on while any are queued. No callback waits for a batch to fill, so an idle worker's
    callback is as quick as before, and a busy one sends one request for many (the group
    commit of databases). A queued task keeps heartbeating until its batch goes. Each answer
    is the callback's own: the server fences and answers each alone.
    """

    def __init__(self, send: Send) -> None:
        self.sender = send
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._sending = False  # a batch is on its way, or its sender's successor is being woken

    @property
    def queued(self) -> int:
        """Callbacks waiting for the batch on its way to be answered."""
        with self._lock:
            return len(self._queue)

    def send(self, item: _Pending) -> dict[str, Any]:
        """Send `item`'s callback with whatever else is queued; its answer (refusals included:
        logged, not raised), or the exception that kept it from being sent."""
        waiting = _Waiting(item)
        with self._lock:
            self._queue.append(waiting)
            sends = not self._sending
            self._sending = True
        while True:
            if sends:
                self._send_queued()
            waiting.woken.wait()
            if waiting.done:
                break
            # Not sent yet: the previous batch's sender passed this thread the turn.
            waiting.woken.clear()
            sends = True
        if isinstance(waiting.answer, Exception):
            raise waiting.answer
        assert waiting.answer is not None
        return waiting.answer

    def _send_queued(self) -> None:
        """Send every queued callback (this thread's own among them), then pass the turn to
        the first one queued meanwhile: no thread sends for others for longer than a batch."""
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            answers = _send_callbacks([w.item for w in batch], self.sender)
        except Exception as exc:  # a bug below: every waiting thread must still be woken
            answers = [exc] * len(batch)
        for waiting, answer in zip(batch, answers, strict=True):
            waiting.answer, waiting.done = answer, True
            waiting.woken.set()
        with self._lock:
            if self._queue:
                self._queue[0].woken.set()
            else:
                self._sending = False


class Worker:
    """A set of task functions and the protocol to run them for the orchestrator."""

    def __init__(self, *, settings: Settings | None = None, send: Send | None = None) -> None:
        self._settings = settings
        self._send = send
        self._tasks: dict[str, TaskFunction] = {}
        self._input_schemas: dict[str, dict[str, Any] | None] = {}
        self._lock = threading.Lock()
        self._keyrings: dict[tuple[Any, ...], TokenKeyring] = {}
        # Signing secrets from registrations, by (orchestrator URL, service): the HTTP service
        # accepts a dispatch signed with any of them (orchestrator.storage.signatures).
        self._dispatch_secrets: dict[tuple[str, str], str] = {}

    @property
    def settings(self) -> Settings:
        # Loaded on first use so that importing a module that defines a Worker needs no env.
        if self._settings is None:
            from orchestrator.config import load_settings

            self._settings = load_settings()
        return self._settings

    def task(self, name: str, *, input_schema: dict[str, Any] | None = None) -> Callable[[F], F]:
        """Decorator: register `fn(ctx) -> JSON-able` under a task name (with the JSON Schema of
        its params, which a registration with the orchestrator publishes)."""
        if not name:
            raise ValueError("a task needs a name")

        def register(fn: F) -> F:
            with self._lock:
                if name in self._tasks and self._tasks[name] is not fn:
                    raise ValueError(f"task {name!r} is already registered")
                self._tasks[name] = fn
                self._input_schemas[name] = input_schema
            return fn

        return register

    def code_hash(self, name: str) -> str:
        """`sha256:` of the task function's source (its module and name when the source is not
        available): a changed function is a new code version for the orchestrator."""
        fn = self._tasks[name]
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
        return "sha256:" + hashlib.sha256(source.encode()).hexdigest()

    def registration(self, *, service: str, version: str, transport: str, endpoint: str) -> dict[str, Any]:
        """The body of `POST /api/workers/register` for this worker's tasks."""
        return {
            "service": service, "version": version, "transport": transport, "endpoint": endpoint,
            "tasks": [{"name": name, "code_hash": self.code_hash(name), "input_schema": self._input_schemas.get(name)}
                      for name in self.task_names],
        }

    def register(
        self, api_url: str, api_key: str, *, service: str, version: str, transport: str, endpoint: str,
    ) -> dict[str, Any]:
        """Register this worker's tasks with the orchestrator (an admin key of the workspace):
        from then on the orchestrator sends these task names to `endpoint`."""
        import httpx

        response = httpx.post(
            api_url.rstrip("/") + "/api/workers/register",
            json=self.registration(service=service, version=version, transport=transport, endpoint=endpoint),
            headers={"Authorization": f"Bearer {api_key}"}, timeout=30,
        )
        body: dict[str, Any] = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"registration refused ({response.status_code}): {body.get('error', body)}")
        secret = body.get("signing_secret")
        if isinstance(secret, str) and secret:
            # Kept for `asgi_app`, which refuses dispatches not signed with it from now on.
            self.add_dispatch_secret(secret, key=(api_url.rstrip("/"), service))
        return body

    def add_dispatch_secret(self, secret: str, *, key: tuple[str, str] | None = None) -> None:
        """Trust dispatches signed with `secret` (the `signing_secret` of a registration answer;
        `register` calls this itself). A replica that did not register can be given it here."""
        if not secret:
            raise ValueError("a dispatch secret must not be empty")
        with self._lock:
            self._dispatch_secrets[key or ("", secret)] = secret

    @property
    def dispatch_secrets(self) -> tuple[str, ...]:
        """The secrets a dispatch's signature is checked against; empty until a registration."""
        with self._lock:
            return tuple(self._dispatch_secrets.values())

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._tasks))

    def keyring(self, settings: Settings | None = None) -> TokenKeyring:
        settings = settings or self.settings
        cache_key = (settings.token_keys, settings.token_issuer, settings.token_audience)
        with self._lock:
            keyring = self._keyrings.get(cache_key)
            if keyring is None:
                keyring = TokenKeyring.from_settings(settings)
                self._keyrings[cache_key] = keyring
            return keyring

    def execute(
        self,
        dispatch: Mapping[str, Any],
        *,
        send: Send | None = None,
        settings: Settings | None = None,
        batcher: CallbackBatcher | None = None,
    ) -> dict[str, Any]:
        """Run one dispatch to completion and return the callback answer (or a rejection).

        With a `batcher` (shared by the threads of one process running many tasks), the
        callback goes out with those of the tasks that finish while another batch is being
        sent: one `POST /api/callbacks` for all of them (see CallbackBatcher); everything else
        goes through the batcher's sender."""
        if batcher is not None:
            started = self._start(dispatch, batcher.sender, settings)
            return batcher.send(started) if isinstance(started, _Pending) else started
        send = send or self._send or _default_send()
        started = self._start(dispatch, send, settings)
        if not isinstance(started, _Pending):
            return started
        started.stop_heartbeats()
        if started.stale:
            # Fenced out while running: no callback (it would be refused, and must not be
            # mistaken for the current attempt's outcome by anyone reading the logs).
            return started.stale_answer("as it ended")
        return send(started.url, started.body)

    def callback_batcher(self, send: Send | None = None) -> CallbackBatcher:
        """A CallbackBatcher for this worker's tasks, sending with `send` (default: the
        worker's own sender, else the SDK's HTTP sender)."""
        return CallbackBatcher(send or self._send or _default_send())

    def execute_many(
        self,
        dispatches: Sequence[Any],
        *,
        send: Send | None = None,
        settings: Settings | None = None,
        executor: Executor | None = None,
    ) -> list[dict[str, Any] | Exception]:
        """Run several dispatches (one after another, or concurrently on `executor`) and report
        their outcomes together: the callbacks for one orchestrator go in one `POST /api/callbacks`
        (up to CALLBACK_BATCH at a time; an orchestrator without that route gets them one by one).
        Until it is sent, a task that finished keeps heartbeating, so its lease does not lapse
        while the others run.

        Returns, for each dispatch in order, what `execute` would have returned for it (the
        callback's answer, refusals included: they are logged, not raised), or the exception
        it would have raised (the callback never got through, or the dispatch is not one)."""
        send = send or self._send or _default_send()

        def start(dispatch: Any) -> dict[str, Any] | _Pending | Exception:
            try:
                return self._start(dispatch, send, settings)
            except Exception as exc:
                return exc

        if executor is not None:
            # Each in a copy of this context, so that retry limits set around this call (a
            # Lambda's deadline) hold on the executor's threads too.
            context = contextvars.copy_context()
            started = list(executor.map(lambda d: context.copy().run(start, d), dispatches))
        else:
            started = [start(d) for d in dispatches]
        outcomes: list[dict[str, Any] | Exception] = [
            item if not isinstance(item, _Pending) else {} for item in started
        ]
        pending = [(index, item) for index, item in enumerate(started) if isinstance(item, _Pending)]
        answers = _send_callbacks([item for _, item in pending], send)
        for (index, _), answer in zip(pending, answers, strict=True):
            outcomes[index] = answer
        return outcomes

    def _start(self, dispatch: Mapping[str, Any], send: Send, settings: Settings | None) -> dict[str, Any] | _Pending:
        """Run one dispatch up to its callback: the callback to send (its heartbeats still going
        while the task ran), or the answer when there is none to send (a rejected dispatch, an
        attempt found stale)."""
        try:
            claims, token = self._authenticate(dispatch, settings)
        except _Refused as refused:
            log.warning("dispatch for task %s rejected: %s", dispatch.get("task_id"), refused.reason)
            return {"status": "rejected", "reason": refused.reason}
        callback_url = str(dispatch["callback_url"])
        name = str(dispatch.get("task", ""))
        fn = self._tasks.get(name)
        if fn is None:
            error = {
                "message": f"no task named {name!r} in this worker (known: {', '.join(self.task_names) or 'none'})",
                "type": "UnknownTask",
                "code": "unknown_task",
                "retryable": False,
            }
            return _Pending(callback_url, {"token": token, "status": "failed", "error": error}, claims.task_id)

        try:
            ctx = TaskContext(dispatch=dispatch, claims=claims, token=token, send=send)
        except MalformedDispatch as exc:
            # The token is good, so the attempt is reported (unlike a refusal): the server
            # otherwise waits for a lease to expire and sends the same message again.
            error = {"message": str(exc)[:MAX_MESSAGE_CHARS], "type": "MalformedDispatch",
                     "code": "malformed_dispatch", "retryable": False}
            return _Pending(callback_url, {"token": token, "status": "failed", "error": error}, claims.task_id)
        first = ctx._beat()
        if _refused(first):
            log.info("task %s attempt %s is no longer current; not running it", ctx.task_id, ctx.attempt)
            return first

        started = time.monotonic()
        uploader = _log_uploader(ctx)
        heartbeater = _Heartbeater(ctx, ctx.heartbeat_interval_s, uploader).__enter__()
        try:
            if uploader is None:
                body = self._run(fn, ctx)
            else:
                with capturing(uploader.task_log):
                    body = self._run(fn, ctx)
        except BaseException:
            heartbeater.__exit__(None, None, None)
            raise
        if uploader is not None and not ctx.stale:
            # Before the callback, for a failure too (its log is the one that matters most):
            # once the attempt is reported finished, the stored log is the whole log. A stale
            # attempt stores nothing more, its log no more than its output: the server already
            # counts that attempt as finished (expired), and its log as complete.
            uploader.flush(final=True)
        pending = _Pending(callback_url, {}, claims.task_id, ctx, heartbeater)
        if body is None or ctx.stale:
            pending.stop_heartbeats()
            return pending.stale_answer()
        log.info(
            "task %s (%s) attempt %s %s in %.3fs",
            ctx.task_id,
            name,
            ctx.attempt,
            body["status"],
            time.monotonic() - started,
        )
        pending.body = {"token": token, **body}
        return pending

    def _authenticate(self, dispatch: Mapping[str, Any], settings: Settings | None) -> tuple[TaskClaims, str]:
        token = dispatch.get("token")
        if not isinstance(token, str) or not token:
            raise _Refused("malformed")
        for url_field in ("callback_url", "heartbeat_url"):
            if not isinstance(dispatch.get(url_field), str) or not dispatch[url_field]:
                raise _Refused("malformed")
        try:
            claims = self.keyring(settings).read(token)
        except TokenInvalid as exc:
            raise _Refused(exc.reason) from exc
        # The plain fields must agree with the token, or the message was tampered with or mixed up.
        if "task_id" in dispatch and str(dispatch["task_id"]) != claims.task_id:
            raise _Refused("mismatch")
        if "attempt" in dispatch and dispatch["attempt"] != claims.attempt:
            raise _Refused("mismatch")
        # The token binds what to run: a token lifted from one dispatch and replayed with another
        # task name or other params runs nothing.
        if dispatch.get("task") != claims.task_name:
            raise _Refused("task_mismatch")
        if params_digest(dispatch.get("params")) != claims.params_sha256:
            raise _Refused("params_mismatch")
        # A mapped child's token binds its item as it binds params: a token lifted from one
        # child's dispatch and replayed with another item runs nothing. (A token that binds no
        # map, as one from a dispatcher that does not bind items, is not checked.)
        if claims.map_sha256 is not None and map_digest(dispatch.get("map")) != claims.map_sha256:
            raise _Refused("map_mismatch")
        return claims, token

    def _run(self, fn: TaskFunction, ctx: TaskContext) -> dict[str, Any] | None:
        """Run the function and store its result; the callback body without the token, or None
        when the attempt became stale (nothing stored, nothing to report)."""
        try:
            result = fn(ctx)
        except StaleAttempt:
            return None
        except TaskFailed as exc:
            if ctx.stale:
                return None
            ctx.log.warning("task %s attempt %s failed: %s", ctx.task_id, ctx.attempt, exc.message)
            return _failure(exc, code=exc.code, retryable=exc.retryable)
        except Exception as exc:
            if ctx.stale:
                return None
            ctx.log.exception("task %s attempt %s raised", ctx.task_id, ctx.attempt)
            return _failure(exc, code="task_error", retryable=True)
        if ctx.stale:
            # Checked again right before the write: a function that ignored StaleAttempt (or
            # never called the SDK again) must not store an output for a fenced-out attempt.
            return None
        try:
            if ctx.storage is None:
                if result is None:
                    return {"status": "succeeded", "output": None}
                raise PermissionError("this task's token carries no storage grant to store its output")
            body = encode_json(result)
            ctx.storage.write_output(body)
        except Exception as exc:
            ctx.log.exception("storing the output of task %s failed", ctx.task_id)
            return _failure(exc, code="output_failed", retryable=True)
        return {
            "status": "succeeded",
            "output": {"key": ctx.storage.output_key, "size": len(body), "sha256": sha256_hex(body)},
        }

    def asgi_app(
        self, path: str = "/dispatch", auth_token: str | None = None, *, settings: Settings | None = None,
        concurrency: int = 8,
    ) -> Starlette:
        """An HTTP worker service for the `http` transport (see orchestrator.worker.service)."""
        # Imported here: a Lambda worker never loads Starlette.
        from orchestrator.worker.service import create_app

        return create_app(self, path=path, auth_token=auth_token, settings=settings, concurrency=concurrency)

    def run_sqs(
        self, queue_url: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
        stop: threading.Event | None = None, max_messages: int = 10, wait_s: int = 20,
        settings: Settings | None = None, client: Any | None = None,
    ) -> int:
        """Poll an SQS queue of dispatches until `stop` is set (see orchestrator.worker.service)."""
        from orchestrator.worker.service import run_sqs

        return run_sqs(
            self, queue_url, endpoint_url=endpoint_url, region=region, stop=stop, max_messages=max_messages,
            wait_s=wait_s, settings=settings, client=client,
        )

    def lambda_handler(self, event: Any, context: Any = None) -> Any:
        """AWS Lambda entry: a dispatch invoked directly, or an SQS batch of dispatches. With a
        Lambda `context`, retries of callbacks and heartbeats stop LAMBDA_DEADLINE_MARGIN_S
        before the invocation's deadline (a callback not delivered by then is left to the
        lease's expiry, or to the queue for an SQS record)."""
        with retry_limits(within_s=_lambda_time_left_s(context)):
            return self._lambda_handler(event)

    def _lambda_handler(self, event: Any) -> Any:
        if isinstance(event, Mapping) and isinstance(event.get("Records"), list):
            # The records run one after another; their callbacks go to the orchestrator together.
            records: list[Any] = event["Records"]
            failed = [False] * len(records)
            dispatches: list[Any] = []
            positions: list[int] = []
            for index, record in enumerate(records):
                try:
                    dispatches.append(json.loads(record["body"]))
                except Exception:
                    log.exception("SQS dispatch %s is not readable", _message_id(record))
                    failed[index] = True
                    continue
                positions.append(index)
            for index, outcome in zip(positions, self.execute_many(dispatches), strict=True):
                if isinstance(outcome, Exception):
                    log.error("SQS dispatch %s failed", _message_id(records[index]), exc_info=outcome)
                    failed[index] = True
            # Partial batch response: only the failed messages go back to the queue.
            return {"batchItemFailures": [{"itemIdentifier": _message_id(record)}
                                          for record, bad in zip(records, failed, strict=True) if bad]}
        if not isinstance(event, Mapping):
            raise TypeError("a worker Lambda expects a dispatch object or an SQS event")
        return self.execute(event)


def _lambda_time_left_s(context: Any) -> float | None:
    """Seconds the Lambda invocation may still retry (its remaining time less the margin), or
    None outside Lambda (no context, or one without get_remaining_time_in_millis)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return None
    try:
        millis = float(remaining())
    except (TypeError, ValueError):
        return None
    return max(0.0, millis / 1000.0 - LAMBDA_DEADLINE_MARGIN_S)


def _log_uploader(ctx: TaskContext) -> LogUploader | None:
    """The uploader of this attempt's log, or None when its grant stores no log (a token from
    an orchestrator without task logs): then nothing is captured either."""
    storage = ctx.storage
    if storage is None or storage.log_key is None:
        return None
    return LogUploader(TaskLog(), storage.write_log, what=f"task {ctx.task_id} attempt {ctx.attempt}")


def _failure(exc: BaseException, *, code: str, retryable: bool) -> dict[str, Any]:
    message = str(exc) or type(exc).__name__
    tb = "".join(traceback.format_exception(exc))
    return {
        "status": "failed",
        "error": {
            "message": message[:MAX_MESSAGE_CHARS],
            "type": type(exc).__name__,
            "code": code,
            "retryable": retryable,
            # The end of a traceback is where the error is; keep that part.
            "traceback": tb[-MAX_TRACEBACK_CHARS:],
        },
    }


def _refused(answer: Mapping[str, Any]) -> bool:
    """The server refused a heartbeat: a stale/fenced attempt or an error answer."""
    return answer.get("accepted") is False or "error" in answer


def _refs(value: Any) -> dict[str, str]:
    """`{"name": {"key": "..."}}` -> `{"name": "..."}`, ignoring entries without a key."""
    if not isinstance(value, Mapping):
        return {}
    refs: dict[str, str] = {}
    for name, ref in value.items():
        if isinstance(ref, Mapping) and isinstance(ref.get("key"), str):
            refs[str(name)] = ref["key"]
    return refs


def _parse_map(value: Any) -> dict[str, Any] | None:
    """The dispatch's `map` field ({"index", "item", "count"}) checked, or None when absent."""
    if value is None:
        return None
    shape = "the dispatch's map field must be {\"index\": int >= 0, \"item\": any, \"count\": int > index}"
    if not isinstance(value, Mapping) or "item" not in value:
        raise MalformedDispatch(f"{shape}; got {_preview(value)}")
    index, count = value.get("index"), value.get("count")
    for name, number in (("index", index), ("count", count)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise MalformedDispatch(f"{shape}; its {name} is {_preview(number)}")
    assert isinstance(index, int) and isinstance(count, int)
    if index >= count:
        raise MalformedDispatch(f"{shape}; its index {index} is not below its count {count}")
    return {"index": index, "item": value["item"], "count": count}


def _preview(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_urls_url(heartbeat_url: str, callback_url: str) -> str | None:
    """`{api}/worker/read-urls` of the orchestrator that sent the dispatch: derived from its
    heartbeat URL (`{api}/heartbeat`) or callback URL (`{api}/callback/{task_id}`), which keeps
    any path prefix in front of `/api` (an API Gateway stage)."""
    if heartbeat_url.endswith("/api/heartbeat"):
        return heartbeat_url[: -len("heartbeat")] + "worker/read-urls"
    head, found, _ = callback_url.rpartition("/api/callback/")
    if found:
        return head + "/api/worker/read-urls"
    return None


def _parse_deadline(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _message_id(record: Any) -> str:
    return str(record.get("messageId", "")) if isinstance(record, Mapping) else ""


def _callbacks_url(callback_url: str) -> str | None:
    """`{api}/api/callbacks` of the orchestrator whose callback URL is `{api}/api/callback/{task_id}`
    (any path prefix in front of `/api`, an API Gateway stage, kept); None for another shape."""
    head, found, _ = callback_url.rpartition("/api/callback/")
    return head + "/api/callbacks" if found else None


def _send_callbacks(pending: Sequence[_Pending], send: Send) -> list[dict[str, Any] | Exception]:
    """Send the callbacks of a batch: those for one orchestrator together, in chunks of at most
    CALLBACK_BATCH callbacks and CALLBACK_BATCH_BYTES; a lone one, one whose URL has another
    shape, or a chunk the orchestrator could not take as a batch (an older server without the
    route answers 404), one by one. Each answer, or the exception that kept it from being sent."""
    answers: list[dict[str, Any] | Exception | None] = [None] * len(pending)
    groups: dict[str | None, list[int]] = {}
    for index, item in enumerate(pending):
        item.stop_heartbeats()
        if item.stale:  # a heartbeat found it stale while it waited: nothing to report
            answers[index] = item.stale_answer("while its callback waited for the batch")
        else:
            groups.setdefault(_callbacks_url(item.url), []).append(index)
    for batch_url, indexes in groups.items():
        if batch_url is None or len(indexes) == 1:
            for index in indexes:
                answers[index] = _send_one(pending[index], send)
            continue
        for chunk in _chunks([pending[i] for i in indexes], indexes):
            items = [pending[i] for i in chunk]
            try:
                results = _post_batch(batch_url, items, send)
            except Exception as exc:  # unreachable after the sender's retries: none was delivered
                log.warning("POST %s failed for %d callbacks: %s", batch_url, len(items), exc)
                for index in chunk:
                    answers[index] = exc
                continue
            delivered: Sequence[dict[str, Any] | Exception] = (
                results if results is not None else [_send_one(item, send) for item in items])
            for index, answer in zip(chunk, delivered, strict=True):
                answers[index] = answer
    sent = [answer for answer in answers if answer is not None]
    assert len(sent) == len(pending)
    for item, outcome in zip(pending, sent, strict=True):
        if isinstance(outcome, dict):
            _log_refusal(item.task_id, outcome)
    return sent


def _chunks(items: Sequence[_Pending], indexes: Sequence[int]) -> Iterator[list[int]]:
    chunk: list[int] = []
    size = 0
    for item, index in zip(items, indexes, strict=True):
        item_size = len(json.dumps(item.body, default=str)) + 64
        if chunk and (len(chunk) == CALLBACK_BATCH or size + item_size > CALLBACK_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(index)
        size += item_size
    if chunk:
        yield chunk


def _send_one(item: _Pending, send: Send) -> dict[str, Any] | Exception:
    try:
        return send(item.url, item.body)
    except Exception as exc:
        return exc


def _post_batch(url: str, items: Sequence[_Pending], send: Send) -> list[dict[str, Any]] | None:
    """The answers of one `POST /api/callbacks`, each shaped as the single callback's answer (a
    refusal carries `http_status`, as HttpSender gives it); None when the orchestrator did not
    take the batch (they are then sent one by one). Raises when it could not be reached, or kept
    throttling or failing until the retries' deadline."""
    body = {"callbacks": [{"task_id": item.task_id, **item.body} for item in items]}
    try:
        with retry_limits(tries_on_500=BATCH_TRIES_ON_500):
            answer = send(url, body)
    except TransientHTTPError as exc:
        if exc.status != 500:
            raise
        log.warning("POST %s kept answering 500; sending its %d callbacks one by one", url, len(items))
        return None
    except httpx.TransportError:
        raise
    except Exception:
        log.warning("POST %s failed; sending its %d callbacks one by one", url, len(items), exc_info=True)
        return None
    results = answer.get("results") if isinstance(answer, Mapping) else None
    if not (isinstance(results, list) and len(results) == len(items) and all(isinstance(r, Mapping) for r in results)):
        status = answer.get("http_status") if isinstance(answer, Mapping) else None
        if status == 404:
            log.info("the orchestrator has no POST %s (an older version); sending callbacks one by one", url)
        else:
            log.warning("POST %s answered %s, not one answer per callback; sending its %d callbacks one by one",
                        url, status or "200", len(items))
        return None
    answers: list[dict[str, Any]] = []
    for result in results:
        item_answer = {key: value for key, value in result.items() if key != "status"}
        status = result.get("status")
        if status != 200:
            item_answer["http_status"] = status
        answers.append(item_answer)
    return answers


def _log_refusal(task_id: str, answer: Mapping[str, Any]) -> None:
    if answer.get("accepted") is False and "error" in answer:
        problem = answer["error"]
        reason = (f"{problem.get('code')}: {problem.get('message')}" if isinstance(problem, Mapping)
                  else str(problem))
        log.warning("the callback of task %s was refused (%s): %s", task_id, answer.get("http_status"), reason)


_default_sender: HttpSender | None = None
_default_sender_lock = threading.Lock()


def _default_send() -> HttpSender:
    global _default_sender
    with _default_sender_lock:
        if _default_sender is None:
            _default_sender = HttpSender()
        return _default_sender
