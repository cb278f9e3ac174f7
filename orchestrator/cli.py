"""`tickweave`: operate an orchestrator from a shell.

Commands that talk to the HTTP API (`apply`, `validate`, `trigger`, `runs`, `run`, `dlq`,
`backfill`, `tick`) find it with `--url` or TICKWEAVE_URL (then TICKWEAVE_PUBLIC_URL, then
http://localhost:8000) and authenticate with `--api-key` or TICKWEAVE_API_KEY. `db migrate`,
`keys create` and `workspaces limit` work on the database directly (DATABASE_URL); `dev` runs
the local stack. docs/cli.md is the manual.

`--json` (before or after the command) prints only machine-readable JSON on stdout; messages
and errors always go to stderr. API errors print their message and each `path: message` of
their details.

Exit codes, the same for every command, for scripts to rely on:

    0    success (for `trigger --wait` / `run --wait`: the run succeeded)
    1    the thing asked about failed: the run failed or was cancelled, a definition is
         invalid, or the server refused the request in its current state (409 conflict)
    2    usage error or bad input: unknown option, missing or unreadable file, malformed
         `--param`, a request the API rejected as malformed (400, 413, 422 outside apply/validate)
    3    not found: unknown pipeline, run, dead letter (404)
    4    authentication or authorization: missing, unknown or too-weak API key (401, 403)
    5    server or connection error: unreachable, timed out, 5xx, not the Tickweave API
    124  `--wait` gave up after `--timeout` seconds (the run goes on)
    130  interrupted (Ctrl-C); a run being watched goes on
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from orchestrator.client import (
    TERMINAL_RUN_STATUSES,
    ApiError,
    ClientError,
    ConnectionFailed,
    TickweaveClient,
    resolve_url,
)

if TYPE_CHECKING:
    from orchestrator.engine.service import Engine
    from orchestrator.model.pipeline import PipelineDefinition

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_SERVER = 5
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

DEFINITION_SUFFIXES = (".yaml", ".yml", ".json")
RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


class CliError(Exception):
    """A problem to report on stderr and end the command with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.lines = list(lines)


# --- output --------------------------------------------------------------------------------


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def say(message: str) -> None:
    print(message, file=sys.stderr)


def _color_enabled(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


_STATUS_COLORS = {
    "succeeded": "32", "failed": "31", "dead": "31", "cancelled": "33", "skipped": "2", "running": "36",
    "dispatched": "36", "ready": "34", "waiting": "35", "pending": "2",
}


def _paint(text: str, code: str | None, enabled: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if enabled and code else text


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _show_time(value: Any) -> str:
    parsed = _parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _duration(start: Any, end: Any, *, until_now: bool = False) -> str:
    began, ended = _parse_time(start), _parse_time(end)
    if began is None:
        return "-"
    if ended is None:
        if not until_now:
            return "-"
        ended = datetime.now(UTC)
    return _seconds(max(0.0, (ended - began).total_seconds()))


def _error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or json.dumps(error))
    return str(error)


def _one_line(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- errors and the API client -------------------------------------------------------------


def exit_code_for(error: ClientError) -> int:
    if isinstance(error, ApiError):
        if error.status in (401, 403):
            return EXIT_AUTH
        if error.status == 404:
            return EXIT_NOT_FOUND
        if error.status == 409:
            return EXIT_FAILED
        if error.status >= 500:
            return EXIT_SERVER
        return EXIT_USAGE
    return EXIT_SERVER


def report_client_error(error: ClientError, args: argparse.Namespace) -> None:
    say(f"error: {error.message}")
    if isinstance(error, ApiError):
        for line in error.detail_lines:
            say(f"  {line}")
        if error.status == 401 and not _api_key(args):
            say("hint: no API key was given; pass --api-key or set TICKWEAVE_API_KEY")
    else:
        say("hint: is the server running (`tickweave dev`)? Point at it with --url or TICKWEAVE_URL")


def _api_key(args: argparse.Namespace) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("TICKWEAVE_API_KEY") or None


def api_client(args: argparse.Namespace) -> TickweaveClient:
    return TickweaveClient(resolve_url(getattr(args, "url", None)), _api_key(args),
                           timeout=getattr(args, "http_timeout", 30.0))


# --- definition files ----------------------------------------------------------------------


@dataclass
class Document:
    """One pipeline definition read from a file (a file may hold a list of them)."""

    source: str
    raw: Any = None
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str | None:
        value = self.raw.get("id") if isinstance(self.raw, dict) else None
        return value if isinstance(value, str) else None


def _expand(paths: Sequence[str]) -> list[Path | None]:
    """Files in the order given; a directory stands for its *.yaml/*.yml/*.json, sorted; `-`
    (None) is stdin."""
    found: list[Path | None] = []
    for name in paths:
        if name == "-":
            found.append(None)
            continue
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DEFINITION_SUFFIXES)
            if not inside:
                raise CliError(f"{name}: the directory holds no .yaml, .yml or .json file")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"{name}: no such file")
    return found


