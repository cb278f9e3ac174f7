"""How a run looks in a terminal: `tickweave run`'s report, the live progress of `--wait`
(`ProgressView`, redrawn in place on a terminal, appended lines elsewhere) and the poll loop
that drives it (`watch_run`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from orchestrator.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    STATUS_COLORS,
    TASK_STATUSES,
    color_enabled,
    duration,
    emit_json,
    error_text,
    one_line,
    paint,
    pipeline_label,
    run_status_color,
    run_status_text,
    say,
    seconds_text,
    show_time,
    table,
)
from orchestrator.client import TERMINAL_RUN_STATUSES, ApiError, ConnectionFailed, TickweaveClient


def _task_label(task: dict[str, Any], many_versions: bool) -> str:
    label = f"{task.get('node')}[{task.get('version')}]" if many_versions else str(task.get("node"))
    if isinstance(task.get("map_index"), int):
        label += f" #{task['map_index']}"  # an item of a mapped node
    return label


def _is_item(task: dict[str, Any]) -> bool:
    """A map item: one task of a mapped node for one item of its list."""
    return isinstance(task.get("map_index"), int)


# A mapped node's items in a line: each status group and what it counts.
_ITEM_GROUPS = (("succeeded", ("succeeded",)), ("failed", ("failed", "dead")), ("running", ("running", "dispatched")),
                ("queued", ("ready", "pending", "waiting")), ("skipped", ("skipped",)), ("cancelled", ("cancelled",)))


def _items_text(items: dict[str, int], color: bool = False) -> str:
    """A mapped node's items by status: "980 succeeded, 3 failed, 17 running"."""
    parts = []
    known: set[str] = set()
    for word, statuses in _ITEM_GROUPS:
        known.update(statuses)
        n = sum(int(items.get(status, 0)) for status in statuses)
        if n:
            parts.append(f"{n:,} {paint(word, STATUS_COLORS.get(statuses[0]), color)}")
    parts += [f"{int(n):,} {status}" for status, n in items.items() if status not in known and n]
    return ", ".join(parts) or "none yet"


def _map_text(node: str, summary: dict[str, Any] | None, color: bool = False) -> str:
    """`parse  map  1,000 items: 980 succeeded, 3 failed, 17 running` (the node name padded by the caller)."""
    summary = summary or {}
    width = summary.get("width")
    if width is None:
        return f"{node}  map  items not listed yet (over {summary.get('over') or '?'})"
    return f"{node}  map  {int(width):,} items: {_items_text(summary.get('items') or {}, color)}"


def _many_versions(run: dict[str, Any]) -> bool:
    if isinstance(run.get("versions"), list):
        return len(run["versions"]) > 1
    return len({t.get("version") for t in run.get("tasks") or []}) > 1


_TERMINAL_TASK_STATUSES = ("succeeded", "failed", "dead", "skipped", "cancelled")


def task_total(run: dict[str, Any]) -> int:
    """The run's number of tasks: `task_count` of a run answer (its `tasks` are a first page),
    map items included."""
    return int(run.get("task_count", len(run.get("tasks") or [])))


def _items_note(run: dict[str, Any]) -> str:
    count = int(run.get("item_count") or 0)
    return f" ({count:,} map items)" if count else ""


