"""Pipeline definition files: reading them (YAML/JSON, directories, stdin), validating them
(on the server, or here with the server's own code), their canonical form and diffs.
`validate` and `apply` (pipelines.py) are built on this."""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from orchestrator.cli.common import DEFINITION_SUFFIXES, CliError, color_enabled, paint
from orchestrator.client import ApiError, TickweaveClient

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orchestrator.model.pipeline import PipelineDefinition


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
    color = color_enabled(stream)
    for result in validation.results:
        label = paint("ok     ", "32", color) if result["valid"] else paint("invalid", "31", color)
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
    color = color_enabled(stream)
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
        print(paint(line, code, color), file=stream)


def apply_order(documents: list[Document]) -> list[Document]:
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