def load_documents(paths: Sequence[str]) -> list[Document]:
    """Parse every file (JSON or YAML; a top-level list holds several definitions). A file
    that does not parse becomes a Document with errors; a missing file is a usage error."""
    from orchestrator.graph import DefinitionInvalid, parse_definition_text

    documents: list[Document] = []
    for path in _expand(paths):
        source = "-" if path is None else str(path)
        try:
            text = sys.stdin.read() if path is None else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"{source}: cannot read: {exc}") from None
        content_type = "application/json" if path is not None and path.suffix.lower() == ".json" else None
        try:
            data = parse_definition_text(text, content_type)
        except DefinitionInvalid as exc:
            documents.append(Document(source, None, exc.to_list()))
            continue
        items = data if isinstance(data, list) else [data]
        for index, item in enumerate(items):
            name = f"{source}[{index}]" if isinstance(data, list) else source
            if isinstance(item, dict):
                documents.append(Document(name, item))
            else:
                documents.append(Document(name, item, [{"path": "", "message": "a pipeline definition must be an object"}]))
    if not documents:
        raise CliError("no definitions given")
    return documents


# --- validation ----------------------------------------------------------------------------


@dataclass
class Validation:
    checked_by: str  # "server" or "local"
    documents: list[Document]
    results: list[dict[str, Any]]
    errors: list[dict[str, str]]
    warnings: list[dict[str, str]]

    @property
    def valid(self) -> bool:
        return not self.errors and all(r["valid"] for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "checked_by": self.checked_by, "pipelines": self.results,
                "errors": self.errors, "warnings": self.warnings}


def validate_documents(documents: list[Document], client: TickweaveClient | None) -> Validation:
    """With a client, POST /api/pipelines/validate (the server knows the workspace's other
    pipelines and templates); on a server without that route, or with no client (`--offline`),
    validate here with the same code the server runs."""
    results: list[dict[str, Any]] = [
        {"file": d.source, "id": d.id, "valid": not d.errors, "errors": list(d.errors)} for d in documents
    ]
    sendable = [i for i, d in enumerate(documents) if not d.errors]
    _mark_duplicate_ids(documents, sendable, results)
    sendable = [i for i in sendable if results[i]["valid"]]
    if client is not None and sendable:
        try:
            answer = client.validate_pipelines([documents[i].raw for i in sendable])
        except ApiError as exc:
            if exc.status not in (404, 405):
                raise
        else:
            return _server_validation(documents, results, sendable, answer)
    return _local_validation(documents, results, sendable, client)


def _mark_duplicate_ids(documents: list[Document], indexes: list[int], results: list[dict[str, Any]]) -> None:
    first: dict[str, str] = {}
    for i in indexes:
        pipeline_id = documents[i].id
        if pipeline_id is None:
            continue
        if pipeline_id in first:
            results[i]["valid"] = False
            results[i]["errors"].append(
                {"path": "id", "message": f"pipeline '{pipeline_id}' is also defined in {first[pipeline_id]}"})
        else:
            first[pipeline_id] = documents[i].source


