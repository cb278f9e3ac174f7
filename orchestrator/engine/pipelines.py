"""Pipeline definitions: validate, store each accepted change as a new immutable version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine import templates
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound, TooLarge
from orchestrator.engine.events import check_trigger_cycles
from orchestrator.engine.scheduling import sync_schedules
from orchestrator.graph import DefinitionInvalid, validate_pipeline
from orchestrator.model import PipelineDefinition
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import schedules as schedule_store


@dataclass(frozen=True)
class SavedPipeline:
    id: str
    version: int
    sha256: str
    created: bool  # False: an update; or an unchanged definition (version stays)
    changed: bool


# Definition size: a pipeline's nodes become one task per data version per run, created in one
# transaction; beyond this a definition is refused (413) rather than slowing every trigger.
MAX_NODES_PER_PIPELINE = 10_000


def parse_definition(raw: Any) -> PipelineDefinition:
    if isinstance(raw, dict):
        count = len(raw.get("nodes") or []) + len(raw.get("steps") or [])
        if count > MAX_NODES_PER_PIPELINE:
            raise TooLarge(
                f"the definition has {count} nodes; the limit is {MAX_NODES_PER_PIPELINE} per pipeline",
                details=[{"path": "nodes", "message": f"at most {MAX_NODES_PER_PIPELINE} nodes"}],
            )
    try:
        return validate_pipeline(raw)
    except DefinitionInvalid as exc:
        raise InvalidInput(
            "the pipeline definition is invalid: " + "; ".join(f"{e.path or '(root)'}: {e.message}" for e in exc.errors),
            details=[e.to_dict() for e in exc.errors],
        ) from exc


def create_pipeline(db: Database, workspace_id: str, raw: Any, *, actor: str | None) -> SavedPipeline:
    written = parse_definition(raw)

    def work(conn: Connection) -> SavedPipeline:
        # Templates are resolved in the transaction that stores the version, so the template
        # versions recorded are the ones the stored definition was built from.
        resolution = templates.resolve(conn, workspace_id, written)
        definition, sha = resolution.definition, resolution.sha256
        # Inside the saving transaction: it takes the workspace's event-graph lock, so two
        # registrations that only close a cycle together cannot both pass.
        check_trigger_cycles(conn, workspace_id, definition)
        if not pipeline_store.insert_pipeline(
            conn, workspace_id=workspace_id, pipeline_id=definition.id, sha256=sha,
            definition=definition.canonical_dict(), created_by=actor,
        ):
            raise Conflict(
                f"pipeline '{definition.id}' already exists; use PUT /api/pipelines/{definition.id} to change it",
                details={"pipeline": definition.id},
            )
        templates.record(conn, workspace_id, definition.id, 1, resolution)
        sync_schedules(conn, workspace_id, definition.id, definition)
        pipeline_store.set_task_limit(conn, workspace_id, definition.id, definition.concurrency.max_active_tasks)
        return SavedPipeline(definition.id, 1, sha, created=True, changed=True)

    return db.run_in_transaction(work)


def update_pipeline(
    db: Database, workspace_id: str, pipeline_id: str, raw: Any, *, actor: str | None, create_missing: bool = False
) -> SavedPipeline:
    """A new version when the canonical definition changed; the same version when it did not."""
    written = parse_definition(raw)
    if written.id != pipeline_id:
        raise InvalidInput(
            f"the definition's id '{written.id}' does not match the URL's '{pipeline_id}'",
            details=[{"path": "id", "message": f"expected '{pipeline_id}'"}],
        )

    def work(conn: Connection) -> SavedPipeline:
        # The sha covers the template versions resolved now, so an unchanged definition whose
        # templates changed becomes a new version: a PUT is how a pipeline picks them up.
        resolution = templates.resolve(conn, workspace_id, written)
        definition, sha = resolution.definition, resolution.sha256
        current = pipeline_store.lock_current(conn, workspace_id, pipeline_id)
        if current is None or current["sha256"] != sha:
            # An unchanged definition cannot have closed a cycle; anything saved is checked.
            check_trigger_cycles(conn, workspace_id, definition)
        if current is None:
            if not create_missing:
                raise NotFound(f"pipeline '{pipeline_id}' not found")
            pipeline_store.insert_pipeline(
                conn, workspace_id=workspace_id, pipeline_id=pipeline_id, sha256=sha,
                definition=definition.canonical_dict(), created_by=actor,
            )
            templates.record(conn, workspace_id, pipeline_id, 1, resolution)
            sync_schedules(conn, workspace_id, pipeline_id, definition)
            pipeline_store.set_task_limit(conn, workspace_id, pipeline_id, definition.concurrency.max_active_tasks)
            return SavedPipeline(pipeline_id, 1, sha, created=True, changed=True)
        if current["sha256"] == sha:
            return SavedPipeline(pipeline_id, int(current["current_version"]), sha, created=False, changed=False)
        version = pipeline_store.set_current_version(conn, workspace_id, pipeline_id, int(current["current_version"]))
        assert version is not None  # the row is locked: nobody moved it
        pipeline_store.insert_version(
            conn, workspace_id=workspace_id, pipeline_id=pipeline_id, version=version, sha256=sha,
            definition=definition.canonical_dict(), created_by=actor,
        )
        templates.record(conn, workspace_id, pipeline_id, version, resolution)
        sync_schedules(conn, workspace_id, pipeline_id, definition)
        pipeline_store.set_task_limit(conn, workspace_id, pipeline_id, definition.concurrency.max_active_tasks)
        return SavedPipeline(pipeline_id, version, sha, created=False, changed=True)

    return db.run_in_transaction(work)


def get_pipeline(db: Database, workspace_id: str, pipeline_id: str) -> Row:
    with db.connection() as conn:
        row = pipeline_store.get_current(conn, workspace_id, pipeline_id)
        if row is None:
            raise NotFound(f"pipeline '{pipeline_id}' not found")
        row.update(pipeline_store.run_stats(conn, workspace_id, pipeline_id))
        return row


def list_pipelines(db: Database, workspace_id: str, *, limit: int, after_id: str | None) -> list[Row]:
    with db.connection() as conn:
        return pipeline_store.list_with_stats(conn, workspace_id, limit=limit, after_id=after_id)


def set_paused(db: Database, workspace_id: str, pipeline_id: str, paused: bool) -> Row:
    with db.transaction() as conn:
        row = schedule_store.set_pipeline_paused(conn, workspace_id, pipeline_id, paused)
    if row is None:
        raise NotFound(f"pipeline '{pipeline_id}' not found")
    return row
