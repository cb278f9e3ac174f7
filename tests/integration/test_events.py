"""Event triggers at the engine level: matching, idempotency (also under a race), listing, and
the registration-time cycle check."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from orchestrator.db.connection import Database
from orchestrator.engine import events
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.service import Engine
from orchestrator.model import PipelineDefinition

from .conftest import WORKSPACE
from .test_concurrency import _run_threads


def triggered(pid: str, *triggers: dict[str, Any], emits: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": pid,
        "triggers": list(triggers),
        "emits": emits or [],
        "nodes": [{"id": "a", "task": "echo"}],
    }


def post(
    engine: Engine, name: str, event_id: str, payload: dict[str, Any] | None = None
) -> events.RecordedEvent:
    return events.record_event(
        engine.db, engine.settings, WORKSPACE, name, event_id, payload or {}, actor="test"
    )


def pipelines_of(engine: Engine, run_ids: list[uuid.UUID]) -> list[str]:
    return sorted(str(engine.get_run(WORKSPACE, r)[0]["pipeline_id"]) for r in run_ids)


def test_an_event_starts_every_matching_pipeline_with_the_event_as_a_param(engine: Engine) -> None:
    engine.create_pipeline(
        WORKSPACE, triggered("ingest", {"event": "file.uploaded", "filter": {"bucket": "raw"}})
    )
    engine.create_pipeline(WORKSPACE, triggered("audit", {"event": "file.uploaded"}))
    engine.create_pipeline(
        WORKSPACE, triggered("clean", {"event": "file.uploaded", "filter": {"bucket": "clean"}})
    )
    engine.create_pipeline(WORKSPACE, triggered("other", {"event": "something.else"}))
    engine.create_pipeline(WORKSPACE, {"id": "plain", "nodes": [{"id": "a", "task": "echo"}]})

    payload = {"bucket": "raw", "key": "2024/a.csv"}
    recorded = post(engine, "file.uploaded", "evt-1", payload)
    assert recorded.created and recorded.id == "evt-1"
    assert pipelines_of(engine, recorded.run_ids) == ["audit", "ingest"]

    for run_id in recorded.run_ids:
        run, tasks = engine.get_run(WORKSPACE, run_id)
        assert run["trigger"] == "event" and run["triggered_by"] == "test"
        assert run["params"] == {"event": {"name": "file.uploaded", "id": "evt-1", "payload": payload}}
        task, _ = engine.get_task(WORKSPACE, tasks[0]["id"])
        assert task["params"]["event"]["payload"] == payload  # reaches the worker with the task
    with psycopg.connect(engine.settings.database_url) as conn:
        # One record: the runs point at the event row by the caller's id.
        rows = conn.execute(
            "SELECT r.event_id, e.id FROM runs r JOIN events e ON (e.workspace_id, e.id) = (r.workspace_id, r.event_id)"
        ).fetchall()
    assert rows == [("evt-1", "evt-1"), ("evt-1", "evt-1")]


def test_an_event_nothing_listens_to_is_recorded_without_runs(engine: Engine) -> None:
    engine.create_pipeline(
        WORKSPACE, triggered("ingest", {"event": "file.uploaded", "filter": {"bucket": "raw"}})
    )
    recorded = post(engine, "file.uploaded", "evt-2", {"bucket": "other"})
    assert recorded.created and recorded.run_ids == []
    assert [e["id"] for e in events.list_events(engine.db, WORKSPACE)] == ["evt-2"]


def test_a_paused_pipeline_is_not_started(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    engine.create_pipeline(WORKSPACE, triggered("held", {"event": "go"}))
    engine.set_paused(WORKSPACE, "held", True)
    assert pipelines_of(engine, post(engine, "go", "e1").run_ids) == ["ingest"]
    engine.set_paused(WORKSPACE, "held", False)
    assert pipelines_of(engine, post(engine, "go", "e2").run_ids) == ["held", "ingest"]


def test_the_current_version_decides(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    engine.update_pipeline(WORKSPACE, "ingest", triggered("ingest", {"event": "stop"}))
    assert post(engine, "go", "e1").run_ids == []
    run_ids = post(engine, "stop", "e2").run_ids
    assert [engine.get_run(WORKSPACE, r)[0]["pipeline_version"] for r in run_ids] == [2]


def test_the_same_event_id_is_recorded_once_and_answers_with_the_same_runs(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    first = post(engine, "go", "once", {"n": 1})
    again = post(engine, "go", "once", {"n": 1})
    assert first.created and not again.created
    assert again.run_ids == first.run_ids and len(first.run_ids) == 1
    assert len(engine.list_runs(WORKSPACE)) == 1


def test_reusing_an_event_id_for_a_different_event_is_a_conflict(engine: Engine) -> None:
    post(engine, "go", "once", {"n": 1})
    with pytest.raises(Conflict, match="already used for a different event"):
        post(engine, "go", "once", {"n": 2})
    with pytest.raises(Conflict):
        post(engine, "other", "once", {"n": 1})


@pytest.mark.parametrize(
    ("name", "event_id", "path"),
    [("Bad Name", "x", "name"), ("ok", "", "id"), ("ok", "x" * 256, "id")],
)
def test_invalid_events_are_refused(engine: Engine, name: str, event_id: str, path: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        post(engine, name, event_id)
    assert [d["path"] for d in exc.value.details] == [path]


def test_the_same_event_is_per_workspace(engine: Engine) -> None:
    engine.create_api_key("other-ws", "admin")
    engine.create_pipeline("other-ws", triggered("ingest", {"event": "go"}))
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    mine = post(engine, "go", "shared-id")
    theirs = events.record_event(engine.db, engine.settings, "other-ws", "go", "shared-id", {}, actor=None)
    assert mine.created and theirs.created and mine.run_ids != theirs.run_ids
    assert [e["id"] for e in events.list_events(engine.db, "other-ws")] == ["shared-id"]


def test_two_identical_events_racing_start_one_run_per_pipeline(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    engine.create_pipeline(WORKSPACE, triggered("audit", {"event": "go"}))
    racers = 6
    barrier = threading.Barrier(racers)
    results: list[events.RecordedEvent | None] = [None] * racers

    def send(index: int) -> None:
        db = Database(engine.settings.database_url, max_size=1)  # its own connection
        try:
            barrier.wait()
            results[index] = events.record_event(
                db, engine.settings, WORKSPACE, "go", "dup-1", {"k": "v"}, actor=f"racer-{index}"
            )
        finally:
            db.close()

    assert _run_threads(racers, send) == []
    answers = [r for r in results if r is not None]
    assert len(answers) == racers
    assert sum(1 for r in answers if r.created) == 1  # exactly one post recorded the event
    run_sets = {tuple(sorted(r.run_ids)) for r in answers}
    assert len(run_sets) == 1  # every racer answers with the winner's runs
    (run_ids,) = run_sets
    assert pipelines_of(engine, list(run_ids)) == ["audit", "ingest"]
    with psycopg.connect(engine.settings.database_url) as conn:
        event_rows = conn.execute("SELECT count(*) FROM events").fetchone()
        runs_by_pipeline: dict[str, int] = dict(
            conn.execute("SELECT pipeline_id, count(*) FROM runs GROUP BY 1").fetchall()
        )
    assert event_rows == (1,)
    assert runs_by_pipeline == {"audit": 1, "ingest": 1}


def test_events_are_listed_newest_first_with_their_runs(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    engine.create_pipeline(WORKSPACE, triggered("audit", {"event": "go", "filter": {"audit": True}}))
    first = post(engine, "go", "e1", {"audit": True})
    second = post(engine, "go", "e2")
    post(engine, "noise", "e3")

    listed = events.list_events(engine.db, WORKSPACE)
    assert [e["id"] for e in listed] == ["e3", "e2", "e1"]
    by_id = {e["id"]: e for e in listed}
    assert by_id["e1"]["name"] == "go" and by_id["e1"]["payload"] == {"audit": True}
    assert by_id["e1"]["received_by"] == "test" and by_id["e1"]["received_at"] is not None
    assert [(r["pipeline_id"], r["status"]) for r in by_id["e1"]["runs"]] == [
        ("audit", "running"),
        ("ingest", "running"),
    ]
    assert sorted(r["id"] for r in by_id["e1"]["runs"]) == sorted(first.run_ids)
    assert [r["id"] for r in by_id["e2"]["runs"]] == second.run_ids
    assert by_id["e3"]["runs"] == []

    assert [e["id"] for e in events.list_events(engine.db, WORKSPACE, name="go")] == ["e2", "e1"]
    page = events.list_events(engine.db, WORKSPACE, limit=2)
    assert [e["id"] for e in page] == ["e3", "e2"]
    last = page[-1]
    rest = events.list_events(engine.db, WORKSPACE, limit=2, before=(last["received_at"], last["id"]))
    assert [e["id"] for e in rest] == ["e1"]


# --- cycles at registration --------------------------------------------------------------------


def check(engine: Engine, raw: dict[str, Any]) -> None:
    with engine.db.transaction() as conn:
        events.check_trigger_cycles(conn, WORKSPACE, PipelineDefinition.model_validate(raw))


def test_a_definition_closing_an_event_cycle_is_refused_naming_the_cycle(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("a", {"event": "b.done"}, emits=["a.done"]))
    engine.create_pipeline(WORKSPACE, {"id": "plain", "nodes": [{"id": "a", "task": "echo"}]})
    check(engine, triggered("b", {"event": "other"}, emits=["b.done"]))  # no cycle: fine

    with pytest.raises(InvalidInput) as exc:
        check(engine, triggered("b", {"event": "a.done"}, emits=["b.done"]))
    assert "event trigger cycle: a -> b -> a" in exc.value.message
    assert exc.value.details[0]["cycle"] == ["a", "b", "a"]
    assert exc.value.details[0]["path"] == "emits"


def test_the_candidate_replaces_its_stored_version_in_the_cycle_check(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("a", {"event": "b.done"}, emits=["a.done"]))
    engine.create_pipeline(WORKSPACE, triggered("b", {"event": "a.done"}))
    # b starting to emit b.done would close a -> b -> a ...
    with pytest.raises(InvalidInput, match=r"a -> b -> a"):
        check(engine, triggered("b", {"event": "a.done"}, emits=["b.done"]))
    # ... while a no longer listening to b.done breaks it.
    check(engine, triggered("a", {"event": "manual"}, emits=["a.done"]))


def test_a_pipeline_triggering_itself_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match=r"event trigger cycle: loop -> loop"):
        check(engine, triggered("loop", {"event": "again"}, emits=["again"]))


def test_definitions_without_events_are_not_checked(engine: Engine) -> None:
    check(engine, {"id": "plain", "nodes": [{"id": "a", "task": "echo"}]})


def test_get_event_shows_its_runs(engine: Engine) -> None:
    engine.create_pipeline(WORKSPACE, triggered("ingest", {"event": "go"}))
    recorded = post(engine, "go", "e1", {"a": 1})
    event = events.get_event(engine.db, WORKSPACE, "e1")
    assert (event["id"], event["name"], event["payload"]) == ("e1", "go", {"a": 1})
    assert [(r["id"], r["pipeline_id"], r["status"]) for r in event["runs"]] == [
        (recorded.run_ids[0], "ingest", "running")
    ]
    with pytest.raises(NotFound):
        events.get_event(engine.db, WORKSPACE, "nope")
