"""Templates through the engine: versions, resolution into pipeline versions, refusal of a
missing template, usage listing, and immutability of pipeline versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine import templates
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

ROOT = Path(__file__).resolve().parents[2]
GREET: dict[str, Any] = {
    "id": "greet", "description": "say hello", "task": "echo",
    "params": {"greeting": "hello", "name": "world"},
    "retry": {"max_attempts": 3, "backoff": "fixed", "base_delay_s": 1},
    "timeout_s": 120, "heartbeat_s": 30,
}


def create(engine: Engine, body: dict[str, Any]) -> templates.SavedTemplate:
    return templates.create_template(engine.db, WORKSPACE, body, actor="test")


def update(engine: Engine, body: dict[str, Any]) -> templates.SavedTemplate:
    return templates.update_template(engine.db, WORKSPACE, body["id"], body, actor="test")


def task_rows(engine: Engine, pipeline_id: str) -> dict[str, dict[str, Any]]:
    """The tasks of a fresh run, by node, with the columns a worker and the retry logic read."""
    run = engine.trigger_run(WORKSPACE, pipeline_id, dispatch_now=False)
    _, tasks = engine.get_run(WORKSPACE, run.id)
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT node_id, task_name, params, max_attempts, retry, timeout_s, heartbeat_s
               FROM tasks WHERE workspace_id = %s AND run_id = %s""",
            (WORKSPACE, run.id),
        ).fetchall()
    assert {t["node_id"] for t in tasks} == {r["node_id"] for r in rows}
    return {r["node_id"]: r for r in rows}


def test_create_version_and_unchanged_update(engine: Engine) -> None:
    saved = create(engine, GREET)
    assert (saved.version, saved.created, saved.changed) == (1, True, True)

    same = update(engine, {**GREET, "params": {"name": "world", "greeting": "hello"}})  # key order only
    assert (same.version, same.changed, same.sha256) == (1, False, saved.sha256)

    changed = update(engine, {**GREET, "params": {"greeting": "hi"}})
    assert (changed.version, changed.changed) == (2, True)
    row = templates.get_template(engine.db, WORKSPACE, "greet")
    assert row["version"] == 2 and row["body"]["params"] == {"greeting": "hi"} and row["task"] == "echo"

    with pytest.raises(Conflict):
        create(engine, GREET)
    with pytest.raises(NotFound):
        templates.update_template(engine.db, WORKSPACE, "nope", {**GREET, "id": "nope"}, actor=None)
    with pytest.raises(InvalidInput) as mismatch:
        templates.update_template(engine.db, WORKSPACE, "other", GREET, actor=None)
    assert mismatch.value.details == [{"path": "id", "message": "expected 'other'"}]


def test_invalid_template_bodies_are_refused_with_paths(engine: Engine) -> None:
    with pytest.raises(InvalidInput) as bad:
        create(engine, {"id": "Bad Id", "task": "has space", "retry": {"max_attempts": 0}, "nodes": []})
    paths = {d["path"] for d in bad.value.details}
    assert {"id", "task", "retry.max_attempts", "nodes"} <= paths
    with pytest.raises(InvalidInput):
        create(engine, {"id": "no-task"})
    assert templates.list_templates(engine.db, WORKSPACE, limit=10, after_id=None) == []


