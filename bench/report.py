"""Printing: the machine, the table of figures, where backends waited, and the ratios."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


# --- python -m bench: the whole suite's report -------------------------------------------------

render = _render


def load_average() -> float:
    return os.getloadavg()[0]


def suite_header(server: Server, args: Any, argv: Sequence[str]) -> str:
    versions = [f"Python {platform.python_version()}", f"psycopg {psycopg.__version__}"]
    for package in ("pgqueuer", "asyncpg", "procrastinate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{package} {importlib.metadata.version(package)}")
    return "\n".join([
        "# Tickweave benchmarks",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `python -m bench {' '.join(argv)}`".rstrip("` ") + "`",
        f"- Parts: {', '.join(args.parts)}{' (--quick sizes)' if args.quick else ''}",
        f"- Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {_memory()} RAM; load average at the start "
        f"{load_average():.2f}",
        f"- Postgres: {server.version()} ({'DATABASE_URL' if server.postmaster_pid is None else 'embedded'});"
        f" fsync={server.scalar('SHOW fsync')}, synchronous_commit={server.scalar('SHOW synchronous_commit')},"
        f" shared_buffers={server.scalar('SHOW shared_buffers')}",
        f"- Client: {', '.join(versions)}",
    ])


def commits(r: Result) -> float:
    """Commits per item. Tickweave: its explicit transactions and its autocommit writes (a
    callback's one statement; its autocommit reads do not write); the peers run every statement
    in autocommit (each its own commit); pgbench: one per item."""
    if r.system == "tickweave":
        if r.commits is not None:
            return r.per_item(r.commits)
        return r.per_item((r.round_trips - r.statements) / 2)
    return r.per_item(r.statements)


def books(results: Sequence[Result], found: dict[tuple[str, int], int]) -> str:
    """The invariant checker's verdict over each case's database after the case."""
    rows = [[r.case, str(r.clients), "clean" if found.get((r.case, r.clients)) == 0
             else f"{found.get((r.case, r.clients), '?')} violation(s)"] for r in results]
    return "Invariant checker (`tickweave db check`) after each case:\n\n" + _render(["case", "conns", "books"], rows)


def suite_table(results: Sequence[Result]) -> str:
    columns = ["system", "case", "conns", "items", "s", "items/s", "stmts/item", "trips/item", "commits/item",
               "WAL B/item", "client CPU ms/item", "server CPU ms/item", "lock wait %"]
    rows = [[
        r.system, r.case, str(r.clients), str(r.items), _num(r.seconds, 2), _num(r.rate, 0),
        _count(r.per_item(r.statements)), _count(r.per_item(r.round_trips)), _count(commits(r)),
        _num(r.per_item(r.wal_bytes), 0), _num(r.per_item(r.client_cpu_s * 1000), 3),
        _num(None if r.server_cpu_s is None else r.per_item(r.server_cpu_s * 1000), 3),
        _num(r.waits.share("Lock:") * 100, 1),
    ] for r in results]
    return _render(columns, rows)


def profile(explained: Any, plain: Any) -> str:
    n = plain.callbacks or 1
    phases = [[name, _num(ms / n, 3)] for name, ms in plain.phases_ms.items()]
    in_statement = ("completions.complete_attempts",)
    statements_ms = sum(plain.statements[k].client_ms for k in in_statement if k in plain.statements)
    statement_phase_ms = plain.phases_ms.get("the callback's statement (autocommit)", 0.0)
    phases.append(["  of which: pool, replay guard, parsing the answer (phase - the statement)",
                   _num((statement_phase_ms - statements_ms) / n, 3)])
    rows: list[list[str]] = []
    for name, stats in plain.statements.items():
        server = explained.statements.get(name)
        calls = max(1, server.calls if server else 1)
        rows.append([name, _num(stats.calls / n, 2), _num(stats.client_ms / max(1, stats.calls), 3),
                     _num(server.plan_ms / calls, 3) if server else "-",
                     _num(server.exec_ms / calls, 3) if server else "-"])
    plan_total = sum(s.plan_ms for s in explained.statements.values()) / max(1, explained.callbacks)
    exec_total = sum(s.exec_ms for s in explained.statements.values()) / max(1, explained.callbacks)
    return "\n".join([
        f"{plain.callbacks} callbacks; {plain.statement_count / n:.2f} statements and "
        f"{plain.transactions / n:.2f} explicit transactions per callback.",
        "",
        _render(["phase", "ms per callback"], phases),
        "",
        _render(["statement (store function)", "per callback", "client ms each", "plan ms each", "exec ms each"],
                rows),
        "",
        f"Server time per callback from EXPLAIN ANALYZE: planning {plan_total:.3f} ms, execution "
        f"{exec_total:.3f} ms.",
    ])


def idle(data: Any) -> str:
    rows = [[f"{lv.schedules:,}", f"{lv.finished_tasks:,}", f"{lv.finished_runs:,}", str(lv.ticks),
             _num(lv.median_ms, 2), _num(lv.p95_ms, 2), _num(lv.max_ms, 2), _num(lv.statements_per_tick, 1)]
            for lv in data.levels]
    out = [_render(["schedules", "finished tasks", "finished runs", "ticks", "median ms", "p95 ms", "max ms",
                    "statements/tick"], rows), "",
           f"Plans of the statements of one idle tick (at {data.levels[-1].schedules:,} schedules), "
           "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF), rolled back:" if data.levels else "Plans:"]
    for planned in data.plans:
        out += ["", f"`{planned.query[:300]}{' ...' if len(planned.query) > 300 else ''}`", "", "```",
                planned.plan, "```"]
    return "\n".join(out)


def scale(big: Any, workspace: Any) -> str:
    rows = [
        [f"pipeline of {big.nodes:,} nodes, {big.edges:,} edges", "validate (model + node graph)",
         _num(big.validate_s, 3)],
        ["", "register (Engine.create_pipeline)", _num(big.register_s, 3)],
        ["", "trigger (Engine.trigger_run: bulk insert)", _num(big.trigger_s, 3)],
        ["", f"complete (no-op transport, {big.callers} tick callers)", _num(big.complete_s, 3)],
        [f"workspace of {workspace.pipelines:,} pipelines, {workspace.depends:,} depends",
         "validate each definition", _num(workspace.validate_each_s, 3)],
        ["", "pipeline_level_errors over all", _num(workspace.pipeline_level_s, 3)],
    ]
    return _render(["what", "phase", "s"], rows) + (
        f"\n\nCompleting the big run: {big.nodes / big.complete_s:,.0f} tasks/s." if big.complete_s else "")


def memory(m: Any) -> str:
    rows = [[f"{m.tasks:,}", f"{m.dispatched:,}", _num(m.rss_before_mb, 1), _num(m.peak_rss_mb, 1),
             _num(m.peak_rss_mb - m.rss_before_mb, 1), _num(m.tracemalloc_peak_mb, 1), _num(m.tick_s, 2)]]
    note = "" if m.peak_reset else "\n\n(/proc/self/clear_refs was not writable: the peak includes the imports.)"
    return _render(["tasks", "dispatched", "RSS before MB", "peak RSS MB", "peak - before MB",
                    "tracemalloc peak MB", "tick s"], rows) + note


def _rate(results: Sequence[Result], system: str, case_prefix: str, clients: int) -> float | None:
    found = [r for r in results if r.system == system and r.case.startswith(case_prefix) and r.clients == clients]
    return found[0].rate if found else None


def summary(results: Sequence[Result], facts: dict[str, Any], callers: Sequence[int]) -> str:
    out: list[str] = []
    peers = sorted({r.system for r in results if r.system.startswith(("pgqueuer", "procrastinate"))})
    lifecycle = [r for r in results if r.system == "tickweave" and r.case.startswith("lifecycle")]
    if lifecycle and (peers or any(r.system == "pgbench" for r in results)):
        columns = ["Tickweave", "conns", "tasks/s", *[f"÷ {p} drain" for p in peers], "÷ pgbench tps"]
        rows = []
        for r in lifecycle:
            refs = [_rate(results, p, "dequeue+complete", r.clients) for p in peers]
            refs.append(_rate(results, "pgbench", "1-row UPDATE", r.clients))
            rows.append([r.case, str(r.clients), _num(r.rate, 0),
                         *[f"{r.rate / x:.2f}" if x else "-" for x in refs]])
        out += ["## Ratios (same connection count, same server)", "", _render(columns, rows), ""]
    if lifecycle:
        rows = [[r.case, str(r.clients), _count(r.per_item(r.statements)), _count(r.per_item(r.round_trips)),
                 _count(commits(r)), _num(None if r.server_cpu_s is None else r.per_item(r.server_cpu_s * 1000), 3)]
                for r in lifecycle]
        rows += [[f"{r.system} {r.case}", str(r.clients), _count(r.per_item(r.statements)),
                  _count(r.per_item(r.round_trips)), _count(commits(r)),
                  _num(None if r.server_cpu_s is None else r.per_item(r.server_cpu_s * 1000), 3)]
                 for r in results if r.system == "pgbench"]
        out += ["## Statements and commits per task (the gap to the ceiling)", "",
                _render(["case", "conns", "statements", "round trips", "commits", "server CPU ms"], rows), ""]
    targets = _targets(results, facts, callers)
    if targets:
        out += ["## Targets", "", _render(["target", "measured", "met"], targets)]
    return "\n".join(out).rstrip()


def _targets(results: Sequence[Result], facts: dict[str, Any], callers: Sequence[int]) -> list[list[str]]:
    rows: list[list[str]] = []
    drains = [r for r in results if r.case == "dequeue+complete" and r.system.startswith("pgqueuer")]
    for count in callers:
        mine = [r for r in results if r.system == "tickweave" and r.case.startswith("lifecycle")
                and r.clients == count]
        if not mine:
            continue
        worst = min(r.rate for r in mine)
        best_peer = max((r.rate for r in drains if r.clients == count), default=None)
        if best_peer:
            rows.append([f"lifecycle >= PgQueuer drain, {count} conn(s)", f"{worst:,.0f} vs {best_peer:,.0f}",
                         "yes" if worst >= best_peer else "no"])
        pgbench = _rate(results, "pgbench", "1-row UPDATE", count)
        if pgbench:
            rows.append([f"lifecycle >= pgbench / 2, {count} conn(s)", f"{worst:,.0f} vs {pgbench / 2:,.0f}",
                         "yes" if worst >= pgbench / 2 else "no"])
    for count in callers:
        single = [r for r in results if r.system == "tickweave" and r.case.startswith("lifecycle")
                  and "batches" not in r.case and r.clients == count]
        if count == 1 and single:
            worst = min(single, key=lambda r: r.rate)
            rows.append(["lifecycle >= 1,000 tasks/s, 1 caller (deep and wide)", f"{worst.rate:,.0f} ({worst.case})",
                         "yes" if worst.rate >= 1000 else "no"])
            cpu = max(single, key=lambda r: r.server_cpu_s or 0)
            if cpu.server_cpu_s is not None:
                ms = cpu.per_item(cpu.server_cpu_s * 1000)
                rows.append(["server CPU <= 0.5 ms/task, 1 caller", f"{ms:.3f} ms ({cpu.case})",
                             "yes" if ms <= 0.5 else "no"])
            client = max(single, key=lambda r: r.client_cpu_s)
            ms = client.per_item(client.client_cpu_s * 1000)
            rows.append(["client CPU <= 0.6 ms/task, 1 caller", f"{ms:.3f} ms ({client.case})",
                         "yes" if ms <= 0.6 else "no"])
        wide = [r for r in single if r.case.startswith("lifecycle wide")]
        if count == max(callers) and wide:
            share = wide[0].waits.share("Lock:transactionid") * 100
            rows.append([f"wide run, {count} callers: Lock:transactionid < 5 % of samples", f"{share:.1f} %",
                         "yes" if share < 5 else "no"])
        batched = [r for r in results if r.system == "tickweave" and "batches" in r.case and r.clients == count]
        best_peer = max((r.rate for r in drains if r.clients == count), default=None)
        if batched and best_peer:
            worst_b = min(r.rate for r in batched)
            rows.append([f"batched lifecycle >= 0.5 x PgQueuer drain, {count} conn(s)",
                         f"{worst_b:,.0f} vs {best_peer / 2:,.0f}", "yes" if worst_b >= best_peer / 2 else "no"])
    idle_data = facts.get("idle")
    if idle_data is not None and idle_data.levels:
        top = idle_data.levels[-1]
        rows.append([f"idle tick < 20 ms at {top.schedules:,} schedules",
                     f"median {top.median_ms:.1f} ms, p95 {top.p95_ms:.1f} ms",
                     "yes" if top.p95_ms < 20 else "no"])
        rows.append([f"idle tick p95 < 5 ms at {top.schedules:,} schedules", f"p95 {top.p95_ms:.1f} ms",
                     "yes" if top.p95_ms < 5 else "no"])
    big = facts.get("big")
    if big is not None:
        rows.append([f"trigger of a {big.nodes:,}-node pipeline < 2 s", f"{big.trigger_s:.2f} s",
                     "yes" if big.trigger_s < 2 else "no"])
    return rows


def map_expansion(expansions: Sequence[Any]) -> str:
    """The map part's expansions: the callback of the mapped-over task, transaction by transaction,
    then (where done) the settle and the manifest."""
    rows = []
    for e in expansions:
        expanding = e.expanding
        steps = "; ".join(f"{t.seconds * 1000:,.1f} ms / {t.statements} stmts"
                          f"{'' if t.committed else ' (rolled back)'}" for t in e.transactions)
        rows.append([f"{e.width:,}", _num(e.listing_bytes / 1024, 0), _num(e.read_items_s, 3),
                     _num(expanding.seconds, 3), str(expanding.statements),
                     _num(expanding.seconds / e.width * 1e6, 1) if e.width else "-", str(e.claimed),
                     _num(e.callback_s, 3), str(e.callback_statements), str(e.callback_round_trips), steps])
    out = [_render(["items", "listing KiB", "read items s", "record+expand txn s", "its stmts", "µs/item",
                    "children claimed", "whole callback s", "stmts", "round trips", "transactions"], rows)]
    settled = [e for e in expansions if e.settle is not None]
    if settled:
        rows = [[f"{e.width:,}", _num(e.settle.finish_s, 2), _num(e.width / e.settle.finish_s, 0),
                 _num(e.settle.last_s * 1000, 1), str(e.settle.last_statements), _num(e.settle.manifest_s, 3),
                 _num(e.settle.manifest_bytes / 1024, 0)] for e in settled]
        out += ["", _render(["items", "every item finished s", "items/s", "last finish (settles) ms", "its stmts",
                             "manifest built s", "manifest KiB"], rows)]
    return "\n".join(out)


def map_beside_static(results: Sequence[Result]) -> str:
    """Each map lifecycle case beside the static wide DAG of the same width and connections."""
    rows = []
    for r in results:
        if not r.case.startswith("map lifecycle"):
            continue
        static = next((s for s in results if s.case.startswith("static wide") and s.clients == r.clients), None)
        rows.append([r.case, str(r.clients), _num(r.rate, 0), _num(static.rate, 0) if static else "-",
                     f"{r.rate / static.rate:.2f}" if static and static.rate else "-",
                     _count(r.per_item(r.statements)), _count(static.per_item(static.statements)) if static else "-",
                     _count(r.per_item(r.round_trips)), _count(static.per_item(static.round_trips)) if static else "-",
                     _count(commits(r)), _count(commits(static)) if static else "-"])
    return _render(["map case", "conns", "tasks/s", "static tasks/s", "map ÷ static", "stmts/task",
                    "static stmts/task", "trips/task", "static trips/task", "commits/task", "static commits/task"],
                   rows)