def _map_nodes(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The mapped nodes of the run answer's first page of nodes."""
    return [n for n in run.get("nodes") or [] if isinstance(n.get("map"), dict)]


def _every_task_listed(run: dict[str, Any]) -> bool:
    return task_total(run) <= len(run.get("tasks") or [])


def _status_counts(run: dict[str, Any]) -> dict[str, int]:
    if isinstance(run.get("counts"), dict):
        return {str(k): int(v) for k, v in run["counts"].items()}
    counts: dict[str, int] = {}
    for task in run.get("tasks") or []:
        counts[str(task.get("status"))] = counts.get(str(task.get("status")), 0) + 1
    return counts


def _counts_text(counts: dict[str, int], color: bool = False) -> str:
    order = {status: i for i, status in enumerate(TASK_STATUSES)}
    return ", ".join(f"{paint(status, STATUS_COLORS.get(status), color)} {n}"
                     for status, n in sorted(counts.items(), key=lambda item: order.get(item[0], 99)) if n)


class ProgressView:
    """Shows a run's tasks while it runs. On a terminal: a line per task, redrawn in place.
    Otherwise (a pipe, a log file): one appended line per change of a task's status."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.color = self.tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.clock = clock or (lambda: datetime.now(UTC))
        self._drawn = 0
        self._seen: dict[str, tuple[Any, Any]] = {}
        self._run_status: str | None = None
        self._counts: str | None = None

    def update(self, run: dict[str, Any]) -> None:
        if self.tty:
            self._redraw(run)
        else:
            self._append(run)
        self.stream.flush()

    def finish(self, run: dict[str, Any]) -> None:
        self.update(run)
        took = duration(run.get("started_at") or run.get("created_at"), run.get("finished_at"))
        line = f"run {run.get('id')} {run_status_text(run)}" + (f" in {took}" if took != "-" else "")
        if run.get("error"):
            line += f": {one_line(error_text(run['error']), 200)}"
        print(paint(line, run_status_color(run), self.color), file=self.stream)
        self.stream.flush()

    def lines(self, run: dict[str, Any], *, color: bool | None = None) -> list[str]:
        """The frame drawn on a terminal: a header, then a line per task."""
        color = self.color if color is None else color
        tasks = run.get("tasks") or []
        many = _many_versions(run)
        width = max([len(_task_label(t, many)) for t in tasks] + [4])
        elapsed = duration(run.get("started_at") or run.get("created_at"), run.get("finished_at"), until_now=True)
        counts = _status_counts(run)
        done = sum(n for s, n in counts.items() if s in _TERMINAL_TASK_STATUSES)
        header = (f"run {run.get('id')}  {run.get('pipeline_id')} v{run.get('pipeline_version')}  "
                  f"{paint(run_status_text(run), run_status_color(run), color)}  {done}/{task_total(run)} tasks"
                  f"{_items_note(run)}  {elapsed}")
        out = [header]
        if not _every_task_listed(run):
            # A big run: a line per node (the first page of them) with its tasks counted by status;
            # a mapped node's line counts its items.
            out.append(f"  {_counts_text(counts, color)}")
            nodes = run.get("nodes") or []
            width = max([len(str(n.get("node"))) for n in nodes] + [4])
            for node in nodes:
                if isinstance(node.get("map"), dict):
                    out.append(f"  {_map_text(str(node.get('node')).ljust(width), node['map'], color)}")
                    continue
                out.append(f"  {str(node.get('node')).ljust(width)}  {str(node.get('tasks')).rjust(6)} tasks  "
                           f"{_counts_text(node.get('counts') or {}, color)}")
            if run.get("nodes_next_cursor"):
                out.append(f"  ... {int(run.get('node_count') or 0) - len(nodes)} more nodes")
            return out
        # Every task is listed: a line per task, a mapped node's items counted on its line.
        tasks = [t for t in tasks if not _is_item(t)]
        width = max([len(_task_label(t, many)) for t in tasks] + [4])
        for task in tasks:
            task_status = str(task.get("status"))
            if task.get("kind") == "map":
                out.append(f"  {_task_label(task, many).ljust(width)}  "
                           f"{paint(task_status.ljust(10), STATUS_COLORS.get(task_status), color)}  "
                           f"{_map_text('', task.get('map'), color).strip()}")
                continue
            attempt = f"attempt {task.get('attempt')}/{task.get('max_attempts')}" if task.get("attempt") else ""
            took = duration(task.get("started_at") or task.get("dispatched_at"), task.get("finished_at"),
                             until_now=task_status in ("running", "dispatched"))
            note = error_text(task.get("error")) or str(task.get("message") or "")
            line = (f"  {_task_label(task, many).ljust(width)}  "
                    f"{paint(task_status.ljust(10), STATUS_COLORS.get(task_status), color)}  "
                    f"{attempt.ljust(12)}  {took if took != '-' else '':>7}  {one_line(note, 60)}")
            out.append(line.rstrip())
        return out

    def _redraw(self, run: dict[str, Any]) -> None:
        import shutil

        columns, rows = shutil.get_terminal_size((100, 24))
        plain = self.lines(run, color=False)
        lines = self.lines(run)
        if len(lines) > max(rows - 1, 3):
            # The cursor cannot move back above the top of the screen: show what fits.
            keep = max(rows - 2, 2)
            more = f"  ... {len(lines) - keep} more lines (`tickweave run {run.get('id')}` pages through the tasks)"
            plain, lines = [*plain[:keep], more], [*lines[:keep], more]
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F")  # back to the first line drawn
        for text, painted in zip(plain, lines, strict=True):
            # A wrapped line would throw off the count of lines to move back up: cut it.
            visible = painted if len(text) < columns else text[: columns - 1]
            self.stream.write("\x1b[2K" + visible + "\n")
        self.stream.write("\x1b[J")  # clear what a longer previous frame left below
        self._drawn = len(lines)

    def _append(self, run: dict[str, Any]) -> None:
        now = self.clock().strftime("%H:%M:%S")
        status = str(run.get("status"))
        if self._run_status is None:
            print(f"{now} run {run.get('id')}: {run.get('pipeline_id')} v{run.get('pipeline_version')}, "
                  f"{task_total(run)} tasks, {status}", file=self.stream)
            self._run_status = status
        many = _many_versions(run)
        if not _every_task_listed(run):
            # A big run: a line each time its counts change, not one per task.
            counts = _counts_text(_status_counts(run))
            if counts != self._counts:
                self._counts = counts
                print(f"{now}   tasks: {counts}", file=self.stream)
        for task in (run.get("tasks") or []) if _every_task_listed(run) else []:
            if _is_item(task):
                continue  # counted on its map node's line
            key = str(task.get("id"))
            if task.get("kind") == "map":
                state: tuple[Any, ...] = (task.get("status"), json.dumps(task.get("map"), sort_keys=True))
                if self._seen.get(key) != state:
                    self._seen[key] = state
                    print(f"{now}   {_task_label(task, many)} {task.get('status')}: "
                          f"{_map_text('', task.get('map')).strip()}", file=self.stream)
                continue
            state = (task.get("status"), task.get("attempt"))
            if self._seen.get(key) == state:
                continue
            self._seen[key] = state
            line = f"{now}   {_task_label(task, many)} {task.get('status')}"
            if task.get("attempt"):
                line += f" (attempt {task.get('attempt')}/{task.get('max_attempts')})"
            error = error_text(task.get("error"))
            if error and task.get("status") in ("failed", "dead"):
                line += f": {one_line(error, 200)}"
            print(line, file=self.stream)
        if status != self._run_status:
            self._run_status = status
            print(f"{now} run {run.get('id')}: {status}", file=self.stream)


def watch_run(client: TickweaveClient, run: dict[str, Any], args: argparse.Namespace) -> int:
    """Poll the run until it ends: 0 succeeded, 1 failed or cancelled, 124 at `--timeout`."""
    view = None if args.json else ProgressView(sys.stdout)
    timeout: float | None = args.timeout
    interval: float = max(0.01, args.interval)
    deadline = None if timeout is None else time.monotonic() + timeout
    failures = 0
    try:
        while True:
            if view is not None and run.get("status") not in TERMINAL_RUN_STATUSES:
                view.update(run)
            if run.get("status") in TERMINAL_RUN_STATUSES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if args.json:
                    emit_json(run)
                say(f"timed out after {seconds_text(timeout or 0)} waiting for run {run.get('id')} "
                    f"(status {run.get('status')}); the run goes on")
                return EXIT_TIMEOUT
            pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            time.sleep(pause)  # the poll interval against the API, not a wait for state
            try:
                run = client.get_run(str(run["id"]))
                failures = 0
            except (ConnectionFailed, ApiError) as exc:
                # A blip (a restart, a 503 during failover) does not end the watch; five in a row do.
                if isinstance(exc, ApiError) and exc.status < 500:
                    raise
                failures += 1
                if failures >= 5:
                    raise
    except KeyboardInterrupt:
        say(f"\nstopped watching; run {run.get('id')} goes on (`tickweave run {run.get('id')}` shows it)")
        return EXIT_INTERRUPTED
    if view is not None:
        view.finish(run)
    if args.json:
        emit_json(run)
    return EXIT_OK if run.get("status") == "succeeded" else EXIT_FAILED


def print_run(run: dict[str, Any], stream: TextIO) -> None:
    color = color_enabled(stream)
    print(f"run {run.get('id')}  {pipeline_label(run)} v{run.get('pipeline_version')}  "
          f"{paint(run_status_text(run), run_status_color(run), color)}", file=stream)
    by = f" by {run['triggered_by']}" if run.get("triggered_by") else ""
    by += f" (event {run['event_id']})" if run.get("event_id") else ""
    print(f"  trigger   {run.get('trigger')}{by}", file=stream)
    print(f"  versions  {', '.join(run.get('versions') or [])}", file=stream)
    if run.get("params"):
        print(f"  params    {json.dumps(run['params'], sort_keys=True)}", file=stream)
    took = duration(run.get("started_at"), run.get("finished_at"))
    print(f"  created   {show_time(run.get('created_at'))}  started {show_time(run.get('started_at'))}  "
          f"finished {show_time(run.get('finished_at'))}" + (f"  ({took})" if took != "-" else ""), file=stream)
    if run.get("error"):
        print(f"  error     {error_text(run['error'])}", file=stream)
    print(f"  tasks     {task_total(run)}{_items_note(run)}: {_counts_text(_status_counts(run), color) or 'none'}",
          file=stream)
    nodes = run.get("nodes") or []
    if _map_nodes(run) and _every_task_listed(run):
        # Mapped nodes count their items (a big run has them in its table of nodes below).
        width = max(len(str(n.get("node"))) for n in _map_nodes(run))
        for node in _map_nodes(run):
            print(f"  {_map_text(str(node.get('node')).ljust(width), node['map'], color)}", file=stream)
    if nodes and not _every_task_listed(run):
        # A big run: its nodes (a first page) with their tasks counted by status; a mapped node
        # with its items.
        print(file=stream)
        rows = [[str(n.get("node")), f"{int(n['map']['width']):,} items" if isinstance(n.get("map"), dict)
                 and n["map"].get("width") is not None else str(n.get("tasks")),
                 "map: " + _items_text(n["map"].get("items") or {}) if isinstance(n.get("map"), dict)
                 else _counts_text(n.get("counts") or {})] for n in nodes]
        print(table(["NODE", "TASKS", "BY STATUS"], rows), file=stream)
        if run.get("nodes_next_cursor"):
            print(f"  ... {int(run.get('node_count') or 0) - len(nodes)} more nodes; "
                  f"`--node NODE` lists one node's tasks", file=stream)
    tasks = run.get("tasks") or []
    if tasks:
        print(file=stream)
        # The task id first: what `approve`, `complete`, `task` and `logs` take.
        rows = [[str(t.get("id")), _task_label(t, False), str(t.get("version")),
                 str(t.get("status")) + (" (in DLQ)" if t.get("dead_lettered") else ""),
                 "-" if t.get("kind") == "map" else f"{t.get('attempt')}/{t.get('max_attempts')}",
                 duration(t.get("started_at") or t.get("dispatched_at"), t.get("finished_at")),
                 one_line(error_text(t.get("error")) or str(t.get("message") or ""), 70)] for t in tasks]
        print(table(["TASK ID", "NODE", "VERSION", "STATUS", "ATTEMPT", "DURATION", "MESSAGE"], rows), file=stream)
    if run.get("tasks_next_cursor"):
        print(f"more: --cursor {run['tasks_next_cursor']}", file=stream)