def test_pipeline_node_resolves_template_with_overrides(engine: Engine) -> None:
    create(engine, GREET)
    pipeline = {
        "id": "hello",
        "params": {"run": "p"},
        "nodes": [
            {"id": "plain", "template": "greet"},
            {"id": "custom", "template": "greet", "depends": ["plain"], "params": {"name": "Ada"},
             "retry": {"max_attempts": 5}, "timeout_s": 10},
            {"id": "raw", "task": "sleep", "depends": ["custom"]},
        ],
    }
    saved = engine.create_pipeline(WORKSPACE, pipeline)

    tasks = task_rows(engine, "hello")
    plain, custom, raw = tasks["plain"], tasks["custom"], tasks["raw"]
    assert plain["task_name"] == custom["task_name"] == "echo"
    assert plain["params"] == {"run": "p", "greeting": "hello", "name": "world"}
    assert (plain["max_attempts"], plain["timeout_s"], plain["heartbeat_s"]) == (3, 120, 30)
    assert plain["retry"]["backoff"] == "fixed"
    # Overrides: params merged over the template's, retry and timeout replaced, heartbeat kept.
    assert custom["params"] == {"run": "p", "greeting": "hello", "name": "Ada"}
    assert (custom["max_attempts"], custom["timeout_s"], custom["heartbeat_s"]) == (5, 10, 30)
    assert raw["task_name"] == "sleep" and raw["max_attempts"] == 1

    # The stored definition is executable; the source keeps what was written and the refs.
    stored = engine.get_pipeline(WORKSPACE, "hello")["definition"]
    assert [n["template"] for n in stored["nodes"]] == [None, None, None]
    assert stored["nodes"][1]["task"] == "echo"
    resolution = templates.pipeline_templates(engine.db, WORKSPACE, "hello")
    assert resolution["templates"] == {"plain": {"template": "greet", "version": 1},
                                       "custom": {"template": "greet", "version": 1}}
    assert resolution["source_definition"]["nodes"][1]["template"] == "greet"
    assert resolution["source_definition"]["nodes"][1]["task"] is None

    # Putting the same text back is a no-op; so is putting back the stored source, whose
    # defaults are spelled out (they must not count as overrides of the template).
    assert engine.update_pipeline(WORKSPACE, "hello", pipeline).changed is False
    again = engine.update_pipeline(WORKSPACE, "hello", resolution["source_definition"])
    assert (again.version, again.changed, again.sha256) == (saved.version, False, saved.sha256)


def test_steps_shorthand_and_plain_pipelines_are_unaffected(engine: Engine) -> None:
    create(engine, GREET)
    engine.create_pipeline(WORKSPACE, {"id": "seq", "steps": [{"id": "a", "template": "greet"}, "sleep"]})
    tasks = task_rows(engine, "seq")
    assert tasks["a"]["task_name"] == "echo" and tasks["sleep"]["task_name"] == "sleep"

    plain = {"id": "plain", "nodes": [{"id": "a", "task": "echo"}]}
    saved = engine.create_pipeline(WORKSPACE, plain)
    # No template: the sha is the definition's own, exactly as before templates existed.
    from orchestrator.graph import validate_pipeline

    assert saved.sha256 == validate_pipeline(plain).sha256()
    assert templates.pipeline_templates(engine.db, WORKSPACE, "plain") == {
        "version": 1, "source_definition": None, "templates": {}
    }


def test_missing_templates_are_refused_with_their_ids_and_nothing_is_stored(engine: Engine) -> None:
    create(engine, GREET)
    pipeline = {"id": "broken", "nodes": [
        {"id": "a", "template": "greet"},
        {"id": "b", "template": "nope", "depends": ["a"]},
        {"id": "c", "template": "also-missing", "depends": ["a"]},
    ]}
    with pytest.raises(InvalidInput) as refused:
        engine.create_pipeline(WORKSPACE, pipeline)
    assert refused.value.details == [
        {"path": "nodes[1].template", "message": "template 'nope' does not exist"},
        {"path": "nodes[2].template", "message": "template 'also-missing' does not exist"},
    ]
    assert "nope" in refused.value.message and "also-missing" in refused.value.message
    assert engine.list_pipelines(WORKSPACE) == []
    with pytest.raises(InvalidInput):
        engine.update_pipeline(WORKSPACE, "broken", pipeline, create_missing=True)
    assert engine.list_pipelines(WORKSPACE) == []

    # An update of an existing pipeline to a missing template leaves its version alone.
    engine.create_pipeline(WORKSPACE, {"id": "ok", "nodes": [{"id": "a", "template": "greet"}]})
    with pytest.raises(InvalidInput):
        engine.update_pipeline(WORKSPACE, "ok", {"id": "ok", "nodes": [{"id": "a", "template": "nope"}]})
    assert engine.get_pipeline(WORKSPACE, "ok")["version"] == 1


def test_templates_are_per_workspace(engine: Engine) -> None:
    engine.create_api_key("other", "admin", raw_key="other-admin-key")
    templates.create_template(engine.db, "other", GREET, actor=None)
    with pytest.raises(InvalidInput):
        engine.create_pipeline(WORKSPACE, {"id": "p", "nodes": [{"id": "a", "template": "greet"}]})
    with pytest.raises(NotFound):
        templates.get_template(engine.db, WORKSPACE, "greet")


