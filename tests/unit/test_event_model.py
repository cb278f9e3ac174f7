"""Event triggers in definitions: the fields, payload matching, the hash, and the cycle finder."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from orchestrator.graph import DefinitionInvalid, event_cycle_message, event_trigger_cycle, validate_pipeline
from orchestrator.model import PipelineDefinition
from orchestrator.model.pipeline import EventTrigger

NODES: list[dict[str, Any]] = [{"id": "a", "task": "echo"}]


def pipeline(
    pid: str, *, triggers: list[Any] | None = None, emits: list[str] | str | None = None
) -> PipelineDefinition:
    raw: dict[str, Any] = {"id": pid, "nodes": NODES}
    if triggers is not None:
        raw["triggers"] = triggers
    if emits is not None:
        raw["emits"] = emits
    return PipelineDefinition.model_validate(raw)


# --- fields ---------------------------------------------------------------------------------


def test_triggers_and_emits_default_to_empty() -> None:
    defn = pipeline("p")
    assert defn.triggers == [] and defn.emits == []


def test_triggers_and_emits_are_parsed() -> None:
    defn = pipeline(
        "p",
        triggers=[{"event": "file.uploaded", "filter": {"bucket": "raw"}}, {"event": "tick"}],
        emits="done",
    )
    assert defn.triggers == [
        EventTrigger(event="file.uploaded", filter={"bucket": "raw"}),
        EventTrigger(event="tick", filter={}),
    ]
    assert defn.emits == ["done"]  # a single name is a list of one, like schedule and tags


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"triggers": [{"event": "Bad Name"}]}, "triggers[0].event"),
        ({"triggers": [{"event": ""}]}, "triggers[0].event"),
        ({"triggers": [{"filter": {"a": 1}}]}, "triggers[0].event"),
        ({"triggers": [{"event": "x", "when": {}}]}, "triggers[0].when"),
        ({"emits": ["ok", "UPPER"]}, "emits[1]"),
        ({"emits": ["ok", "ok"]}, "emits"),
    ],
)
def test_bad_triggers_and_emits_are_refused_with_their_path(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(DefinitionInvalid) as exc:
        validate_pipeline({"id": "p", "nodes": NODES, **raw})
    assert [e.path for e in exc.value.errors] == [path]


def test_an_unknown_trigger_field_suggests_the_allowed_ones() -> None:
    with pytest.raises(DefinitionInvalid) as exc:
        validate_pipeline({"id": "p", "nodes": NODES, "triggers": [{"event": "x", "filtre": {}}]})
    assert "did you mean 'filter'" in exc.value.errors[0].message


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_", "payload", "expected"),
    [
        ({}, {}, True),
        ({}, {"anything": 1}, True),
        ({"bucket": "raw"}, {"bucket": "raw", "key": "a.csv"}, True),
        ({"bucket": "raw"}, {"bucket": "clean"}, False),
        ({"bucket": "raw"}, {}, False),  # a missing key never matches
        ({"bucket": "raw", "kind": "csv"}, {"bucket": "raw"}, False),  # every key must match
        ({"bucket": ["raw", "landing"]}, {"bucket": "landing"}, True),  # a list means one of
        ({"bucket": ["raw", "landing"]}, {"bucket": "clean"}, False),
        ({"n": 1}, {"n": 1.0}, True),  # JSON numbers compare by value
        ({"n": 1}, {"n": "1"}, False),
        ({"dry_run": True}, {"dry_run": 1}, False),  # true is not 1 in JSON
        ({"n": 1}, {"n": True}, False),
        ({"meta": {"a": 1}}, {"meta": {"a": 1}}, True),  # nested values compare whole
        ({"meta": {"a": 1}}, {"meta": {"a": 1, "b": 2}}, False),
        ({"v": None}, {"v": None}, True),
    ],
)
def test_filter_matching(filter_: dict[str, Any], payload: dict[str, Any], expected: bool) -> None:
    assert EventTrigger(event="e", filter=filter_).matches("e", payload) is expected


def test_a_trigger_matches_only_its_event_name() -> None:
    defn = pipeline("p", triggers=[{"event": "a"}, {"event": "b", "filter": {"x": 1}}])
    assert defn.matches_event("a", {})
    assert defn.matches_event("b", {"x": 1})
    assert not defn.matches_event("b", {"x": 2})
    assert not defn.matches_event("c", {})


# --- canonical form ---------------------------------------------------------------------------


def test_hash_of_a_definition_without_triggers_is_unchanged_by_the_new_fields() -> None:
    """Definitions stored before events existed must keep their sha256, or re-saving one
    would make a new version out of nothing."""
    defn = pipeline("p")
    before_fields = defn.model_dump(mode="json", by_alias=True, exclude={"triggers", "emits", "name", "notify"})
    expected = hashlib.sha256(
        json.dumps(before_fields, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert "triggers" not in defn.canonical_dict() and "emits" not in defn.canonical_dict()
    assert defn.sha256() == expected
    assert pipeline("p", triggers=[], emits=[]).sha256() == expected  # spelled-out defaults too


def test_triggers_and_emits_are_part_of_the_hash_and_round_trip() -> None:
    plain = pipeline("p")
    triggered = pipeline("p", triggers=[{"event": "x", "filter": {"k": [1, 2]}}], emits=["y"])
    assert triggered.sha256() != plain.sha256()
    assert PipelineDefinition.model_validate(triggered.canonical_dict()) == triggered


# --- cycles -------------------------------------------------------------------------------------


def defs(*items: PipelineDefinition) -> dict[str, PipelineDefinition]:
    return {d.id: d for d in items}


def test_no_cycle_in_a_chain() -> None:
    graph = defs(
        pipeline("a", emits=["x"]),
        pipeline("b", triggers=[{"event": "x"}], emits=["y"]),
        pipeline("c", triggers=[{"event": "y"}]),
    )
    assert event_trigger_cycle(graph) is None


def test_two_pipelines_starting_each_other_are_a_cycle_named_in_event_order() -> None:
    graph = defs(
        pipeline("b", triggers=[{"event": "x"}], emits=["y"]),
        pipeline("a", triggers=[{"event": "y"}], emits=["x"]),
    )
    cycle = event_trigger_cycle(graph)
    assert cycle == ["a", "b", "a"]
    assert event_cycle_message(cycle, graph) == (
        "event trigger cycle: a -> b -> a (a emits 'x' which triggers b; b emits 'y' which triggers a)"
    )


def test_a_three_pipeline_cycle_is_found_and_follows_the_events() -> None:
    graph = defs(
        pipeline("a", triggers=[{"event": "c.done"}], emits=["a.done"]),
        pipeline("b", triggers=[{"event": "a.done"}], emits=["b.done"]),
        pipeline("c", triggers=[{"event": "b.done"}], emits=["c.done"]),
        pipeline("d", triggers=[{"event": "a.done"}]),  # a branch off the cycle is not part of it
    )
    assert event_trigger_cycle(graph) == ["a", "b", "c", "a"]


def test_a_pipeline_triggered_by_its_own_event_is_a_cycle_of_one() -> None:
    graph = defs(pipeline("loop", triggers=[{"event": "again", "filter": {"n": 1}}], emits=["again"]))
    assert event_trigger_cycle(graph) == ["loop", "loop"]


def test_filters_do_not_break_a_cycle() -> None:
    # Whether a payload will match is unknowable at registration: a trigger that could fire counts.
    graph = defs(
        pipeline("a", triggers=[{"event": "y", "filter": {"stage": "never"}}], emits=["x"]),
        pipeline("b", triggers=[{"event": "x"}], emits=["y"]),
    )
    assert event_trigger_cycle(graph) == ["a", "b", "a"]


def test_emitting_an_event_nobody_listens_to_is_no_edge() -> None:
    graph = defs(pipeline("a", triggers=[{"event": "x"}], emits=["unheard"]), pipeline("b", emits=["x"]))
    assert event_trigger_cycle(graph) is None