def _server_validation(
    documents: list[Document], results: list[dict[str, Any]], sendable: list[int], answer: dict[str, Any]
) -> Validation:
    per_pipeline = answer.get("pipelines") or []
    by_id = {p.get("id"): p for p in per_pipeline if isinstance(p, dict)}
    for position, i in enumerate(sendable):
        verdict = per_pipeline[position] if len(per_pipeline) == len(sendable) else by_id.get(documents[i].id)
        if not isinstance(verdict, dict):
            continue
        results[i]["valid"] = bool(verdict.get("valid", not verdict.get("errors")))
        results[i]["errors"] = list(verdict.get("errors") or [])
        if verdict.get("id") and not results[i]["id"]:
            results[i]["id"] = verdict["id"]
    errors = [e for e in answer.get("errors") or [] if isinstance(e, dict)]
    if answer.get("valid") is False and not errors and all(r["valid"] for r in results):
        errors.append({"path": "", "message": "the server found the set invalid"})
    return Validation("server", documents, results, errors, list(answer.get("warnings") or []))


def _local_validation(
    documents: list[Document], results: list[dict[str, Any]], sendable: list[int], client: TickweaveClient | None
) -> Validation:
    from orchestrator.graph import DefinitionInvalid, end_at_problem, pipeline_level_errors, validate_pipeline

    definitions: dict[str, PipelineDefinition] = {}
    for i in sendable:
        try:
            definition = validate_pipeline(documents[i].raw)
        except DefinitionInvalid as exc:
            results[i]["valid"] = False
            results[i]["errors"] = exc.to_list()
            continue
        results[i]["id"] = definition.id
        definitions[definition.id] = definition

    # Upstream pipelines the files name but do not define: the server's current versions (so
    # cycles through them are found too), or, offline, unknown and only warned about.
    context: dict[str, PipelineDefinition] = {}
    unknown: set[str] = set()
    pending = [dep.pipeline for d in definitions.values() for dep in d.depends]
    while pending:
        name = pending.pop()
        if name in definitions or name in context or name in unknown:
            continue
        row = client.find_pipeline(name) if client is not None else None
        if row is None:
            unknown.add(name)
            continue
        try:
            context[name] = validate_pipeline(row.get("source_definition") or row.get("definition"))
        except DefinitionInvalid:
            unknown.add(name)
            continue
        pending.extend(dep.pipeline for dep in context[name].depends)

    warnings: list[dict[str, str]] = []
    # Whether end_at being past is an error depends on the pipeline being new (the server
    # refuses it on create): here it is only said.
    now = datetime.now(UTC)
    for pipeline_id, definition in sorted(definitions.items()):
        ended = end_at_problem(definition, now)
        if ended is not None:
            warnings.append({"path": f"{pipeline_id}.{ended.path}",
                             "message": f"{ended.message}; the server refuses it for a new pipeline"})
    skip_paths: set[str] = set()
    if client is None:
        for pipeline_id, definition in sorted(definitions.items()):
            for n, dep in enumerate(definition.depends):
                if dep.pipeline in unknown:
                    path = f"{pipeline_id}.depends[{n}].pipeline"
                    skip_paths.add(path)
                    warnings.append({"path": path, "message": f"pipeline '{dep.pipeline}' is not among the files "
                                     "given; not checked offline"})
    errors = [
        e.to_dict() for e in pipeline_level_errors({**context, **definitions})
        if e.path not in skip_paths and (e.path == "depends" or e.path.split(".", 1)[0] in definitions)
    ]
    return Validation("local", documents, results, errors, warnings)


def print_validation(validation: Validation, stream: TextIO) -> None:
    color = _color_enabled(stream)
    for result in validation.results:
        label = _paint("ok     ", "32", color) if result["valid"] else _paint("invalid", "31", color)
        named = f" ({result['id']})" if result["id"] else ""
        print(f"{label}  {result['file']}{named}", file=stream)
        for error in result["errors"]:
            print(f"    {_located(error)}", file=stream)
    if validation.errors:
        print("across pipelines:", file=stream)
        for error in validation.errors:
            print(f"    {_located(error)}", file=stream)
    for warning in validation.warnings:
        print(f"warning: {_located(warning)}", file=stream)
    good = sum(1 for r in validation.results if r["valid"])
    bad = len(validation.results) - good
    where = "by the server" if validation.checked_by == "server" else "locally"
    print(f"{good} valid, {bad} invalid (checked {where})", file=stream)


