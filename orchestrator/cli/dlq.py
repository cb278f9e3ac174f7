"""Dead-letter commands: `dlq list` (a table a person reads: one line per entry, the last
error's first line), `dlq show ID` (the whole record: every attempt and its error, inputs)
and `dlq retry ID`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_OK,
    Parents,
    api_client,
    emit_json,
    error_text,
    one_line,
    page_size,
    read_or_emit,
    require_key,
    seg,
    show_time,
    table,
)

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers

def first_line(error: Any, limit: int = 80) -> str:
    """The error's first line (a message, never its traceback), cut to `limit` characters."""
    text = error_text(error).strip()
    return one_line(text.splitlines()[0] if text else "", limit)


def attempt_count(entry: dict[str, Any]) -> str:
    """How many attempts the task had: the list of attempts (a list item may carry only their
    number)."""
    attempts = entry.get("attempts")
    if isinstance(attempts, list):
        return str(len(attempts))
    for value in (attempts, entry.get("attempt_count")):
        if isinstance(value, int):
            return str(value)
    return "-"


def _node(entry: dict[str, Any]) -> str:
    version = entry.get("version")
    return f"{entry.get('node_id')}[{version}]" if version and version != "default" else str(entry.get("node_id"))


def cmd_dlq_list(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        page = client.list_dead_letters(pipeline=args.pipeline, include_retried=args.include_retried, limit=args.limit,
                                        cursor=args.cursor)
    if args.json:
        emit_json(page)
        return EXIT_OK
    items = page.get("items") or []
    if not items:
        print("the dead-letter queue is empty")
        return EXIT_OK
    retried = any(e.get("retried_at") for e in items)
    rows = []
    for e in items:
        row = [str(e.get("id")), str(e.get("pipeline_id")), _node(e), str(e.get("task_name") or "-"),
               attempt_count(e), show_time(e.get("created_at"))]
        if retried:
            row.append(show_time(e["retried_at"]) if e.get("retried_at") else "")
        rows.append([*row, first_line(e.get("error"))])
    headers = ["ID", "PIPELINE", "NODE", "TASK", "ATTEMPTS", "WHEN (UTC)", *(["RETRIED (UTC)"] if retried else []),
               "LAST ERROR"]
    print(table(headers, rows))
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def _block(label: str, text: str) -> None:
    print(f"  {label}")
    for line in text.rstrip().splitlines():
        print(f"    {line}")


def print_entry(entry: dict[str, Any]) -> None:
    print(f"dead letter {entry.get('id')}")
    print(f"  pipeline  {entry.get('pipeline_id')}  node {_node(entry)}  task {entry.get('task_name') or '-'}")
    print(f"  run       {entry.get('run_id')}  (task {entry.get('task_id')})")
    print(f"  code      {entry.get('code_version') or '-'}")
    print(f"  when      {show_time(entry.get('created_at'))} UTC"
          + (f"; retried {show_time(entry['retried_at'])} UTC" if entry.get("retried_at") else "; not retried"))
    error = entry.get("error")
    if error:
        _block("last error", _error_details(error))
    attempts = entry.get("attempts")
    if isinstance(attempts, list) and attempts:
        print(f"  attempts  {len(attempts)}")
        for attempt in attempts:
            if not isinstance(attempt, dict):
                continue
            print(f"    #{attempt.get('attempt')}  {attempt.get('status')}  dispatched "
                  f"{show_time(attempt.get('dispatched_at'))}  finished {show_time(attempt.get('finished_at'))}")
            if attempt.get("error"):
                for line in _error_details(attempt["error"]).splitlines():
                    print(f"        {line}")
    else:
        print(f"  attempts  {attempt_count(entry)}")
    if entry.get("inputs"):
        _block("inputs", json.dumps(entry["inputs"], indent=2, sort_keys=True, default=str))


def _error_details(error: Any) -> str:
    """An error whole: its message, then its other fields (code, type, traceback...)."""
    if not isinstance(error, dict):
        return str(error)
    lines = [error_text(error)]
    for key, value in error.items():
        if key == "message" or value in (None, "", [], {}):
            continue
        if isinstance(value, str) and "\n" in value:
            lines.append(f"{key}:")
            lines.extend(f"  {line}" for line in value.rstrip().splitlines())
        else:
            lines.append(f"{key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
    return "\n".join(lines)


def cmd_dlq_show(args: argparse.Namespace) -> int:
    entry = read_or_emit(args, f"/api/dlq/{seg(args.entry_id)}")
    if entry is not None:
        print_entry(entry)
    return EXIT_OK


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    require_key(args, "an operator or admin")
    with api_client(args) as client:
        answer = client.retry_dead_letter(args.entry_id)
    if args.json:
        emit_json(answer)
    else:
        entry = answer.get("dead_letter") or {}
        print(f"retrying {entry.get('pipeline_id')}/{entry.get('node_id')}[{entry.get('version')}]: "
              f"run {answer.get('run_id')} is {answer.get('run_status')}")
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    dlq = sub.add_parser("dlq", help="dead letters: tasks that ran out of attempts").add_subparsers(
        dest="dlq_command", required=True, metavar="COMMAND")
    dlq_list = dlq.add_parser("list", parents=api, help="list dead letters, newest first")
    dlq_list.add_argument("--pipeline")
    dlq_list.add_argument("--include-retried", action="store_true", help="also those already retried")
    dlq_list.add_argument("--limit", type=page_size, default=50, help="1 to 500 (default 50)")
    dlq_list.add_argument("--cursor", help="next page: the cursor the previous page printed")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_show = dlq.add_parser("show", parents=api, help="print a dead letter whole: every attempt, errors, inputs")
    dlq_show.add_argument("entry_id", metavar="ID")
    dlq_show.set_defaults(func=cmd_dlq_show)
    dlq_retry = dlq.add_parser("retry", parents=api, help="give a dead task a new attempt; its run resumes")
    dlq_retry.add_argument("entry_id", metavar="ID")
    dlq_retry.set_defaults(func=cmd_dlq_retry)
