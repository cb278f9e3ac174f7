"""Printing: the machine, the table of figures, where backends waited, and the ratios."""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg

from bench.measure import Result
from bench.server import Server

_FIGURE = re.compile(r"[-\d.,]+")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def header(server: Server, peer_version: str | None) -> str:
    lines = [
        f"date:      {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"command:   {Path(sys.executable).name} -m bench.claim_throughput {' '.join(sys.argv[1:])}".rstrip(),
        f"machine:   {os.cpu_count()} CPUs ({_cpu_model()}), {_memory()} RAM,"
        f" load average at start {os.getloadavg()[0]:.2f}",
        f"postgres:  {server.version()} ({'DATABASE_URL' if server.postmaster_pid is None else 'embedded'});"
        f" fsync={server.scalar('SHOW fsync')} synchronous_commit={server.scalar('SHOW synchronous_commit')}"
        f" shared_buffers={server.scalar('SHOW shared_buffers')}",
        f"client:    Python {platform.python_version()}, psycopg {psycopg.__version__}"
        + (f", pgqueuer {peer_version}" if peer_version else ""),
    ]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _count(value: float) -> str:
    """Statements or round trips per item: batched work costs a small fraction, so keep its digits."""
    return f"{value:.3f}" if value >= 0.01 or value == 0 else f"{value:.5f}"


def table(results: Sequence[Result]) -> str:
    columns = ["system", "case", "conns", "items", "s", "items/s", "stmts/item", "trips/item",
               "WAL B/item", "client CPU ms/item", "server CPU ms/item", "lock wait %"]
    rows = [[
        r.system, r.case, str(r.clients), str(r.items), _num(r.seconds, 2), _num(r.rate, 0),
        _count(r.per_item(r.statements)), _count(r.per_item(r.round_trips)), _num(r.per_item(r.wal_bytes), 0),
        _num(r.per_item(r.client_cpu_s * 1000), 3),
        _num(None if r.server_cpu_s is None else r.per_item(r.server_cpu_s * 1000), 3),
        _num(r.waits.share("Lock:") * 100, 1),
    ] for r in results]
    return _render(columns, rows)


def waits(results: Sequence[Result]) -> str:
    """Where the measured database's backends were, as shares of pg_stat_activity samples."""
    rows = [[r.system, r.case, str(r.clients), str(r.waits.polls),
             ", ".join(f"{name} {share:.0%}" for name, share in r.waits.top(4))] for r in results]
    return _render(["system", "case", "conns", "samples", "backend states (top 4)"], rows)


def _render(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        # Figures right-aligned, text left-aligned.
        return "| " + " | ".join(
            cell.rjust(w) if _FIGURE.fullmatch(cell) else cell.ljust(w)
            for cell, w in zip(cells, widths, strict=True)
        ) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), separator, *(line(row) for row in rows)])


def _find(results: Sequence[Result], system: str, case: str, clients: int) -> Result | None:
    return next((r for r in results if r.system == system and r.case == case and r.clients == clients), None)


def trigger_note(results: Sequence[Result], nodes: int) -> str:
    trigger = _find(results, "tickweave", "trigger run", 1)
    if trigger is None or not trigger.items:
        return ""
    runs = trigger.items // nodes
    return f"tickweave trigger run: {trigger.seconds / runs:.2f} s per run of {nodes:,} tasks ({runs} runs)"


def ratios(results: Sequence[Result], clients: Sequence[int]) -> str:
    peers = sorted({r.system for r in results if r.system.startswith("pgqueuer")})
    references = [(system, "dequeue+complete", f"{system} dequeue+complete") for system in peers]
    references.append(("pgbench", "1-row UPDATE", "pgbench 1-row UPDATE tps"))
    lines: list[str] = []
    for count in clients:
        cycle = _find(results, "tickweave", "claim+finish", count)
        if cycle is None:
            continue
        for system, case, label in references:
            other = _find(results, system, case, count)
            if other is not None and other.rate > 0:
                lines.append(f"{count} conn: tickweave claim+finish / {label} = "
                             f"{cycle.rate:,.0f} / {other.rate:,.0f} = {cycle.rate / other.rate:.2f}")
    return "\n".join(lines)