def _located(error: dict[str, Any]) -> str:
    path = error.get("path") or ""
    return f"{path}: {error.get('message', '')}" if path else str(error.get("message", ""))


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


# --- apply ---------------------------------------------------------------------------------


def canonical_text(raw: Any, fmt: str, *, full: bool = False) -> str:
    """The definition in canonical form (validated, `steps` expanded, the model's field order),
    as YAML or JSON; without the fields left at their defaults unless `full`."""
    import yaml

    from orchestrator.graph import DefinitionInvalid, validate_pipeline

    try:
        definition = validate_pipeline(raw)
    except DefinitionInvalid:
        value, sort = raw, True
    else:
        sort = False  # the model's field order: id first, nodes last
        value = (definition.canonical_dict() if full
                 else definition.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    if fmt == "json":
        return json.dumps(value, indent=2, sort_keys=sort, ensure_ascii=False) + "\n"
    return str(yaml.safe_dump(value, sort_keys=sort, default_flow_style=False, allow_unicode=True, width=100))


def definition_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=old_name, tofile=new_name))


def print_diff(diff: str, stream: TextIO) -> None:
    color = _color_enabled(stream)
    for line in diff.splitlines():
        code = None
        if line.startswith(("+++", "---")):
            code = "1"
        elif line.startswith("+"):
            code = "32"
        elif line.startswith("-"):
            code = "31"
        elif line.startswith("@@"):
            code = "36"
        print(_paint(line, code, color), file=stream)


def _apply_order(documents: list[Document]) -> list[Document]:
    """Upstream pipelines before the pipelines that depend on them; otherwise as given."""
    in_set = {d.id for d in documents}

    def upstream(document: Document) -> set[str]:
        depends = document.raw.get("depends") if isinstance(document.raw, dict) else None
        names = {x.get("pipeline") for x in depends if isinstance(x, dict)} if isinstance(depends, list) else set()
        return {n for n in names if isinstance(n, str) and n in in_set and n != document.id}

    ordered: list[Document] = []
    placed: set[str | None] = set()
    remaining = list(documents)
    while remaining:
        ready = next((d for d in remaining if upstream(d) <= placed), remaining[0])  # a cycle: as given
        ordered.append(ready)
        placed.add(ready.id)
        remaining.remove(ready)
    return ordered


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
        for document in _apply_order(documents):
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


# --- runs ----------------------------------------------------------------------------------


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
            parts.append(f"{n:,} {_paint(word, _STATUS_COLORS.get(statuses[0]), color)}")
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


TASK_STATUSES = ("running", "dispatched", "ready", "waiting", "pending", "succeeded", "failed", "dead", "skipped",
                 "cancelled")
_TERMINAL_TASK_STATUSES = ("succeeded", "failed", "dead", "skipped", "cancelled")


def _task_total(run: dict[str, Any]) -> int:
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
    return _task_total(run) <= len(run.get("tasks") or [])


def _status_counts(run: dict[str, Any]) -> dict[str, int]:
    if isinstance(run.get("counts"), dict):
        return {str(k): int(v) for k, v in run["counts"].items()}
    counts: dict[str, int] = {}
    for task in run.get("tasks") or []:
        counts[str(task.get("status"))] = counts.get(str(task.get("status")), 0) + 1
    return counts


