"""Connections: one small thread-safe pool per process.

On Lambda the pool holds one connection reused across invocations; a connection found broken
is dropped and a new one opened. No session state is relied on (RDS Proxy pins sessions that
use it), and server-side prepared statements are off for the same reason.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

Row = dict[str, Any]
Connection = psycopg.Connection[Row]
T = TypeVar("T")

# Transactions that lost a deadlock or a serialization race are safe to replay whole.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (errors.DeadlockDetected, errors.SerializationFailure)


def connect(url: str, *, autocommit: bool = True) -> Connection:
    return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row, prepare_threshold=None)


class Database:
    """A bounded pool of autocommit connections; `transaction()` opens an explicit transaction."""

    def __init__(self, url: str, *, max_size: int = 10) -> None:
        self.url = url
        self._max_size = max_size
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._available = threading.Semaphore(max_size)

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        self._available.acquire()
        conn: Connection | None = None
        try:
            conn = self._take()
            yield conn
        except psycopg.OperationalError:
            # A broken connection is not returned to the pool.
            if conn is not None:
                self._discard(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    self._discard(conn)
                else:
                    self._idle.put(conn)
            self._available.release()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def run_in_transaction(self, work: Callable[[Connection], T], *, attempts: int = 5) -> T:
        """Run `work` in a transaction, replaying it whole after a deadlock or serialization failure."""
        for attempt in range(1, attempts + 1):
            try:
                with self.transaction() as conn:
                    return work(conn)
            except RETRYABLE_ERRORS:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            self._discard(conn)

    def _take(self) -> Connection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not conn.closed and not conn.broken:
                return conn
            self._discard(conn)
        conn = connect(self.url)
        with self._lock:
            self._opened += 1
        return conn

    def _discard(self, conn: Connection) -> None:
        with self._lock:
            self._opened -= 1
        with suppress(Exception):  # closing a broken connection may itself fail
            conn.close()
