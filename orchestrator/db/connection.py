"""Connections: one small thread-safe pool per process.

On Lambda the pool holds one connection reused across invocations; a connection found broken
is dropped and a new one opened. Between invocations the environment is frozen, and the
server or RDS Proxy may close an idle connection meanwhile, so a connection idle longer than
`check_idle_s` is checked with an empty query (one round trip) before it is handed out, and a
transaction whose BEGIN fails on a reused connection is begun again on a new one (nothing has
run yet). No session state is relied on (RDS Proxy pins sessions that use it), and server-side
prepared statements are off (`prepare_threshold=None`) for the same reason.

A rotated password: when the database refuses a new connection's login (SQLSTATE 28P01 or
28000) and the pool was given `reread_url` (DATABASE_URL came from a Secrets Manager secret),
the URL is read again once, fresh from the service, the idle connections are closed, and the
connection is opened with the new URL; a second refusal is raised. Without this, every warm
environment would fail at its next reconnect until it is recycled.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

Row = dict[str, Any]
log = logging.getLogger(__name__)
Connection = psycopg.Connection[Row]
T = TypeVar("T")

# Transactions that lost a deadlock or a serialization race are safe to replay whole.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (errors.DeadlockDetected, errors.SerializationFailure)


# Seconds a connection attempt may take before it fails, unless the URL says otherwise: a
# Lambda with an unreachable database should fail within its timeout, not hang through it.
DEFAULT_CONNECT_TIMEOUT_S = 10
# A pooled connection idle at least this long is checked before reuse.
DEFAULT_CHECK_IDLE_S = 5.0

# A login the server refused: invalid_password, invalid_authorization_specification.
AUTHENTICATION_FAILED_SQLSTATES = ("28P01", "28000")
# libpq reports a refused login before there is any result to carry a SQLSTATE, so psycopg
# raises a bare OperationalError; the server's FATAL message tells the two apart (Postgres, RDS
# and RDS Proxy send them in English).
_AUTHENTICATION_FAILED = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry"
    r"|pg_hba\.conf rejects connection|role \".*\" does not exist|has no credentials for the role",
    re.IGNORECASE,
)


def is_authentication_failure(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing a login (a wrong password, an unknown role)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate in AUTHENTICATION_FAILED_SQLSTATES or bool(_AUTHENTICATION_FAILED.search(str(exc)))


def connect(url: str, *, autocommit: bool = True) -> Connection:
    options: dict[str, Any] = {}
    if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(url):
        options["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
    return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row, prepare_threshold=None, **options)


class Database:
    """A bounded pool of autocommit connections; `transaction()` opens an explicit transaction.

    `check_idle_s`: a pooled connection idle at least this long is checked with an empty query
    before reuse (None: never check). `reread_url`: reads the URL again (its password rotated)
    when the server refuses a login; None: a refused login is raised at once."""

    def __init__(self, url: str, *, max_size: int = 10, check_idle_s: float | None = DEFAULT_CHECK_IDLE_S,
                 reread_url: Callable[[], str] | None = None) -> None:
        self.url = url
        self._reread_url = reread_url
        self._url_lock = threading.Lock()
        self._max_size = max_size
        self._check_idle_s = check_idle_s
        # (connection, time.monotonic() when it went idle)
        self._idle: queue.LifoQueue[tuple[Connection, float]] = queue.LifoQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._available = threading.Semaphore(max_size)

    @property
    def opened(self) -> int:
        """Connections this pool holds open now (in use or idle)."""
        with self._lock:
            return self._opened

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._checkout() as (conn, _reused):
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        for attempt in (1, 2):
            with ExitStack() as stack:
                conn, reused = stack.enter_context(self._checkout())
                try:
                    stack.enter_context(conn.transaction())  # sends BEGIN
                except psycopg.OperationalError:
                    if reused and attempt == 1:
                        # The pooled connection died while idle; nothing ran, so begin again on a
                        # new one. Leaving the stack returns the broken connection, which drops it.
                        continue
                    raise
                yield conn
                return

    @contextmanager
    def _checkout(self) -> Iterator[tuple[Connection, bool]]:
        """A connection and whether it was reused from the pool (False: opened just now)."""
        self._available.acquire()
        conn: Connection | None = None
        try:
            conn, reused = self._take()
            yield conn, reused
        except psycopg.OperationalError:
            # A broken connection is not returned to the pool.
            if conn is not None:
                self._discard(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                if (conn.closed or conn.broken
                        or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE):
                    self._discard(conn)
                else:
                    self._idle.put((conn, time.monotonic()))
            self._available.release()

    def run_in_transaction(
        self, work: Callable[[Connection], T], *, attempts: int = 5, reconnect_within_s: float = 10.0
    ) -> T:
        """Run `work` in a transaction, replaying it whole after a deadlock or serialization
        failure, and after a lost connection (a database restart or failover) for up to
        `reconnect_within_s`. Replaying is safe because every transition is guarded by the state
        it expects: a transition that did commit before the connection dropped is refused the
        second time, and the caller is told so."""
        return self._replayed(self.transaction, work, attempts, reconnect_within_s)

    def run_statement(
        self, work: Callable[[Connection], T], *, attempts: int = 5, reconnect_within_s: float = 10.0
    ) -> T:
        """Run `work`, one statement, on an autocommit connection: the statement is its own
        transaction (one round trip, one commit, no BEGIN). Replayed like `run_in_transaction`:
        the statement either committed whole or not at all, and a replay of one that did is
        refused by its guards."""
        return self._replayed(self.connection, work, attempts, reconnect_within_s)

    def _replayed(
        self, open_connection: Callable[[], AbstractContextManager[Connection]], work: Callable[[Connection], T],
        attempts: int, reconnect_within_s: float,
    ) -> T:
        deadline = time.monotonic() + reconnect_within_s
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                with open_connection() as conn:
                    return work(conn)
            except RETRYABLE_ERRORS as exc:
                if attempt >= attempts:
                    raise
                log.info("replaying a transaction (attempt %d) after %s: %s", attempt + 1, type(exc).__name__,
                         str(exc).replace("\n", " | ")[:2000])
                # Apart by a random pause (up to 10, 20, 40, 80 ms): transactions that met in
                # opposite orders and are replayed at once tend to meet again.
                time.sleep(random.uniform(0, 0.005 * 2**attempt))
            except psycopg.OperationalError as exc:
                # A refused login stays refused (the URL was already read again once): no replay.
                if is_authentication_failure(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # back off while the server comes back
                delay = min(delay * 2, 1.0)

    def close(self) -> None:
        while True:
            try:
                conn, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            self._discard(conn)

    def _take(self) -> tuple[Connection, bool]:
        while True:
            try:
                conn, idle_since = self._idle.get_nowait()
            except queue.Empty:
                break
            if conn.closed or conn.broken:
                self._discard(conn)
                continue
            if (self._check_idle_s is not None and time.monotonic() - idle_since >= self._check_idle_s
                    and not _alive(conn)):
                self._discard(conn)
                continue
            return conn, True
        conn = self._open()
        with self._lock:
            self._opened += 1
        return conn, False

    def _open(self) -> Connection:
        """A new connection; after a refused login, once more with the URL read again."""
        url = self.url
        try:
            return connect(url)
        except psycopg.OperationalError as exc:
            if self._reread_url is None or not is_authentication_failure(exc):
                raise
            refused = exc
        with self._url_lock:
            if self.url == url:  # not yet read again by another thread that was refused too
                fresh = self._reread_url()
                if fresh == url:
                    raise refused  # the secret still holds the refused password
                self.url = fresh
                # The pool is rebuilt on the new password: idle connections logged in with the
                # old one are closed rather than kept alongside (the old password may be gone).
                self.close()
        return connect(self.url)  # a second refusal is raised

    def _discard(self, conn: Connection) -> None:
        with self._lock:
            self._opened -= 1
        with suppress(Exception):  # closing a broken connection may itself fail
            conn.close()


def _alive(conn: Connection) -> bool:
    """One round trip with an empty query (no statement runs); False if the connection is dead."""
    try:
        conn.execute("")
    except psycopg.Error:
        return False
    return True
