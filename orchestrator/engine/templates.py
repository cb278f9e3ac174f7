"""Templates: reusable node bodies (task, params, retry, timeouts) that pipeline nodes name with
`template: ID`, stored as immutable versions like pipelines.

Resolution happens when a pipeline version is saved, not when it runs: the version stores the
resolved, executable definition (every templated node has its `task`), so runs, backfills and
anything else that reads a pipeline version need not know templates exist, and a pipeline
version keeps meaning the same thing after its templates change. What the pipeline was written
as is kept beside it, with the template version each node resolved to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.graph import DefinitionInvalid, parse_definition_text
from orchestrator.model import NodeDefinition, PipelineDefinition, RetryPolicy
from orchestrator.model.pipeline import SLUG_RULE, TASK_NAME_RULE, _json_object, _none_as, is_slug
from orchestrator.store import templates as template_store

if TYPE_CHECKING:
    from orchestrator.engine.service import Engine

# Node fields a template provides and a node may override by setting them explicitly.
_OVERRIDABLE = ("retry", "timeout_s", "heartbeat_s")
_NODE_DEFAULTS = NodeDefinition(id="x", task="x")


class TemplateDefinition(BaseModel):
    """A template body. Field rules are those of the same fields on a pipeline node."""

    model_config = ConfigDict(extra="forbid")

    id: str
    description: str = ""
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: int | None = Field(default=None, gt=0)
    heartbeat_s: int = Field(default=60, ge=5, le=3600)

    _params_none = field_validator("params", mode="before")(_none_as(dict))
    _params_json = field_validator("params", mode="before")(_json_object)
    _retry_none = field_validator("retry", mode="before")(_none_as(dict))

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not is_slug(value):
            raise ValueError(f"{value!r} is not a valid id: {SLUG_RULE}")
        return value

    @field_validator("task")
    @classmethod
    def _task_name(cls, value: str) -> str:
        # Checked through the node model so templates and nodes can never disagree on the rule.
        try:
            NodeDefinition(id="x", task=value)
        except ValidationError:
            raise ValueError(f"{value!r} is not a valid task name: {TASK_NAME_RULE}") from None
        return value

    def canonical_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def sha256(self) -> str:
        text = json.dumps(self.canonical_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SavedTemplate:
    id: str
    version: int
    sha256: str
    created: bool
    changed: bool  # False: the canonical body was unchanged, so the version stayed


def parse_template(raw: Any) -> TemplateDefinition:
    if not isinstance(raw, dict):
        raise InvalidInput(
            "a template must be an object with id and task",
            details=[{"path": "", "message": "expected an object"}],
        )
    try:
        return TemplateDefinition.model_validate(raw)
    except ValidationError as exc:
        details = [
            {"path": _path(err["loc"]), "message": err["msg"].removeprefix("Value error, ")}
            for err in exc.errors(include_url=False)
        ]
        raise InvalidInput(
            "the template is invalid: " + "; ".join(f"{d['path'] or '(root)'}: {d['message']}" for d in details),
            details=details,
        ) from exc


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def create_template(db: Database, workspace_id: str, raw: Any, *, actor: str | None) -> SavedTemplate:
    template = parse_template(raw)
    sha = template.sha256()

    def work(conn: Connection) -> SavedTemplate:
        if not template_store.insert_template(
            conn, workspace_id=workspace_id, template_id=template.id, sha256=sha,
            body=template.canonical_dict(), created_by=actor,
        ):
            raise Conflict(
                f"template '{template.id}' already exists; use PUT /api/templates/{template.id} to change it",
                details={"template": template.id},
            )
        return SavedTemplate(template.id, 1, sha, created=True, changed=True)

    return db.run_in_transaction(work)


def update_template(
    db: Database, workspace_id: str, template_id: str, raw: Any, *, actor: str | None, create_missing: bool = False
) -> SavedTemplate:
    """A new version when the canonical body changed; the same version when it did not.

    Pipeline versions already saved keep the template version they resolved: a pipeline picks
    up the new version on its next accepted PUT (which then makes a new pipeline version).
    """
    template = parse_template(raw)
    if template.id != template_id:
        raise InvalidInput(
            f"the template's id '{template.id}' does not match the URL's '{template_id}'",
            details=[{"path": "id", "message": f"expected '{template_id}'"}],
        )
    sha = template.sha256()

    def work(conn: Connection) -> SavedTemplate:
        current = template_store.lock_current(conn, workspace_id, template_id)
        if current is None:
            if not create_missing:
                raise NotFound(f"template '{template_id}' not found")
            if not template_store.insert_template(
                conn, workspace_id=workspace_id, template_id=template_id, sha256=sha,
                body=template.canonical_dict(), created_by=actor,
            ):
                # Created by a concurrent request after our lookup: replaying sees it locked.
                raise Conflict(f"template '{template_id}' was created concurrently; retry")
            return SavedTemplate(template_id, 1, sha, created=True, changed=True)
        if current["sha256"] == sha:
            return SavedTemplate(template_id, int(current["current_version"]), sha, created=False, changed=False)
        version = template_store.advance_version(conn, workspace_id, template_id)
        template_store.insert_version(
            conn, workspace_id=workspace_id, template_id=template_id, version=version, sha256=sha,
            body=template.canonical_dict(), created_by=actor,
        )
        return SavedTemplate(template_id, version, sha, created=False, changed=True)

    return db.run_in_transaction(work)


def get_template(db: Database, workspace_id: str, template_id: str) -> Row:
    """The current version: `id, version, sha256, body, description, task, used_by, ...`."""
    with db.connection() as conn:
        row = template_store.get_current(conn, workspace_id, template_id)
    if row is None:
        raise NotFound(f"template '{template_id}' not found")
    return row


def list_templates(db: Database, workspace_id: str, *, limit: int, after_id: str | None) -> list[Row]:
    """Templates in id order, each with `used_by`: the pipelines whose current version uses it."""
    with db.connection() as conn:
        return template_store.list_current(conn, workspace_id, limit=limit, after_id=after_id)


def pipeline_templates(db: Database, workspace_id: str, pipeline_id: str) -> Row:
    """For a pipeline's current version: `source_definition` (as written; None when it uses no
    template) and `templates` ({node id: {template, version}})."""
    with db.connection() as conn:
        row = template_store.pipeline_resolution(conn, workspace_id, pipeline_id)
    if row is None:
        raise NotFound(f"pipeline '{pipeline_id}' not found")
    return row


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """A pipeline definition ready to store.

    `definition` is executable (no `template` left); `source` is the definition as written and
    `refs` maps node id to (template id, template version); both empty when no node names a
    template, and then `sha256` is the plain definition's, as before templates existed.
    """

    definition: PipelineDefinition
    source: dict[str, Any] | None
    refs: dict[str, tuple[str, int]]
    sha256: str


def resolve(conn: Connection, workspace_id: str, written: PipelineDefinition) -> Resolution:
    """Replace each `template: ID` node with the template's current version and the node's
    overrides; InvalidInput listing every node whose template does not exist."""
    templated = [(i, node) for i, node in enumerate(written.nodes) if node.template is not None]
    if not templated:
        return Resolution(written, None, {}, written.sha256())
    found = template_store.current_bodies(conn, workspace_id, (node.template or "" for _, node in templated))
    missing = [
        {"path": f"nodes[{i}].template", "message": f"template '{node.template}' does not exist"}
        for i, node in templated if node.template not in found
    ]
    if missing:
        raise InvalidInput(
            "the pipeline definition is invalid: " + "; ".join(f"{d['path']}: {d['message']}" for d in missing),
            details=missing,
        )
    nodes: list[NodeDefinition] = []
    refs: dict[str, tuple[str, int]] = {}
    for node in written.nodes:
        if node.template is None:
            nodes.append(node)
            continue
        row = found[node.template]
        nodes.append(_apply(node, TemplateDefinition.model_validate(row["body"])))
        refs[node.id] = (node.template, int(row["version"]))
    # Validated again as a whole so the stored definition is exactly what a reader will parse.
    resolved = PipelineDefinition.model_validate(
        {**written.canonical_dict(), "nodes": [n.model_dump(mode="json", by_alias=True) for n in nodes]}
    )
    source = written.canonical_dict()
    # The sha covers what is stored: the resolved definition, the definition as written and the
    # template versions. So a PUT of an unchanged text after a template changed is a new
    # pipeline version (the pickup), and an unchanged text with unchanged templates is not.
    fingerprint = {"definition": resolved.canonical_dict(), "source": source,
                   "templates": {k: list(v) for k, v in refs.items()}}
    sha = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Resolution(resolved, source, refs, sha)


def _apply(node: NodeDefinition, template: TemplateDefinition) -> NodeDefinition:
    """The node with the template filled in under its explicit settings.

    A field counts as an override when the node sets it and to something other than the node
    default. The "set" part is model_fields_set; the "non-default" part matters because a
    definition read back from the API spells every field out, defaults included, and putting
    it back unchanged must not turn the template's retry or timeouts into the defaults.
    """
    update: dict[str, Any] = {
        "task": template.task,
        "template": None,
        "params": {**template.params, **node.params},
        "description": node.description or template.description,
    }
    for name in _OVERRIDABLE:
        value = getattr(node, name)
        explicit = name in node.model_fields_set and value != getattr(_NODE_DEFAULTS, name)
        update[name] = value if explicit else getattr(template, name)
    return NodeDefinition.model_validate({**node.model_dump(mode="json"), **_jsonable(update)})


def _jsonable(update: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in update.items()}


def record(conn: Connection, workspace_id: str, pipeline_id: str, version: int, resolution: Resolution) -> None:
    """Store the source definition and template refs of a just-inserted pipeline version."""
    if resolution.source is None:
        return
    template_store.record_resolution(
        conn, workspace_id=workspace_id, pipeline_id=pipeline_id, pipeline_version=version,
        source_definition=resolution.source, refs=resolution.refs,
    )


# --- examples ------------------------------------------------------------------------------


def load_example_templates(engine: Engine, workspace: str, directory: Path) -> list[str]:
    """Create or update every template file (*.yaml, *.yml, *.json) in `directory`.

    Run before the example pipelines are loaded, since pipelines naming a missing template are
    refused. Returns "id vN" per template, for the dev runner's banner.
    """
    loaded: list[str] = []
    for path in sorted(directory.glob("*.y*ml")) + sorted(directory.glob("*.json")):
        try:
            raw = parse_definition_text(path.read_bytes(), "application/json" if path.suffix == ".json" else None)
        except DefinitionInvalid as exc:
            raise InvalidInput(f"{path.name}: {exc}") from exc
        template_id = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(template_id, str):
            raise InvalidInput(f"{path.name}: a template needs an id")
        saved = update_template(engine.db, workspace, template_id, raw, actor="examples", create_missing=True)
        loaded.append(f"{saved.id} v{saved.version}")
    return loaded
