"""Task commands: `task ID` (a task with its attempts), the decisions a person makes
(`approve`, `reject` an approval; `complete` a manual step) and `logs` (an attempt's log,
`--follow` while it runs)."""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    CliError,
    Parents,
    api_client,
    duration,
    emit_json,
    error_text,
    one_line,
    positive_float,
    require_key,
    say,
    seg,
    show_time,
    table,
)
from orchestrator.client import TickweaveClient

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


def _get_task(client: TickweaveClient, task_id: str) -> dict[str, Any]:
    return dict(client.request("GET", f"/api/tasks/{seg(task_id)}"))


# --- task ----------------------------------------------------------------------------------


def cmd_task(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        task = _get_task(client, args.task_id)
    if args.json:
        emit_json(task)
        return EXIT_OK
    flag = " (dead-lettered)" if task.get("dead_lettered") else ""
    print(f"task {task.get('id')}  {task.get('node_id') or task.get('node')}[{task.get('version')}]  "
          f"{task.get('status')}{flag}")
    print(f"  run       {task.get('run_id')}  ({task.get('pipeline_id')})")
    if task.get("task_name"):
        print(f"  task      {task['task_name']}")
    if task.get("kind") and task.get("kind") != "task":
        print(f"  kind      {task['kind']}")
    if task.get("error"):
        print(f"  error     {one_line(error_text(task['error']), 200)}")
    attempts = [a for a in task.get("attempts") or [] if isinstance(a, dict)]
    if attempts:
        print()
        rows = [[str(a.get("attempt")), str(a.get("status")), show_time(a.get("dispatched_at")),
                 duration(a.get("started_at") or a.get("dispatched_at"), a.get("finished_at")),
                 one_line(error_text(a.get("error")).strip().split("\n")[0], 70)] for a in attempts]
        print(table(["ATTEMPT", "STATUS", "DISPATCHED (UTC)", "DURATION", "ERROR"], rows))
        print(f"`tickweave logs {task.get('id')}` prints the latest attempt's log")
    return EXIT_OK


# --- approvals and manual steps ------------------------------------------------------------


def _print_decision(answer: dict[str, Any], what: str) -> None:
    ready = answer.get("newly_ready")
    released = f"; {ready} task(s) ready" if isinstance(ready, int) and ready else ""
    print(f"{what}: the task is {answer.get('task_status')}; run {answer.get('run_id')} is "
          f"{answer.get('run_status')}{released}")


def _decide(args: argparse.Namespace, decision: str) -> int:
    require_key(args, "an operator or admin")
    body: dict[str, Any] = {"decision": decision}
    if args.comment:
        body["comment"] = args.comment
    with api_client(args) as client:
        answer = dict(client.request("POST", f"/api/approvals/{seg(args.task_id)}", json=body))
    if args.json:
        emit_json(answer)
    else:
        _print_decision(answer, "approved" if decision == "approve" else "rejected")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, "reject")


def cmd_complete(args: argparse.Namespace) -> int:
    require_key(args, "an operator or admin")
    body: dict[str, Any] = {"success": not args.failed}
    if args.comment:
        body["comment"] = args.comment
    with api_client(args) as client:
        answer = dict(client.request("POST", f"/api/tasks/{seg(args.task_id)}/complete", json=body))
    if args.json:
        emit_json(answer)
    else:
        _print_decision(answer, "marked failed" if args.failed else "completed")
    return EXIT_OK


# --- logs ----------------------------------------------------------------------------------


def _latest_attempt(task: dict[str, Any]) -> int | None:
    numbers: list[int] = [a["attempt"] for a in task.get("attempts") or []
                          if isinstance(a, dict) and isinstance(a.get("attempt"), int)]
    if numbers:
        return max(numbers)
    attempt = task.get("attempt")
    return attempt if isinstance(attempt, int) and attempt > 0 else None


def _read_log(client: TickweaveClient, task_id: str, attempt: int, offset: int) -> tuple[bytes, bool]:
    """The log's bytes from `offset`, and whether the attempt is finished (nothing more to come)."""
    body, headers = client.request_bytes(
        "GET", f"/api/tasks/{seg(task_id)}/attempts/{attempt}/log", params={"offset": offset})
    return body, headers.get("x-log-complete", "true").lower() == "true"


def cmd_logs(args: argparse.Namespace) -> int:
    interval: float = args.interval
    with api_client(args) as client:
        attempt: int | None = args.attempt
        try:
            while attempt is None:
                attempt = _latest_attempt(_get_task(client, args.task_id))
                if attempt is None:
                    if not args.follow:
                        raise CliError(f"task {args.task_id} has not started an attempt yet, so it has no log; "
                                       "--follow waits for it", EXIT_NOT_FOUND)
                    time.sleep(interval)  # the poll interval against the API, not a wait for state
            return _print_log(client, args, attempt, interval)
        except KeyboardInterrupt:
            say("\nstopped following; the task goes on")
            return EXIT_INTERRUPTED


def _print_log(client: TickweaveClient, args: argparse.Namespace, attempt: int, interval: float) -> int:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a read may end inside a character
    offset = 0
    chunks: list[str] = []
    while True:
        body, complete = _read_log(client, args.task_id, attempt, offset)
        offset += len(body)
        text = decoder.decode(body, final=complete)
        if args.json:
            chunks.append(text)
        elif text:
            sys.stdout.write(text)
            sys.stdout.flush()
        if complete or not args.follow:
            break
        time.sleep(interval)  # the poll interval against the API, not a wait for state
    if args.json:
        emit_json({"task_id": args.task_id, "attempt": attempt, "log": "".join(chunks), "size": offset,
                   "complete": complete})
    elif not complete:
        say(f"(attempt {attempt} is still running; `--follow` keeps reading)")
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    task = sub.add_parser("task", parents=api, help="show a task with its attempts")
    task.add_argument("task_id", metavar="TASK_ID")
    task.set_defaults(func=cmd_task)

    for name, func, text in (("approve", cmd_approve, "approve a waiting approval step; the run goes on"),
                             ("reject", cmd_reject, "reject a waiting approval step; the step fails")):
        decide = sub.add_parser(name, parents=api, help=f"{text} (operator key)")
        decide.add_argument("task_id", metavar="TASK_ID",
                            help="the approval's task id (`tickweave run RUN --status waiting` lists them)")
        decide.add_argument("--comment", help="why; kept with the decision")
        decide.set_defaults(func=func)

    complete = sub.add_parser("complete", parents=api,
                              help="complete a waiting manual step (operator key); --failed marks it failed")
    complete.add_argument("task_id", metavar="TASK_ID",
                          help="the manual step's task id (`tickweave run RUN --status waiting` lists them)")
    complete.add_argument("--failed", action="store_true", help="the step failed: mark it failed instead")
    complete.add_argument("--comment", help="a note kept with the decision")
    complete.set_defaults(func=cmd_complete)

    logs = sub.add_parser("logs", parents=api, help="print a task attempt's log (the latest unless --attempt)")
    logs.add_argument("task_id", metavar="TASK_ID")
    logs.add_argument("--attempt", type=int, metavar="N", help="which attempt (default: the latest)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep reading while the attempt runs, until its log is complete")
    logs.add_argument("--interval", type=positive_float, default=1.0, metavar="SECONDS",
                      help="with --follow: how often to read (default 1)")
    logs.set_defaults(func=cmd_logs)
