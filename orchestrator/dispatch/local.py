"""The in-process transport: runs tasks of a local `Worker` on a thread pool.

For `make dev` and tests. The worker code is the same SDK a remote worker runs: it reads the
token, uses the storage grant, and calls back over HTTP to the API's public URL. The callbacks
of tasks that end while others are being reported go together in one `POST /api/callbacks`
(orchestrator.worker.sdk.CallbackBatcher): a busy local worker sends one request for many.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from orchestrator.config import Settings
from orchestrator.dispatch.base import DispatchError
from orchestrator.worker import Worker

log = logging.getLogger(__name__)


def load_worker(spec: str) -> Worker:
    """`package.module:attribute` -> the Worker object there."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"local worker must look like 'module:attribute', got {spec!r}")
    worker = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(worker, Worker):
        raise ValueError(f"{spec} is not an orchestrator.worker.Worker")
    return worker


class LocalTransport:
    name = "local"
    # `send` queues the message for this process's threads: no network to wait on (see base.py).
    sends_in_memory = True

    def __init__(self, worker: Worker, *, settings: Settings | None = None, threads: int = 8) -> None:
        self.worker = worker
        # The server's settings: the in-process worker reads tokens with the server's key ring
        # whatever its own environment says.
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tickweave-local-worker")
        self._threads = threads
        self._in_flight = 0
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)  # notified as each task ends
        # What each unfinished future runs: (task id, attempt), for `drain` to report.
        self._attempts: dict[Future[Any], tuple[str, int]] = {}
        self._accepting = True
        self.batcher = worker.callback_batcher()

    def send(self, message: dict[str, Any]) -> None:
        # An unknown task name is the worker's to report (a non-retryable failed callback),
        # not a delivery failure: redelivery would not help.
        with self._lock:
            if not self._accepting:
                # A delivery failure: the task goes back to ready and is sent again later
                # (by the next start of `make dev`), without spending an attempt.
                raise DispatchError("the local worker is stopping")
            self._in_flight += 1
        try:
            future = self._pool.submit(self.worker.execute, message, settings=self.settings, batcher=self.batcher)
        except RuntimeError as exc:  # the pool is shut down
            self._done(None)
            raise DispatchError(str(exc)) from exc
        with self._lock:
            self._attempts[future] = (str(message.get("task_id")), int(message.get("attempt") or 0))
        future.add_done_callback(self._done)

    def capacity(self) -> int:
        with self._lock:
            return max(0, self._threads - self._in_flight)

    def drain(self, timeout_s: float, *, hurry: threading.Event | None = None) -> list[tuple[str, int]]:
        """Stop taking tasks and wait up to `timeout_s` (or until `hurry` is set) for the ones
        started or queued to finish, callbacks included. Returns the (task id, attempt) of those
        still unfinished: the caller hands them back (orchestrator.engine.hand_back) before the
        API and storage they need go away."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._accepting = False
        with self._finished:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0 or (hurry is not None and hurry.is_set()):
                    return sorted(set(self._attempts.values()))
                # Woken by each task's end; the short bound is for `hurry`, which notifies nobody.
                self._finished.wait(min(0.1, left))
            return []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _done(self, future: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if future is not None:
                self._attempts.pop(future, None)
            self._finished.notify_all()
        if future is not None:
            _log_failure(future)


def _log_failure(future: Future[Any]) -> None:
    if future.cancelled():  # queued when the transport closed: its task is handed back or expires
        return
    exc = future.exception()
    if exc is not None:
        log.error("local worker crashed: %r", exc)
