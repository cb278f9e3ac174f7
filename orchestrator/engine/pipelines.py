"""Pipeline definitions: validate, store each accepted change as a new immutable version."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine import templates
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound, TooLarge
from orchestrator.engine.events import check_trigger_cycles
from orchestrator.engine.operations import cancel_run_in
from orchestrator.engine.scheduling import sync_schedules
from orchestrator.graph import (
    DefinitionError,
    DefinitionInvalid,
    LinkSummary,
    PipelineLinks,
    end_at_problem,
    pipeline_level_errors,
    validate_pipeline,
)
from orchestrator.logs import log_event
from orchestrator.model import PipelineDefinition
from orchestrator.model.pipeline import PipelineDependency
from orchestrator.store import orchestrations as orchestration_store
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import schedules as schedule_store

log = logging.getLogger(__name__)


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
        # Only lists are counted: any other type is the model's to refuse (with its path).
        count = sum(len(v) for v in (raw.get("nodes"), raw.get("steps")) if isinstance(v, list))
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
        check_pipeline_graph(conn, workspace_id, definition)
        _refuse_ended_schedule(conn, definition)
        # A deleted pipeline's id is free: it is created anew, at its next version number.
        version = pipeline_store.insert_pipeline(
            conn, workspace_id=workspace_id, pipeline_id=definition.id, sha256=sha,
            definition=definition.canonical_dict(), created_by=actor,
        )
        if version is None:
            raise Conflict(
                f"pipeline '{definition.id}' already exists; use PUT /api/pipelines/{definition.id} to change it",
                details={"pipeline": definition.id},
            )
        templates.record(conn, workspace_id, definition.id, version, resolution)
        sync_schedules(conn, workspace_id, definition.id, definition)
        pipeline_store.set_task_limit(conn, workspace_id, definition.id, definition.concurrency.max_active_tasks)
        _sync_graph(conn, workspace_id, definition)
        return SavedPipeline(definition.id, version, sha, created=True, changed=True)

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
            check_pipeline_graph(conn, workspace_id, definition)
        if current is None:
            if not create_missing:
                raise NotFound(f"pipeline '{pipeline_id}' not found")
            _refuse_ended_schedule(conn, definition)
            version = pipeline_store.insert_pipeline(
                conn, workspace_id=workspace_id, pipeline_id=pipeline_id, sha256=sha,
                definition=definition.canonical_dict(), created_by=actor,
            )
            if version is None:  # created by a concurrent request since lock_current looked
                raise Conflict(f"pipeline '{pipeline_id}' was created meanwhile; send the request again")
            templates.record(conn, workspace_id, pipeline_id, version, resolution)
            sync_schedules(conn, workspace_id, pipeline_id, definition)
            pipeline_store.set_task_limit(conn, workspace_id, pipeline_id, definition.concurrency.max_active_tasks)
            _sync_graph(conn, workspace_id, definition)
            return SavedPipeline(pipeline_id, version, sha, created=True, changed=True)
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
        _sync_graph(conn, workspace_id, definition)
        return SavedPipeline(pipeline_id, version, sha, created=False, changed=True)

    return db.run_in_transaction(work)


def _refuse_ended_schedule(conn: Connection, definition: PipelineDefinition) -> None:
    """A new pipeline whose end_at is already past would never fire: refused (database time).
    An existing pipeline whose schedule has ended may still be updated, so only creation checks."""
    problem = end_at_problem(definition, schedule_store.db_now(conn))
    if problem is not None:
        raise InvalidInput(f"the pipeline definition is invalid: {problem}", details=[problem.to_dict()])


def _sync_graph(conn: Connection, workspace_id: str, definition: PipelineDefinition) -> None:
    orchestration_store.sync_dependencies(
        conn, workspace_id, definition.id, [(d.pipeline, list(d.outputs), d.trigger) for d in definition.depends],
        sorted(definition.outputs),
    )


def _stored_links(conn: Connection, workspace_id: str) -> dict[str, PipelineLinks]:
    """Every current pipeline of the workspace as its `depends` and declared outputs."""
    pipelines, edges = orchestration_store.workspace_graph(conn, workspace_id)
    depends: dict[str, list[PipelineDependency]] = {}
    for edge in edges:
        depends.setdefault(str(edge["pipeline_id"]), []).append(
            PipelineDependency(pipeline=edge["upstream_pipeline_id"], outputs=list(edge["outputs"]),
                               trigger=edge["trigger"])
        )
    return {
        str(p["id"]): LinkSummary(depends=depends.get(str(p["id"]), []), outputs=frozenset(p["declared_outputs"]))
        for p in pipelines
    }


def _new_graph_errors(stored: dict[str, PipelineLinks], candidates: dict[str, PipelineLinks]) -> list[DefinitionError]:
    """Pipeline-level problems the candidates bring to the stored set (old ones are not theirs)."""
    before = set(pipeline_level_errors(stored)) if candidates.keys() & stored.keys() else set()
    merged = {**stored, **candidates}
    return [e for e in pipeline_level_errors(merged) if e not in before]


def check_pipeline_graph(conn: Connection, workspace_id: str, candidate: PipelineDefinition) -> None:
    """Refuse `candidate` when its `depends` name a missing pipeline or output, when it drops an
    output a dependant reads, or when it closes a pipeline cycle (named).

    Call it inside the saving transaction: it takes the workspace's pipeline-graph lock, so two
    registrations that only close a cycle together cannot both pass.
    """
    orchestration_store.lock_pipeline_graph(conn, workspace_id)
    errors = _new_graph_errors(_stored_links(conn, workspace_id), {candidate.id: candidate})
    if not errors:
        return
    details = []
    for error in errors:
        # Paths of the candidate's own depends are made relative to its definition.
        path = error.path.removeprefix(f"{candidate.id}.")
        details.append({"path": path, "message": error.message})
    raise InvalidInput(
        "the pipeline definition is invalid: " + "; ".join(f"{d['path']}: {d['message']}" for d in details),
        details=details,
    )


def validate_pipelines(db: Database, workspace_id: str, raws: list[Any]) -> dict[str, Any]:
    """A dry run of a set of definitions against the workspace: nothing is stored.

    Each definition is checked alone (model, node graph, templates), then the set with the
    workspace's stored pipelines (definitions in the set replace stored ones of the same id).
    """
    report: list[dict[str, Any]] = []
    valid: dict[str, PipelineDefinition] = {}
    with db.connection() as conn:
        for index, raw in enumerate(raws):
            entry: dict[str, Any] = {"index": index, "id": raw.get("id") if isinstance(raw, dict) else None}
            try:
                written = parse_definition(raw)
                definition = templates.resolve(conn, workspace_id, written).definition
                if definition.schedule_options.end_at is not None and (
                    pipeline_store.get_current(conn, workspace_id, definition.id) is None
                ):
                    _refuse_ended_schedule(conn, definition)  # a dry run of a create
            except (InvalidInput, TooLarge, NotFound) as exc:
                details = exc.details if isinstance(exc.details, list) else []
                entry.update(valid=False, errors=details or [{"path": "", "message": exc.message}])
                report.append(entry)
                continue
            if definition.id in valid:
                entry.update(valid=False, errors=[{"path": "id", "message": f"pipeline {definition.id!r} is in the set twice"}])
                report.append(entry)
                continue
            valid[definition.id] = definition
            entry.update(id=definition.id, valid=True, errors=[])
            report.append(entry)
        cross = _new_graph_errors(_stored_links(conn, workspace_id), dict(valid))
    for error in cross:
        owner = error.path.split(".", 1)[0]
        for entry in report:
            if entry["id"] == owner and entry["valid"] is not None:
                entry["valid"] = False
                entry["errors"].append({"path": error.path.removeprefix(f"{owner}."), "message": error.message})
    return {
        "valid": all(e["valid"] for e in report) and not cross,
        "pipelines": report,
        "errors": [e.to_dict() for e in cross],
    }


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


@dataclass(frozen=True)
class DeletedPipeline:
    id: str
    cancelled_runs: int


# A delete with cancel_runs cancels the active runs, then deletes under the pipeline's lock; a
# run triggered in between is cancelled by the next round. Past this many rounds runs are
# being started faster than they are cancelled, and the delete gives up (409).
_DELETE_ROUNDS = 5


def delete_pipeline(
    db: Database, workspace_id: str, pipeline_id: str, *, cancel_runs: bool, actor: str
) -> DeletedPipeline:
    """Delete a pipeline (softly: its runs, tasks, outputs and dead letters stay readable).

    Refused (409) while it has pending or running runs, unless `cancel_runs`: they are then
    cancelled first, each through the one cancel path (operations.cancel_run_in), in its own
    transaction. Refused (409) while other pipelines' `depends` name it: they would be left
    depending on a pipeline that is not there (delete them, or drop the dependency, first).
    The delete itself is one transaction under the pipeline row's lock: triggers hold that row
    (FOR KEY SHARE) until their run commits, so no run of the pipeline starts after the delete
    commits, and every run started before it is seen (and refused or cancelled) here."""
    def attempt(conn: Connection) -> DeletedPipeline | list[Row]:
        # The graph lock first, as a create takes it, then the row: a create or update that
        # would add a dependency on this pipeline either commits first (and is seen below) or
        # checks the graph after the delete.
        orchestration_store.lock_pipeline_graph(conn, workspace_id)
        if pipeline_store.lock_for_delete(conn, workspace_id, pipeline_id) is None:
            raise NotFound(f"pipeline '{pipeline_id}' not found")
        _refuse_dependants(conn, workspace_id, pipeline_id)
        active = pipeline_store.active_run_ids(conn, workspace_id, pipeline_id)
        if active:
            return active
        schedule_store.delete_for_pipeline(conn, workspace_id, pipeline_id)
        pipeline_store.delete_dependencies(conn, workspace_id, pipeline_id)
        pipeline_store.mark_deleted(conn, workspace_id, pipeline_id)
        return DeletedPipeline(pipeline_id, 0)

    def cancel(run_id: Any) -> bool:
        def work(conn: Connection) -> bool:
            return cancel_run_in(conn, run_id, f"cancelled by {actor}: pipeline '{pipeline_id}' deleted",
                                 workspace_id=workspace_id, pipeline_id=pipeline_id)

        return db.run_in_transaction(work)

    cancelled = 0
    for _ in range(_DELETE_ROUNDS):
        outcome = db.run_in_transaction(attempt)
        if isinstance(outcome, DeletedPipeline):
            log_event(log, "pipeline.deleted", workspace_id=workspace_id, pipeline_id=pipeline_id, actor=actor,
                      cancelled_runs=cancelled)
            return DeletedPipeline(pipeline_id, cancelled)
        if not cancel_runs:
            ids = [str(r["id"]) for r in outcome]
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            raise Conflict(
                f"pipeline '{pipeline_id}' has {len(ids)} active run(s) (pending or running): {shown}; "
                "cancel them first, or delete with ?cancel_runs=true to cancel them",
                details={"pipeline": pipeline_id, "active_runs": ids},
            )
        for row in outcome:
            if cancel(row["id"]):
                cancelled += 1
    raise Conflict(
        f"pipeline '{pipeline_id}' keeps starting runs while they are cancelled; pause it, then delete it again",
        details={"pipeline": pipeline_id, "cancelled_runs": cancelled},
    )


def _refuse_dependants(conn: Connection, workspace_id: str, pipeline_id: str) -> None:
    names = pipeline_store.dependants(conn, workspace_id, pipeline_id)
    if names:
        listed = ", ".join(f"'{n}'" for n in names)
        raise Conflict(
            f"pipeline '{pipeline_id}' is named in the depends of {listed}; delete those pipelines or "
            "remove the dependency from them first",
            details={"pipeline": pipeline_id, "dependants": names},
        )


def set_paused(db: Database, workspace_id: str, pipeline_id: str, paused: bool) -> Row:
    with db.transaction() as conn:
        row = schedule_store.set_pipeline_paused(conn, workspace_id, pipeline_id, paused)
    if row is None:
        raise NotFound(f"pipeline '{pipeline_id}' not found")
    return row