def _counts_text(counts: dict[str, int], color: bool = False) -> str:
    order = {status: i for i, status in enumerate(TASK_STATUSES)}
    return ", ".join(f"{_paint(status, _STATUS_COLORS.get(status), color)} {n}"
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
        took = _duration(run.get("started_at") or run.get("created_at"), run.get("finished_at"))
        status = str(run.get("status"))
        line = f"run {run.get('id')} {status}" + (f" in {took}" if took != "-" else "")
        if run.get("error"):
            line += f": {_one_line(_error_text(run['error']), 200)}"
        print(_paint(line, _STATUS_COLORS.get(status), self.color), file=self.stream)
        self.stream.flush()

    def lines(self, run: dict[str, Any], *, color: bool | None = None) -> list[str]:
        """The frame drawn on a terminal: a header, then a line per task."""
        color = self.color if color is None else color
        tasks = run.get("tasks") or []
        many = _many_versions(run)
        width = max([len(_task_label(t, many)) for t in tasks] + [4])
        elapsed = _duration(run.get("started_at") or run.get("created_at"), run.get("finished_at"), until_now=True)
        status = str(run.get("status"))
        counts = _status_counts(run)
        done = sum(n for s, n in counts.items() if s in _TERMINAL_TASK_STATUSES)
        header = (f"run {run.get('id')}  {run.get('pipeline_id')} v{run.get('pipeline_version')}  "
                  f"{_paint(status, _STATUS_COLORS.get(status), color)}  {done}/{_task_total(run)} tasks"
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
                           f"{_paint(task_status.ljust(10), _STATUS_COLORS.get(task_status), color)}  "
                           f"{_map_text('', task.get('map'), color).strip()}")
                continue
            attempt = f"attempt {task.get('attempt')}/{task.get('max_attempts')}" if task.get("attempt") else ""
            took = _duration(task.get("started_at") or task.get("dispatched_at"), task.get("finished_at"),
                             until_now=task_status in ("running", "dispatched"))
            note = _error_text(task.get("error")) or str(task.get("message") or "")
            line = (f"  {_task_label(task, many).ljust(width)}  "
                    f"{_paint(task_status.ljust(10), _STATUS_COLORS.get(task_status), color)}  "
                    f"{attempt.ljust(12)}  {took if took != '-' else '':>7}  {_one_line(note, 60)}")
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
                  f"{_task_total(run)} tasks, {status}", file=self.stream)
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
            error = _error_text(task.get("error"))
            if error and task.get("status") in ("failed", "dead"):
                line += f": {_one_line(error, 200)}"
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
                say(f"timed out after {_seconds(timeout or 0)} waiting for run {run.get('id')} "
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
                      f"{_task_total(run)} tasks")
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
    rows = [[str(r.get("id")), str(r.get("pipeline_id")), f"v{r.get('pipeline_version')}", str(r.get("status")),
             str(r.get("trigger")), ",".join(r.get("versions") or []), _show_time(r.get("created_at")),
             _duration(r.get("started_at"), r.get("finished_at"))] for r in items]
    text = _table(["RUN", "PIPELINE", "VERSION", "STATUS", "TRIGGER", "DATA VERSIONS", "CREATED (UTC)", "DURATION"],
                  rows)
    print(text)
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def print_run(run: dict[str, Any], stream: TextIO) -> None:
    status = str(run.get("status"))
    color = _color_enabled(stream)
    print(f"run {run.get('id')}  {run.get('pipeline_id')} v{run.get('pipeline_version')}  "
          f"{_paint(status, _STATUS_COLORS.get(status), color)}", file=stream)
    by = f" by {run['triggered_by']}" if run.get("triggered_by") else ""
    print(f"  trigger   {run.get('trigger')}{by}", file=stream)
    print(f"  versions  {', '.join(run.get('versions') or [])}", file=stream)
    if run.get("params"):
        print(f"  params    {json.dumps(run['params'], sort_keys=True)}", file=stream)
    took = _duration(run.get("started_at"), run.get("finished_at"))
    print(f"  created   {_show_time(run.get('created_at'))}  started {_show_time(run.get('started_at'))}  "
          f"finished {_show_time(run.get('finished_at'))}" + (f"  ({took})" if took != "-" else ""), file=stream)
    if run.get("error"):
        print(f"  error     {_error_text(run['error'])}", file=stream)
    print(f"  tasks     {_task_total(run)}{_items_note(run)}: {_counts_text(_status_counts(run), color) or 'none'}",
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
        print(_table(["NODE", "TASKS", "BY STATUS"], rows), file=stream)
        if run.get("nodes_next_cursor"):
            print(f"  ... {int(run.get('node_count') or 0) - len(nodes)} more nodes; "
                  f"`--node NODE` lists one node's tasks", file=stream)
    tasks = run.get("tasks") or []
    if tasks:
        print(file=stream)
        rows = [[_task_label(t, False), str(t.get("version")), str(t.get("status")),
                 "-" if t.get("kind") == "map" else f"{t.get('attempt')}/{t.get('max_attempts')}",
                 _duration(t.get("started_at") or t.get("dispatched_at"), t.get("finished_at")),
                 _one_line(_error_text(t.get("error")) or str(t.get("message") or ""), 70)] for t in tasks]
        print(_table(["NODE", "VERSION", "STATUS", "ATTEMPT", "DURATION", "MESSAGE"], rows), file=stream)
    if run.get("tasks_next_cursor"):
        print(f"more: --cursor {run['tasks_next_cursor']}", file=stream)


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


# --- dead letters --------------------------------------------------------------------------


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
    rows = [[str(e.get("id")), str(e.get("pipeline_id")), str(e.get("node_id")), str(e.get("version")),
             str(e.get("attempts")), _show_time(e.get("created_at")),
             "retried " + _show_time(e["retried_at"]) if e.get("retried_at") else "",
             _one_line(_error_text(e.get("error")), 60)] for e in items]
    print(_table(["ID", "PIPELINE", "NODE", "VERSION", "ATTEMPTS", "CREATED (UTC)", "RETRIED", "ERROR"], rows))
    print(f"runs: {', '.join(sorted({str(e.get('run_id')) for e in items}))}")
    if page.get("next_cursor"):
        print(f"more: --cursor {page['next_cursor']}")
    return EXIT_OK


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    with api_client(args) as client:
        answer = client.retry_dead_letter(args.entry_id)
    if args.json:
        emit_json(answer)
    else:
        entry = answer.get("dead_letter") or {}
        print(f"retrying {entry.get('pipeline_id')}/{entry.get('node_id')}[{entry.get('version')}]: "
              f"run {answer.get('run_id')} is {answer.get('run_status')}")
    return EXIT_OK


# --- database and local commands -----------------------------------------------------------


def _engine() -> Engine:
    from orchestrator.config import load_settings
    from orchestrator.engine.service import Engine

    settings = load_settings()
    if not settings.database_url:
        raise CliError("DATABASE_URL is not set")
    return Engine(settings, transports={})


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from orchestrator.db.migrate import migrate

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError("DATABASE_URL is not set (or pass --database-url)")
    applied = migrate(url)
    if args.json:
        emit_json({"applied": applied})
    else:
        print(f"applied migrations: {applied or 'none (up to date)'}")
    return EXIT_OK


def cmd_db_check(args: argparse.Namespace) -> int:
    """Recompute the DAG's books (dependency and run counters, derived statuses, limits) from
    the edges and task statuses; exit 1 on any violation (docs/reliability.md)."""
    from orchestrator.store.invariants import find_violations

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise CliError("DATABASE_URL is not set (or pass --database-url)")
    violations = find_violations(url)
    if args.json:
        emit_json({"ok": not violations, "violations": [v.to_dict() for v in violations]})
    elif not violations:
        print("the books are clean: every counter and derived state matches the edges and task statuses")
    else:
        for v in violations:
            where = " ".join(f"{k} {val}" for k, val in (("run", v.run_id), ("task", v.task_id)) if val)
            print(f"[{v.check}] {where}: {v.message}".replace(" :", ":"))
        print(f"{len(violations)} violation(s)")
    return EXIT_FAILED if violations else EXIT_OK


def cmd_keys_create(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        raw, key_id = engine.create_api_key(args.workspace, args.role, name=args.name or "")
    finally:
        engine.close()
    if args.json:
        emit_json({"id": str(key_id), "key": raw, "workspace": args.workspace, "role": args.role})
    else:
        print(f"key {key_id} ({args.role} in {args.workspace}); shown once:\n{raw}")
    return EXIT_OK


def cmd_workspace_limit(args: argparse.Namespace) -> int:
    from orchestrator.engine.errors import EngineError
    from orchestrator.engine.keys import set_workspace_task_limit

    limit = None if args.max_active_tasks == 0 else args.max_active_tasks
    engine = _engine()
    try:
        set_workspace_task_limit(engine.db, args.workspace, limit)
    except EngineError as exc:
        raise CliError(exc.message) from None
    finally:
        engine.close()
    if args.json:
        emit_json({"workspace": args.workspace, "max_active_tasks": limit})
    else:
        print(f"workspace {args.workspace}: max_active_tasks = {args.max_active_tasks or 'unlimited'}")
    return EXIT_OK


def cmd_backfill(args: argparse.Namespace) -> int:
    """POST /api/pipelines/{id}/backfill; prints the slots."""
    if not _api_key(args):
        raise CliError("set TICKWEAVE_API_KEY (or pass --api-key) to an operator or admin key", EXIT_AUTH)
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


def cmd_tick(args: argparse.Namespace) -> int:
    """POST /api/tick as EventBridge would: the tick runs where the workers' transports live."""
    from orchestrator.config import load_settings

    settings = load_settings()
    url = resolve_url(args.url) if (args.url or os.environ.get("TICKWEAVE_URL")) else settings.public_url
    with TickweaveClient(url, timeout=60) as client:
        summary = client.tick(settings.tick_secret)
    if args.json:
        emit_json(summary)
    else:
        print(json.dumps(summary))
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    # infra/ (local stand-ins for the cloud) ships with the repository, not the wheel.
    if (Path.cwd() / "infra" / "dev.py").exists():
        sys.path.insert(0, str(Path.cwd()))
    try:
        from infra.dev import run_dev
    except ImportError:
        raise CliError("`tickweave dev` runs from a checkout of the repository (it needs infra/ and examples/)") from None
    return int(run_dev(Path.cwd()))


# --- arguments -----------------------------------------------------------------------------


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return number


def _task_page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 200:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 200")
    return int(value)


def _page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 500:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 500")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    # Shared options are accepted before or after the command: the command's copy leaves the
    # value alone unless given (SUPPRESS), so `tickweave --json runs` and `runs --json` agree.
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print only machine-readable JSON on stdout")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=argparse.SUPPRESS,
                        help="API base URL (default: TICKWEAVE_URL, TICKWEAVE_PUBLIC_URL, http://localhost:8000)")
    server.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (default: TICKWEAVE_API_KEY)")
    api = [output, server]

    parser = argparse.ArgumentParser(
        prog="tickweave", description="Tickweave pipeline orchestrator",
        epilog="exit codes: 0 ok, 1 failed (run failed, invalid definition, conflict), 2 usage or bad input, "
               "3 not found, 4 authentication, 5 server or connection error, 124 --wait timed out "
               "(docs/cli.md)")
    parser.add_argument("--json", action="store_true", default=False, help="print only machine-readable JSON on stdout")
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database commands").add_subparsers(dest="db_command", required=True)
    mig = db.add_parser("migrate", parents=[output], help="apply pending SQL migrations (advisory-locked)")
    mig.add_argument("--database-url")
    mig.set_defaults(func=cmd_db_migrate)
    check = db.add_parser("check", parents=[output],
                          help="check the DAG's books (counters, derived states, limits); exit 1 on a violation")
    check.add_argument("--database-url")
    check.set_defaults(func=cmd_db_check)

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

    validate = sub.add_parser("validate", parents=api, help="validate pipeline definitions without storing them")
    validate.add_argument("files", nargs="+", metavar="FILE", help="a definition file, a directory of them, or - (stdin)")
    validate.add_argument("--offline", action="store_true",
                          help="validate here, without a server (pipelines outside the files are not checked)")
    validate.set_defaults(func=cmd_validate)

    def wait_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--wait", action="store_true",
                             help="follow the run until it ends: exit 0 if it succeeded, 1 if it failed or was cancelled")
        command.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                             help="with --wait: give up after this long (exit 124; the run goes on)")
        command.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                             help="with --wait: how often to poll the run (default 1)")

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
    runs.add_argument("--limit", type=_page_size, default=20, help="1 to 500 (default 20)")
    runs.add_argument("--cursor", help="next page: the cursor the previous page printed")
    runs.set_defaults(func=cmd_runs)

    run = sub.add_parser("run", parents=api, help="show a run: its tasks counted by status, and a page of them")
    run.add_argument("run_id", metavar="RUN_ID")
    run.add_argument("--status", choices=TASK_STATUSES, help="list only the tasks in this status")
    run.add_argument("--node", help="list only this node's tasks")
    run.add_argument("--limit", type=_task_page_size, help="tasks per page, 1 to 200 (default 100)")
    run.add_argument("--cursor", help="next page of tasks: the cursor the previous page printed")
    wait_options(run)
    run.set_defaults(func=cmd_run)

    dlq = sub.add_parser("dlq", help="dead letters: tasks that ran out of attempts").add_subparsers(
        dest="dlq_command", required=True)
    dlq_list = dlq.add_parser("list", parents=api, help="list dead letters, newest first")
    dlq_list.add_argument("--pipeline")
    dlq_list.add_argument("--include-retried", action="store_true", help="also those already retried")
    dlq_list.add_argument("--limit", type=_page_size, default=50, help="1 to 500 (default 50)")
    dlq_list.add_argument("--cursor", help="next page: the cursor the previous page printed")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_retry = dlq.add_parser("retry", parents=api, help="give a dead task a new attempt; its run resumes")
    dlq_retry.add_argument("entry_id", metavar="ID")
    dlq_retry.set_defaults(func=cmd_dlq_retry)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", parents=[output], help="create an API key (printed once; needs DATABASE_URL)")
    create.add_argument("--workspace", required=True)
    create.add_argument("--role", choices=["viewer", "operator", "admin"], default="admin")
    create.add_argument("--name")
    create.set_defaults(func=cmd_keys_create)

    workspaces = sub.add_parser("workspaces", help="workspace settings").add_subparsers(
        dest="workspaces_command", required=True)
    limit = workspaces.add_parser("limit", parents=[output],
                                  help="limit the workspace's tasks out with workers at once (needs DATABASE_URL)")
    limit.add_argument("--workspace", required=True)
    limit.add_argument("--max-active-tasks", type=int, required=True, help="0 removes the limit")
    limit.set_defaults(func=cmd_workspace_limit)

    backfill = sub.add_parser("backfill", parents=api, help="run a pipeline for the schedule slots of a past range")
    backfill.add_argument("pipeline")
    backfill.add_argument("--start", required=True, help="ISO time with a timezone, e.g. 2026-01-01T00:00:00Z")
    backfill.add_argument("--end", required=True)
    backfill.add_argument("--versions", help="comma-separated data versions")
    backfill.add_argument("--max-active-runs", type=int)
    backfill.add_argument("--reprocess", choices=["none", "failed", "all"], default="none")
    backfill.add_argument("--dry-run", action="store_true")
    backfill.set_defaults(func=cmd_backfill)

    tick = sub.add_parser("tick", parents=[output], help="ask the API for one tick (expire leases, claim, dispatch)")
    tick.add_argument("--url", default=argparse.SUPPRESS,
                      help="API base URL (default: TICKWEAVE_URL, then TICKWEAVE_PUBLIC_URL); the secret is "
                           "TICKWEAVE_TICK_SECRET")
    tick.set_defaults(func=cmd_tick)

    dev = sub.add_parser("dev", help="run the whole stack locally (make dev)")
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        say(f"error: {exc.message}")
        for line in exc.lines:
            say(f"  {line}")
        return exc.code
    except ClientError as exc:
        report_client_error(exc, args)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tickweave runs | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
