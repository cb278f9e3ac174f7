"""Events: record a posted event once, start a run of every pipeline it triggers; list events;
refuse pipeline definitions that would make events start each other in a cycle.

See docs/events.md for the contract.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.runs import create_run
from orchestrator.graph import event_cycle_message, event_trigger_cycle
from orchestrator.model import PipelineDefinition
from orchestrator.model.pipeline import EVENT_NAME_RULE, is_event_name
from orchestrator.store import events as event_store

# Same bound as an Idempotency-Key header: the event id plays that role.
MAX_EVENT_ID_LENGTH = 255


@dataclass(frozen=True)
class RecordedEvent:
    id: str
    name: str
    created: bool  # False: the id was recorded before; `run_ids` are the runs it started then
    run_ids: list[uuid.UUID]


def record_event(
    db: Database,
    settings: Settings,
    workspace_id: str,
    name: str,
    event_id: str,
    payload: dict[str, Any],
    actor: str | None,
) -> RecordedEvent:
    """Record the event and start its runs in one transaction, or find it recorded before.

    The events primary key decides between duplicates, including two posts racing: the loser's
    insert waits for the winner's transaction and then does nothing, and it answers with the
    winner's runs. The runs are created but not dispatched; the caller dispatches them after
    commit (a run must be visible before a worker can call back about it).
    """
    _check_event(name, event_id, payload)

    def work(conn: Connection) -> RecordedEvent:
        if not event_store.insert_event(
            conn, workspace_id=workspace_id, event_id=event_id, name=name, payload=payload, received_by=actor
        ):
            return _earlier(conn, workspace_id, name, event_id, payload)
        params = {"event": {"name": name, "id": event_id, "payload": payload}}
        run_ids: list[uuid.UUID] = []
        # Pipeline id order: create_run may lock pipeline rows (concurrency limits), and a fixed
        # order keeps two events that start the same pipelines from deadlocking each other.
        for current in event_store.pipelines_triggered_by(conn, workspace_id, name):
            if current["paused"]:
                continue  # a paused pipeline starts nothing, as for its schedules
            definition = PipelineDefinition.model_validate(current["definition"])
            if not definition.matches_event(name, payload):
                continue
            run_id = create_run(
                conn,
                settings,
                workspace_id,
                current,
                versions=None,
                params=params,
                trigger="event",
                triggered_by=actor,
            )
            # No idempotency key and no schedule slot were given, so nothing can refuse the run.
            assert run_id is not None
            event_store.set_run_event(conn, workspace_id, run_id, event_id)
            run_ids.append(run_id)
        return RecordedEvent(event_id, name, created=True, run_ids=run_ids)

    return db.run_in_transaction(work)


def _check_event(name: str, event_id: str, payload: Any) -> None:
    problems: list[dict[str, str]] = []
    if not is_event_name(name):
        problems.append({"path": "name", "message": f"{name!r} is not a valid event name: {EVENT_NAME_RULE}"})
    if not 1 <= len(event_id) <= MAX_EVENT_ID_LENGTH:
        problems.append(
            {"path": "id", "message": f"the event id must be 1 to {MAX_EVENT_ID_LENGTH} characters"}
        )
    if not isinstance(payload, dict):
        problems.append({"path": "payload", "message": "the payload must be a JSON object"})
    if problems:
        raise InvalidInput(
            "the event is invalid: " + "; ".join(f"{p['path']}: {p['message']}" for p in problems),
            details=problems,
        )


def _earlier(
    conn: Connection, workspace_id: str, name: str, event_id: str, payload: dict[str, Any]
) -> RecordedEvent:
    """The answer to an event id that is already recorded (by this or a concurrent post)."""
    # Read committed: this statement's snapshot is taken after the insert waited for the
    # transaction that recorded the id, so that transaction's event and runs are visible.
    earlier = event_store.get_event(conn, workspace_id, event_id)
    if earlier is None:
        # The insert conflicted, so the row existed; it cannot vanish (events are not deleted).
        raise Conflict(f"event '{event_id}' could not be read back; retry")
    if earlier["name"] != name or earlier["payload"] != payload:
        # Reusing an idempotency key for a different request is a client bug; answering with
        # the first event's runs would hide it.
        raise Conflict(
            f"event id '{event_id}' was already used for a different event (name '{earlier['name']}'); "
            "use a new id for a new event",
            details={"id": event_id, "name": earlier["name"], "received_at": earlier["received_at"]},
        )
    runs = event_store.runs_of_event(conn, workspace_id, event_id)
    return RecordedEvent(event_id, name, created=False, run_ids=[r["id"] for r in runs])


def list_events(
    db: Database,
    workspace_id: str,
    *,
    name: str | None = None,
    limit: int = 50,
    before: tuple[datetime, str] | None = None,
) -> list[Row]:
    """Events newest first, each with `runs`: [{id (UUID), pipeline_id, status}]."""
    with db.connection() as conn:
        rows = event_store.list_events(conn, workspace_id, name=name, limit=limit, before=before)
    for row in rows:
        # jsonb_agg hands run ids back as strings; elsewhere the engine's run ids are UUIDs.
        row["runs"] = [{**run, "id": uuid.UUID(run["id"])} for run in row["runs"]]
    return rows


def get_event(db: Database, workspace_id: str, event_id: str) -> Row:
    """One event with `runs`: [{id, pipeline_id, status}], as in `list_events`."""
    with db.connection() as conn:
        event = event_store.get_event(conn, workspace_id, event_id)
        if event is None:
            raise NotFound(f"event '{event_id}' not found")
        event["runs"] = event_store.runs_of_event(conn, workspace_id, event_id)
    return event


def check_trigger_cycles(conn: Connection, workspace_id: str, candidate: PipelineDefinition) -> None:
    """Refuse `candidate` (about to be saved) if, with the workspace's other current
    definitions, pipelines would start each other through events in a cycle.

    Call it inside the transaction that saves the candidate: it takes the workspace's
    event-graph lock, so two registrations that only form a cycle together cannot both pass.
    """
    if not candidate.triggers and not candidate.emits:
        return  # without triggers or emits the candidate has no edge, so it closes no cycle
    event_store.lock_event_graph(conn, workspace_id)
    definitions: dict[str, PipelineDefinition] = {
        str(row["id"]): PipelineDefinition.model_validate(row["definition"])
        for row in event_store.event_graph_definitions(conn, workspace_id)
    }
    definitions[candidate.id] = candidate
    cycle = event_trigger_cycle(definitions)
    if cycle is None:
        return
    message = event_cycle_message(cycle, definitions)
    path = "emits" if candidate.emits else "triggers"
    raise InvalidInput(
        f"the pipeline definition is invalid: {path}: {message}",
        details=[{"path": path, "message": message, "cycle": cycle}],
    )
