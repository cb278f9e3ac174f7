"""Pipeline commands: `validate` and `apply` definition files, and the `pipelines` group
(list, show, pause, resume, delete)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from orchestrator.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    Parents,
    api_client,
    emit_json,
    exit_code_for,
    one_line,
    page_size,
    report_client_error,
    require_key,
    say,
    seg,
    show_time,
    table,
)
from orchestrator.cli.definitions import (
    Document,
    apply_order,
    canonical_text,
    definition_diff,
    load_documents,
    print_diff,
    print_validation,
    validate_documents,
)
from orchestrator.client import ApiError, ClientError, TickweaveClient

if TYPE_CHECKING:
    from orchestrator.cli.common import Subparsers


# --- validate and apply --------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    documents = load_documents(args.files)
    if args.offline:
        validation = validate_documents(documents, None)
    else:
        with api_client(args) as client:
            validation = validate_documents(documents, client)
    if args.json:
        emit_json(validation.to_dict())
    else:
        print_validation(validation, sys.stdout)
    return EXIT_OK if validation.valid else EXIT_FAILED



def cmd_apply(args: argparse.Namespace) -> int:
    documents = load_documents(args.files)
    json_mode: bool = args.json
    with api_client(args) as client:
        validation = validate_documents(documents, client)
        if not validation.valid:
            if json_mode:
                emit_json({"ok": False, "dry_run": args.dry_run, "validation": validation.to_dict(), "pipelines": []})
            else:
                print_validation(validation, sys.stderr)
                say("nothing applied: fix the definitions above")
            return EXIT_FAILED
        outcomes: list[dict[str, Any]] = []
        failure: ClientError | None = None
        for document in apply_order(documents):
            try:
                outcome = _apply_one(client, document, args)
            except ClientError as exc:
                failure = exc
                outcomes.append({"id": document.id, "file": document.source, "action": "error",
                                 "error": _error_dict(exc)})
                break
            outcomes.append(outcome)
            if not json_mode:
                if outcome["diff"] and not args.no_diff:
                    print_diff(outcome["diff"], sys.stdout)
                print(_outcome_line(outcome))
    if json_mode:
        emit_json({"ok": failure is None, "dry_run": args.dry_run, "pipelines": outcomes})
    if failure is None:
        return EXIT_OK
    if not json_mode:
        report_client_error(failure, args)
        done = [o for o in outcomes if o["action"] in ("created", "updated")]
        say(f"stopped at {outcomes[-1]['file']}; " + (f"{len(done)} pipeline(s) were applied before it"
                                                       if done else "nothing was applied"))
    if isinstance(failure, ApiError) and failure.status == 422:
        return EXIT_FAILED
    return exit_code_for(failure)


def _error_dict(error: ClientError) -> dict[str, Any]:
    if isinstance(error, ApiError):
        return {"status": error.status, "code": error.code, "message": error.message, "details": error.details}
    return {"status": None, "code": "connection", "message": error.message, "details": None}


def _outcome_line(outcome: dict[str, Any]) -> str:
    name, action, version = outcome["id"], outcome["action"], outcome.get("version")
    return {
        "created": f"{name}: created (version {version})",
        "updated": f"{name}: updated to version {version}",
        "unchanged": f"{name}: unchanged (version {version})",
        "would-create": f"{name}: would be created (dry run)",
        "would-update": f"{name}: would be updated from version {version} (dry run)",
    }.get(action, f"{name}: {action}")


def _apply_one(client: TickweaveClient, document: Document, args: argparse.Namespace) -> dict[str, Any]:
    pipeline_id = str(document.id)
    fmt: str = args.diff_format
    current = client.find_pipeline(pipeline_id)
    new_text = canonical_text(document.raw, fmt, full=args.full)
    if current is None:
        old_text, old_name = "", "/dev/null"
    else:
        old_text = canonical_text(current.get("source_definition") or current.get("definition"), fmt, full=args.full)
        old_name = f"{pipeline_id} (version {current.get('version')})"
    diff = definition_diff(old_text, new_text, old_name, f"{pipeline_id} ({document.source})")
    outcome: dict[str, Any] = {"id": pipeline_id, "file": document.source, "diff": diff}
    if args.dry_run:
        if current is None:
            return {**outcome, "action": "would-create", "version": None, "changed": True}
        action = "would-update" if diff else "unchanged"
        return {**outcome, "action": action, "version": current.get("version"), "changed": bool(diff)}
    if current is None:
        try:
            saved = client.create_pipeline(document.raw)
            return {**outcome, "action": "created", "version": saved.get("version"), "changed": True}
        except ApiError as exc:
            if exc.status != 409:  # created by someone else meanwhile: update it instead
                raise
    saved = client.update_pipeline(pipeline_id, document.raw)
    changed = bool(saved.get("changed", True))
    if changed and not diff:
        outcome["note"] = "the definition is the same; the templates it uses changed"
    return {**outcome, "action": "updated" if changed else "unchanged", "version": saved.get("version"),
            "changed": changed}



# --- the pipelines group -------------------------------------------------------------------


def _state(pipeline: dict[str, Any]) -> str:
    return "paused" if pipeline.get("paused") else "active"


def _next_fire(pipeline: dict[str, Any]) -> str:
    times = pipeline.get("next_fire_times") or []
    return show_time(times[0]) if times else "-"


def cmd_pipelines_list(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        page = client.list_pipelines(limit=args.limit, cursor=args.cursor)
    if args.json:
        emit_json(page)
        return EXIT_OK
    items = page.get("items") or []
    if not items:
        print("no pipelines (create one with `tickweave apply FILE`)")
        return EXIT_OK
    rows = [[str(p.get("id")), one_line(str(p.get("name") or "-"), 40), f"v{p.get('version')}", _state(p),
             _next_fire(p), one_line(str(p.get("description") or ""), 50)] for p in items]
    print(table(["PIPELINE", "NAME", "VERSION", "STATE", "NEXT RUN (UTC)", "DESCRIPTION"], rows))
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def cmd_pipelines_show(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        pipeline = client.get_pipeline(args.pipeline)
    if args.json:
        emit_json(pipeline)
        return EXIT_OK
    name = f"  ({pipeline['name']})" if pipeline.get("name") else ""
    print(f"pipeline {pipeline.get('id')}{name}  v{pipeline.get('version')}  {_state(pipeline)}")
    if pipeline.get("description"):
        print(f"  description  {one_line(str(pipeline['description']), 100)}")
    print(f"  updated      {show_time(pipeline.get('updated_at'))}  (created {show_time(pipeline.get('created_at'))})")
    stats = pipeline.get("stats") or {}
    by_status = stats.get("runs_by_status") or {}
    if by_status:
        print("  runs         " + ", ".join(f"{status} {n}" for status, n in sorted(by_status.items())))
    for schedule in pipeline.get("schedules") or []:
        print(f"  schedule     {schedule.get('cron')} ({schedule.get('timezone')}) {schedule.get('state')}, "
              f"next {show_time(schedule.get('next_fire_at'))} UTC")
    definition = pipeline.get("source_definition") or pipeline.get("definition")
    if definition:
        print()
        print(canonical_text(definition, "yaml").rstrip())
    return EXIT_OK


def _pause_or_resume(paused: bool) -> Any:
    def command(args: argparse.Namespace) -> int:
        require_key(args, "an operator or admin")
        verb = "pause" if paused else "resume"
        with api_client(args) as client:
            pipeline = client.request("POST", f"/api/pipelines/{seg(args.pipeline)}/{verb}")
        if args.json:
            emit_json(pipeline)
        else:
            print(f"pipeline {pipeline.get('id')} is {_state(pipeline)}: its schedules "
                  + ("fire no runs until `tickweave pipelines resume`" if paused else "fire again"))
        return EXIT_OK

    return command


def cmd_pipelines_delete(args: argparse.Namespace) -> int:
    require_key(args, "an admin")
    params = {"cancel_runs": True} if args.cancel_runs else None
    with api_client(args) as client:
        try:
            answer = client.request("DELETE", f"/api/pipelines/{seg(args.pipeline)}", params=params)
        except ApiError as exc:
            if exc.status == 409 and not args.cancel_runs:
                raise CliError(f"{exc.message}; pass --cancel-runs to cancel them and delete the pipeline",
                               EXIT_FAILED) from None
            raise
    if args.json:
        emit_json(answer)
    else:
        cancelled = int(answer.get("cancelled_runs") or 0)
        print(f"pipeline {answer.get('deleted', args.pipeline)} deleted"
              + (f"; {cancelled} active run(s) cancelled" if cancelled else "")
              + "; its runs and outputs stay readable")
    return EXIT_OK


def register(sub: Subparsers, parents: Parents) -> None:
    api = parents.api
    validate = sub.add_parser("validate", parents=api, help="validate pipeline definitions without storing them")
    validate.add_argument("files", nargs="+", metavar="FILE", help="a definition file, a directory of them, or - (stdin)")
    validate.add_argument("--offline", action="store_true",
                          help="validate here, without a server (pipelines outside the files are not checked)")
    validate.set_defaults(func=cmd_validate)

    apply = sub.add_parser("apply", parents=api, help="create or update pipelines from YAML/JSON files",
                           description="Validate every file, then create (POST) or update (PUT) each pipeline, "
                                       "upstream pipelines first, printing a diff against the current version.")
    apply.add_argument("files", nargs="+", metavar="FILE", help="a definition file, a directory of them, or - (stdin)")
    apply.add_argument("--dry-run", action="store_true", help="validate and diff only; store nothing")
    apply.add_argument("--diff-format", choices=["yaml", "json"], default="yaml",
                       help="render the canonical definitions as (default yaml)")
    apply.add_argument("--full", action="store_true",
                       help="diff every field, defaults included (default: fields left at their defaults are omitted)")
    apply.add_argument("--no-diff", action="store_true", help="print only one line per pipeline")
    apply.set_defaults(func=cmd_apply)

    pipelines = sub.add_parser("pipelines", help="list, show, pause, resume or delete pipelines").add_subparsers(
        dest="pipelines_command", required=True, metavar="COMMAND")
    listing = pipelines.add_parser("list", parents=api, help="list the workspace's pipelines")
    listing.add_argument("--limit", type=page_size, default=100, help="1 to 500 (default 100)")
    listing.add_argument("--cursor", help="next page: the cursor the previous page printed")
    listing.set_defaults(func=cmd_pipelines_list)
    show = pipelines.add_parser("show", parents=api, help="show a pipeline: state, schedules, runs, definition")
    show.add_argument("pipeline", metavar="PIPELINE")
    show.set_defaults(func=cmd_pipelines_show)
    pause = pipelines.add_parser("pause", parents=api, help="stop the pipeline's schedules firing (operator key)")
    pause.add_argument("pipeline", metavar="PIPELINE")
    pause.set_defaults(func=_pause_or_resume(True))
    resume = pipelines.add_parser("resume", parents=api, help="let the pipeline's schedules fire again (operator key)")
    resume.add_argument("pipeline", metavar="PIPELINE")
    resume.set_defaults(func=_pause_or_resume(False))
    delete = pipelines.add_parser(
        "delete", parents=api, help="delete a pipeline; its runs and outputs stay readable (admin key)",
        description="Delete the pipeline: it leaves the list, its schedules stop, its runs, tasks and outputs "
                    "stay readable. Refused while it has pending or running runs, unless --cancel-runs.")
    delete.add_argument("pipeline", metavar="PIPELINE")
    delete.add_argument("--cancel-runs", action="store_true", help="cancel its pending and running runs first")
    delete.set_defaults(func=cmd_pipelines_delete)