def test_list_shows_which_pipelines_use_each_template(engine: Engine) -> None:
    create(engine, GREET)
    create(engine, {"id": "unused", "task": "sleep"})
    engine.create_pipeline(WORKSPACE, {"id": "p2", "nodes": [{"id": "a", "template": "greet"},
                                                             {"id": "b", "template": "greet"}]})
    engine.create_pipeline(WORKSPACE, {"id": "p1", "nodes": [{"id": "a", "template": "greet"}]})
    engine.create_pipeline(WORKSPACE, {"id": "p3", "nodes": [{"id": "a", "task": "echo"}]})

    listed = templates.list_templates(engine.db, WORKSPACE, limit=10, after_id=None)
    assert [(t["id"], t["version"], t["used_by"]) for t in listed] == [
        ("greet", 1, ["p1", "p2"]), ("unused", 1, []),
    ]
    assert templates.list_templates(engine.db, WORKSPACE, limit=1, after_id="greet")[0]["id"] == "unused"

    # Usage follows the current version: p1 moving off the template drops it from the list.
    engine.update_pipeline(WORKSPACE, "p1", {"id": "p1", "nodes": [{"id": "a", "task": "echo"}]})
    assert templates.get_template(engine.db, WORKSPACE, "greet")["used_by"] == ["p2"]


def test_template_update_does_not_change_existing_pipeline_versions(engine: Engine) -> None:
    create(engine, GREET)
    pipeline = {"id": "pinned", "nodes": [{"id": "a", "template": "greet"}]}
    first = engine.create_pipeline(WORKSPACE, pipeline)
    update(engine, {**GREET, "task": "sleep", "params": {"seconds": 1}})

    # The pipeline's current version still runs what it resolved when it was saved.
    assert engine.get_pipeline(WORKSPACE, "pinned")["version"] == 1
    before = task_rows(engine, "pinned")["a"]
    assert before["task_name"] == "echo" and before["params"]["greeting"] == "hello"

    # Its next PUT, even of the same text, picks the new template version up as a new version.
    second = engine.update_pipeline(WORKSPACE, "pinned", pipeline)
    assert (second.version, second.changed) == (2, True) and second.sha256 != first.sha256
    after = task_rows(engine, "pinned")["a"]
    assert after["task_name"] == "sleep" and after["params"] == {"seconds": 1}
    assert templates.pipeline_templates(engine.db, WORKSPACE, "pinned")["templates"] == {
        "a": {"template": "greet", "version": 2}
    }
    with engine.db.connection() as conn:
        v1 = conn.execute(
            """SELECT v.definition, r.template_version FROM pipeline_versions v
               JOIN pipeline_template_refs r USING (workspace_id, pipeline_id)
               WHERE v.workspace_id = %s AND v.pipeline_id = 'pinned' AND v.version = 1
                 AND r.pipeline_version = 1""",
            (WORKSPACE,),
        ).fetchone()
    assert v1 is not None and v1["template_version"] == 1 and v1["definition"]["nodes"][0]["task"] == "echo"
    assert engine.update_pipeline(WORKSPACE, "pinned", pipeline).changed is False


def test_example_templates_load_and_serve_a_pipeline(engine: Engine) -> None:
    loaded = templates.load_example_templates(engine, WORKSPACE, ROOT / "examples" / "templates")
    assert loaded == ["flaky-retry v1", "say-hello v1"]
    assert templates.load_example_templates(engine, WORKSPACE, ROOT / "examples" / "templates") == loaded
    engine.create_pipeline(WORKSPACE, {"id": "ex", "steps": [
        {"id": "hi", "template": "say-hello", "params": {"name": "Ada"}},
        {"id": "flaky", "template": "flaky-retry"},
    ]})
    tasks = task_rows(engine, "ex")
    assert tasks["hi"]["task_name"] == "echo" and tasks["hi"]["params"]["name"] == "Ada"
    assert tasks["flaky"]["task_name"] == "fail" and tasks["flaky"]["max_attempts"] == 3
