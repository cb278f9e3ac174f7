"""The in-process transport: runs tasks of a local `Worker` on a thread pool.

For `make dev` and tests. The worker code is the same SDK a remote worker runs: it reads the
token, uses the storage grant, and calls back over HTTP to the API's public URL.
"""

from __future__ import annotations

import importlib
import logging
import threading
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

    def __init__(self, worker: Worker, *, settings: Settings | None = None, threads: int = 8) -> None:
        self.worker = worker
        # The server's settings: the in-process worker reads tokens with the server's key ring
        # whatever its own environment says.
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tickweave-local-worker")
        self._threads = threads
        self._in_flight = 0
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        # An unknown task name is the worker's to report (a non-retryable failed callback),
        # not a delivery failure: redelivery would not help.
        with self._lock:
            self._in_flight += 1
        try:
            future = self._pool.submit(self.worker.execute, message, settings=self.settings)
        except RuntimeError as exc:  # the pool is shut down
            self._done(None)
            raise DispatchError(str(exc)) from exc
        future.add_done_callback(self._done)

    def capacity(self) -> int:
        with self._lock:
            return max(0, self._threads - self._in_flight)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _done(self, future: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1
        if future is not None:
            _log_failure(future)


def _log_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("local worker crashed: %r", exc)
