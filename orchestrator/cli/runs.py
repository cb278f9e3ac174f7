"""Run commands: `trigger`, `runs` (list), `run` (show, `--wait`), `cancel`, `retry`
(redrive) and `backfill`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_OK,
    RUN_STATUSES,
    TASK_FILTERS,
    CliError,
    Parents,
    api_client,
    duration,
    emit_json,
    page_size,
    pipeline_label,
    positive_float,
    require_key,
    run_status_text,
    show_time,
    table,
    task_page_size,
)
from orchestrator.cli.progress import print_run, task_total, watch_run

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


def parse_params(pairs: Sequence[str] | None) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (1, true, [1,2], {"a":1}, "quoted") is
    that value, anything else is the string as written."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def cmd_trigger(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()] if args.versions else None
    if args.versions is not None and not versions:
        raise CliError("--versions: give at least one version (comma-separated)")
    with api_client(args) as client:
        run = client.trigger(args.pipeline, versions=versions, params=params, idempotency_key=args.idempotency_key)
        if not args.wait:
            if args.json:
                emit_json(run)
            else:
                replay = "" if run.get("created", True) else " (already triggered with this idempotency key)"
                print(f"run {run['id']} {run.get('status')}{replay}: {args.pipeline} v{run.get('pipeline_version')}, "
                      f"{task_total(run)} tasks")
            return EXIT_OK
        return watch_run(client, run, args)


def cmd_runs(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        page = client.list_runs(pipeline=args.pipeline, status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        emit_json(page)
        return EXIT_OK
    items = page.get("items") or []
    if not items:
        print("no runs")
        return EXIT_OK
    rows = [[str(r.get("id")), pipeline_label(r), f"v{r.get('pipeline_version')}", run_status_text(r),
             str(r.get("trigger")), ",".join(r.get("versions") or []), show_time(r.get("created_at")),
             duration(r.get("started_at"), r.get("finished_at"))] for r in items]
    print(table(["RUN", "PIPELINE", "VERSION", "STATUS", "TRIGGER", "DATA VERSIONS", "CREATED (UTC)", "DURATION"],
                rows))
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK



def cmd_run(args: argparse.Namespace) -> int:
    paging = any(v is not None for v in (args.status, args.node, args.cursor))
    with api_client(args) as client:
        run = client.get_run(args.run_id, limit=0 if paging else args.limit)
        if args.wait:
            return watch_run(client, run, args)
        if paging:
            # One page of the run's tasks, filtered: the next page is `--cursor` with the same filters.
            page = client.list_run_tasks(args.run_id, status=args.status, node=args.node, limit=args.limit,
                                         cursor=args.cursor)
            run = {**run, "tasks": page.get("items") or [], "tasks_next_cursor": page.get("next_cursor")}
    if args.json:
        emit_json(run)
    else:
        print_run(run, sys.stdout)
    return EXIT_OK



def cmd_backfill(args: argparse.Namespace) -> int:
    """POST /api/pipelines/{id}/backfill; prints the slots."""
    require_key(args, "an operator or admin")
    body: dict[str, object] = {"start": args.start, "end": args.end, "reprocess": args.reprocess,
                               "dry_run": args.dry_run}
    if args.versions:
        body["versions"] = args.versions.split(",")
    if args.max_active_runs:
        body["max_active_runs"] = args.max_active_runs
    with api_client(args) as client:
        answer = client.backfill(args.pipeline, body)
    if args.json:
        emit_json(answer)
        return EXIT_OK
    for slot in answer["slots"]:
        print(f"{slot['slot']}  {slot['action']:4}  {slot['reason'] or ''}")
    verb = "would create" if args.dry_run else "created"
    print(f"{verb} {sum(1 for s in answer['slots'] if s['action'] == 'run')} runs, skipped {answer['skipped']}"
          + ("" if args.dry_run else f" (backfill {answer['id']})"))
    return EXIT_OK



def cmd_cancel(args: argparse.Namespace) -> int:
    """POST /api/runs/{id}/cancel: its tasks not finished are cancelled; a finished run is a conflict."""
    require_key(args, "an operator or admin")
    with api_client(args) as client:
        run = client.cancel_run(args.run_id)
    if args.json:
        emit_json(run)
    else:
        print(f"run {run.get('id')} {run_status_text(run)}: {run.get('pipeline_id')} v{run.get('pipeline_version')}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """POST /api/runs/{id}/retry: a failed run's failed tasks get new attempts (a redrive); the
    tasks they held back run after them."""
    require_key(args, "an operator or admin")
    with api_client(args) as client:
        run = client.retry_run(args.run_id)
        if args.wait:
            return watch_run(client, run, args)
    if args.json:
        emit_json(run)
    else:
        count = int(run.get("retried_tasks") or 0)
        print(f"run {run.get('id')} {run_status_text(run)}: {count} task(s) to run again "
              f"(`tickweave run {run.get('id')} --wait` follows it)")
    return EXIT_OK


def wait_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--wait", action="store_true",
                         help="follow the run until it ends: exit 0 if it succeeded, 1 if it failed or was cancelled")
    command.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                         help="with --wait: give up after this long (exit 124; the run goes on)")
    command.add_argument("--interval", type=positive_float, default=1.0, metavar="SECONDS",
                         help="with --wait: how often to poll the run (default 1)")


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    trigger = sub.add_parser("trigger", parents=api, help="start a run of a pipeline")
    trigger.add_argument("pipeline")
    trigger.add_argument("--versions", metavar="V1,V2", help="comma-separated data versions (default: the pipeline's)")
    trigger.add_argument("--param", action="append", metavar="KEY=VALUE",
                         help="a run parameter; VALUE is JSON if it parses as JSON, else a string (repeatable)")
    trigger.add_argument("--idempotency-key", help="the same key returns the same run instead of a new one")
    wait_options(trigger)
    trigger.set_defaults(func=cmd_trigger)

    runs = sub.add_parser("runs", parents=api, help="list runs, newest first")
    runs.add_argument("--pipeline")
    runs.add_argument("--status", choices=RUN_STATUSES)
    runs.add_argument("--limit", type=page_size, default=20, help="1 to 500 (default 20)")
    runs.add_argument("--cursor", help="next page: the cursor the previous page printed")
    runs.set_defaults(func=cmd_runs)

    run = sub.add_parser("run", parents=api, help="show a run: its tasks counted by status, and a page of them")
    run.add_argument("run_id", metavar="RUN_ID")
    run.add_argument("--status", choices=TASK_FILTERS, help="list only the tasks in this status")
    run.add_argument("--node", help="list only this node's tasks")
    run.add_argument("--limit", type=task_page_size, help="tasks per page, 1 to 200 (default 100)")
    run.add_argument("--cursor", help="next page of tasks: the cursor the previous page printed")
    wait_options(run)
    run.set_defaults(func=cmd_run)

    cancel = sub.add_parser("cancel", parents=api, help="cancel a pending or running run (operator key)")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.set_defaults(func=cmd_cancel)

    retry = sub.add_parser("retry", parents=api,
                           help="retry a failed run from its failures: its failed tasks run again (operator key)")
    retry.add_argument("run_id", metavar="RUN_ID")
    wait_options(retry)
    retry.set_defaults(func=cmd_retry)

    backfill = sub.add_parser("backfill", parents=api, help="run a pipeline for the schedule slots of a past range")
    backfill.add_argument("pipeline")
    backfill.add_argument("--start", required=True, help="ISO time with a timezone, e.g. 2026-01-01T00:00:00Z")
    backfill.add_argument("--end", required=True)
    backfill.add_argument("--versions", help="comma-separated data versions")
    backfill.add_argument("--max-active-runs", type=int)
    backfill.add_argument("--reprocess", choices=["none", "failed", "all"], default="none")
    backfill.add_argument("--dry-run", action="store_true")
    backfill.set_defaults(func=cmd_backfill)
