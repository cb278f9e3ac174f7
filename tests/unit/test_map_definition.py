"""`map:` on a node (issue 19, dynamic fan-out): the model, its graph checks, its canonical form."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.engine.templates import TemplateDefinition, _apply
from orchestrator.graph import DefinitionInvalid, node_errors, parse_definition_text, validate_pipeline
from orchestrator.model import PipelineDefinition
from orchestrator.model.pipeline import MAX_MAP_WIDTH, MapSpec, split_map_over

ISSUE_EXAMPLE = """
id: files
nodes:
  - id: list
    task: list-files                 # returns {"files": ["a.csv", "b.csv", ...]}
  - id: parse
    task: parse-file
    depends: [list]
    map: {over: list.files, max_concurrency: 50, tolerated_failures: 0}
  - id: load
    task: load-all
    depends: [parse]                 # runs once, after every item; its input is the list
"""


def errors_of(raw: Any) -> list[tuple[str, str]]:
    with pytest.raises(DefinitionInvalid) as exc:
        validate_pipeline(raw)
    return [(e.path, e.message) for e in exc.value.errors]


def task(node_id: str, *depends: str, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "task": "t", "depends": list(depends), **extra}


def pipeline(*nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "p", "nodes": list(nodes), **extra}


def spec_error(**fields: Any) -> str:
    """The one message MapSpec gives for `fields`."""
    with pytest.raises(ValidationError) as exc:
        MapSpec.model_validate({"over": "list.files", **fields})
    errors = exc.value.errors()
    assert len(errors) == 1, errors
    return str(errors[0]["msg"]).removeprefix("Value error, ")


# --- valid definitions -----------------------------------------------------------------------


def test_the_issue_example_parses() -> None:
    defn = validate_pipeline(parse_definition_text(ISSUE_EXAMPLE))
    parse = defn.node("parse")
    assert parse.map == MapSpec(over="list.files", max_concurrency=50, tolerated_failures=0)
    assert defn.node("list").map is None and defn.node("load").map is None
    assert parse.map.source() == ("list", ["files"])
    assert parse.map.source_node() == "list"
    assert parse.map.normalized() == {
        "over": "list.files", "source": "list", "path": ["files"], "max_concurrency": 50, "tolerated_failures": 0,
    }


def test_the_issue_example_as_json() -> None:
    raw = parse_definition_text(ISSUE_EXAMPLE)
    assert validate_pipeline(parse_definition_text(json.dumps(raw))) == validate_pipeline(raw)


@pytest.mark.parametrize(
    ("over", "source", "path"),
    [
        ("list", "list", []),  # the whole output is the list
        ("list.files", "list", ["files"]),
        ("list.pages.0.rows", "list", ["pages", "0", "rows"]),  # a digits-only segment indexes a list
        ("list.a b.c-d", "list", ["a b", "c-d"]),  # keys of an output are any string without a dot
        ("params.files", "params", ["files"]),
        ("params.batch.items.2", "params", ["batch", "items", "2"]),
    ],
)
def test_over_forms(over: str, source: str, path: list[str]) -> None:
    spec = MapSpec(over=over)
    assert spec.source() == (source, path) == split_map_over(over)
    assert spec.source_node() == (None if source == "params" else source)
    assert spec.normalized()["source"] == source and spec.normalized()["path"] == path
    validate_pipeline(pipeline(task("list"), task("parse", "list", map={"over": over})))


def test_defaults() -> None:
    spec = MapSpec(over="list.files")
    assert spec.max_concurrency is None and spec.tolerated_failures == 0
    assert spec.normalized() == {
        "over": "list.files", "source": "list", "path": ["files"], "max_concurrency": None, "tolerated_failures": 0,
    }


def test_over_params_needs_no_upstream_and_no_declared_param() -> None:
    # Params may come from the trigger, so a name the definition does not declare is fine.
    defn = validate_pipeline(pipeline(task("each", map={"over": "params.files"})))
    assert defn.node("each").map is not None and defn.node("each").map.source_node() is None


def test_map_with_the_steps_shorthand() -> None:
    raw = {
        "id": "p",
        "steps": [
            {"id": "list", "task": "list-files"},
            {"id": "parse", "task": "parse-file", "map": {"over": "list.files"}},
            "load-all",
        ],
    }
    defn = validate_pipeline(raw)
    assert defn.node("parse").depends == ["list"] and defn.node("parse").map is not None
    assert defn.node("load-all").depends == ["parse"]


def test_map_on_a_templated_node_survives_resolution() -> None:
    defn = validate_pipeline(
        pipeline(task("list"), {"id": "parse", "template": "parser", "depends": ["list"],
                                "map": {"over": "list.files", "tolerated_failures": "10%"}})
    )
    resolved = _apply(defn.node("parse"), TemplateDefinition(id="parser", task="parse-file"))
    assert resolved.task == "parse-file" and resolved.template is None
    assert resolved.map == MapSpec(over="list.files", tolerated_failures="10%")


def test_map_may_be_left_empty() -> None:
    # YAML `map:` with nothing after it is None: the same as no map.
    defn = validate_pipeline(parse_definition_text("id: p\nnodes:\n  - {id: a, task: t, map: }\n"))
    assert defn.node("a").map is None


def test_a_mapped_node_may_feed_a_reducer_and_outputs_may_come_from_the_reducer() -> None:
    validate_pipeline(
        pipeline(task("list"), task("parse", "list", map={"over": "list.files"}), task("load", "parse"),
                 outputs={"report": {"from": "load"}})
    )


# --- tolerated failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tolerated", "width", "expected"),
    [
        (0, 0, 0),
        (0, 25, 0),
        (3, 25, 3),
        (30, 25, 30),  # a count is taken as is, even beyond the width
        ("10%", 25, 2),  # 2.5 rounds down
        ("10%", 30, 3),
        ("100%", 7, 7),
        ("100.0%", 7, 7),
        ("0%", 100, 0),
        ("50%", 0, 0),
        ("2.5%", 40, 1),
        ("2.5%", 39, 0),
        ("29%", 100, 29),  # 0.29 * 100 is 28.999999999999996 in floating point
        ("33.333333%", 3, 0),
        ("33.333334%", 3, 1),
        ("0.000001%", MAX_MAP_WIDTH, 0),
        ("1%", MAX_MAP_WIDTH, 1000),
    ],
)
def test_tolerated(tolerated: int | str, width: int, expected: int) -> None:
    spec = MapSpec(over="list.files", tolerated_failures=tolerated)
    assert spec.tolerated(width) == expected
    assert spec.normalized()["tolerated_failures"] == tolerated  # kept as written


def test_tolerated_matches_the_floating_point_formula_with_its_epsilon() -> None:
    """The exact answer is the one `floor(p / 100 * width + 1e-9)` gives, for every percentage
    the model accepts (at most 6 decimals) and every width up to the limit."""
    percentages = ["0.1%", "1%", "2.5%", "7%", "10%", "12.345678%", "29%", "33.333333%", "57%", "99.999999%"]
    for text in percentages:
        spec = MapSpec(over="list.files", tolerated_failures=text)
        p = float(text[:-1])
        for width in [*range(0, 1001), 9_999, 10_000, 33_333, 99_999, MAX_MAP_WIDTH]:
            assert spec.tolerated(width) == int(p / 100 * width + 1e-9), (text, width)


def test_tolerated_refuses_a_negative_width() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        MapSpec(over="list.files").tolerated(-1)


RULE = "use a count such as 3 or a percentage such as '10%'"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, f"true is not a number of failures: {RULE}"),
        (False, f"false is not a number of failures: {RULE}"),
        (-1, f"-1 is negative: {RULE}"),
        ("abc", f"'abc' is not a count or a percentage: {RULE}"),
        ("101%", f"'101%' is more than 100%: {RULE}"),
        ("100.5%", f"'100.5%' is more than 100%: {RULE}"),
        ("-5%", f"'-5%' is not a count or a percentage: {RULE}"),
        ("10 %", f"'10 %' is not a count or a percentage: {RULE}"),
        ("%", f"'%' is not a count or a percentage: {RULE}"),
        ("1.1234567%", f"'1.1234567%' has more than 6 decimals: {RULE}"),
        ("3", "'3' is a string: write the count without quotes (3) or as a percentage ('3%')"),
        (2.5, f"2.5 is not a count or a percentage: {RULE}"),
        (None, f"None is not a count or a percentage: {RULE}"),
        ([1], f"[1] is not a count or a percentage: {RULE}"),
        (MAX_MAP_WIDTH + 1, f"{MAX_MAP_WIDTH + 1} is more than a map can have items ({MAX_MAP_WIDTH}); "
                            "use '100%' to tolerate every failure"),
    ],
)
def test_tolerated_failures_refusals(value: Any, message: str) -> None:
    assert spec_error(tolerated_failures=value) == message


# --- max_concurrency -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 50, MAX_MAP_WIDTH, None])
def test_max_concurrency_accepted(value: int | None) -> None:
    assert MapSpec(over="list.files", max_concurrency=value).max_concurrency == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "Input should be greater than or equal to 1"),
        (-3, "Input should be greater than or equal to 1"),
        (MAX_MAP_WIDTH + 1, f"Input should be less than or equal to {MAX_MAP_WIDTH}"),
        (True, "true is not a number of children: use a whole number >= 1"),
        ("many", "Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_max_concurrency_refusals(value: Any, message: str) -> None:
    assert spec_error(max_concurrency=value) == message


# --- the syntax of `over` --------------------------------------------------------------------

OVER_RULE = (
    "use <upstream node id>.<path into its output> (e.g. list.files, or just list when the whole output "
    "is the list) or params.<name>"
)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ("", f"map.over is empty: {OVER_RULE}"),
        ("list..files", f"'list..files' has an empty segment (a leading or trailing dot, or two dots in a row): {OVER_RULE}"),
        (".files", f"'.files' has an empty segment (a leading or trailing dot, or two dots in a row): {OVER_RULE}"),
        ("list.", f"'list.' has an empty segment (a leading or trailing dot, or two dots in a row): {OVER_RULE}"),
        ("params", "'params' names no param: use params.<name>, e.g. params.files"),
        ("List.files", "'List.files' does not start with a node id ('List': use 1 to 63 lowercase letters, digits, "
                       f"'-' or '_', starting with a letter or digit); {OVER_RULE}"),
    ],
)
def test_over_syntax_refusals(over: str, message: str) -> None:
    assert spec_error(over=over) == message


def test_over_must_be_a_string() -> None:
    assert spec_error(over=5) == "Input should be a valid string"


def test_refusals_are_located_in_a_definition() -> None:
    raw = pipeline(task("list"), task("parse", "list", map={"over": "list..x", "tolerated_failures": "x",
                                                            "max_concurrency": 0}))
    assert [path for path, _ in errors_of(raw)] == [
        "nodes[1].map.over", "nodes[1].map.max_concurrency", "nodes[1].map.tolerated_failures",
    ]


def test_unknown_map_fields_are_named() -> None:
    raw = pipeline(task("list"), task("parse", "list", map={"over": "list.files", "max_concurency": 5}))
    assert errors_of(raw) == [("nodes[1].map.max_concurency", "unknown field 'max_concurency' "
                                                              "(did you mean 'max_concurrency'?)")]
    raw = pipeline(task("list"), task("parse", "list", map={}))
    assert errors_of(raw) == [("nodes[1].map.over", "this field is required")]


# --- kinds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["approval", "manual"])
def test_map_only_on_task_nodes(kind: str) -> None:
    raw = pipeline(task("list"), {"id": "ok", "kind": kind, "depends": ["list"], "map": {"over": "list.files"}})
    assert errors_of(raw) == [
        ("nodes[1].map", f"a {kind} node cannot be mapped: map runs a task once per item, so it is only allowed "
                         "on task nodes"),
    ]


# --- graph checks ----------------------------------------------------------------------------


def test_over_must_name_an_upstream() -> None:
    raw = pipeline(task("list"), task("parse", "list", map={"over": "lst.files"}))
    assert errors_of(raw) == [
        ("nodes[1].map.over", "'lst' is not an upstream of 'parse'; map over one of: list (or add it to depends)"),
    ]


def test_over_a_node_that_exists_but_is_not_a_dependency() -> None:
    raw = pipeline(task("list"), task("other"), task("parse", "other", map={"over": "list.files"}))
    assert errors_of(raw) == [
        ("nodes[2].map.over", "'list' is not an upstream of 'parse'; map over one of: other (or add it to depends)"),
    ]


def test_over_without_any_usable_upstream() -> None:
    raw = pipeline(task("list"), task("parse", map={"over": "list.files"}))
    assert errors_of(raw) == [
        ("nodes[1].map.over", "'list' is not an upstream of 'parse'; add it to depends, or map over params.<name>"),
    ]


def test_only_usable_upstreams_are_suggested() -> None:
    raw = pipeline(
        task("list"),
        {"id": "ok", "kind": "approval", "depends": ["list"]},
        task("each", "list", map={"over": "list.files"}),
        task("parse", "list", "ok", "each", map={"over": "nope"}),
    )
    assert errors_of(raw) == [
        ("nodes[3].map.over", "'nope' is not an upstream of 'parse'; map over one of: list (or add it to depends)"),
    ]


def test_over_itself() -> None:
    raw = pipeline(task("parse", map={"over": "parse.files"}))
    assert errors_of(raw) == [
        ("nodes[0].map.over", "'parse' is not an upstream of 'parse'; add it to depends, or map over params.<name>"),
    ]


@pytest.mark.parametrize("kind", ["approval", "manual"])
def test_over_a_human_step(kind: str) -> None:
    raw = pipeline(task("list"), {"id": "ok", "kind": kind, "depends": ["list"]},
                   task("parse", "ok", map={"over": "ok.files"}))
    assert errors_of(raw) == [
        ("nodes[2].map.over", f"'ok' is a {kind} step: its output is a decision, not data; map over a task node's "
                              "output"),
    ]


def test_nested_maps_are_refused() -> None:
    raw = pipeline(
        task("list"),
        task("parse", "list", map={"over": "list.files"}),
        task("rows", "parse", map={"over": "parse.rows"}),
    )
    assert errors_of(raw) == [
        ("nodes[2].map.over", "nested maps are not supported: 'parse' is itself mapped; map over a node that reduces it"),
    ]


def test_a_map_over_a_reducer_of_a_map_is_fine() -> None:
    validate_pipeline(pipeline(
        task("list"),
        task("parse", "list", map={"over": "list.files"}),
        task("collect", "parse"),
        task("rows", "collect", map={"over": "collect.rows"}),
    ))


def test_an_output_cannot_come_from_a_mapped_node() -> None:
    raw = pipeline(task("list"), task("parse", "list", map={"over": "list.files"}),
                   outputs={"parsed": {"from": "parse"}})
    assert errors_of(raw) == [
        ("outputs.parsed.from", "output 'parsed' comes from 'parse', which is mapped: an output cannot come from a "
                                "mapped node; take it from a node that reduces its items"),
    ]


def test_a_node_called_params_cannot_be_mapped_over() -> None:
    raw = pipeline(task("params"), task("parse", "params", map={"over": "params.files"}))
    assert errors_of(raw) == [
        ("nodes[1].map.over", "'params.files' reads the params, not the output of node 'params'; rename that node "
                              "to map over its output"),
    ]


def test_a_missing_upstream_is_reported_once() -> None:
    # The depends entry already says `list` is not a node; the map adds nothing to that.
    raw = pipeline(task("parse", "list", map={"over": "list.files"}))
    assert errors_of(raw) == [
        ("nodes[0].depends[0]", "node 'parse' depends on 'list', which is not a node of this pipeline"),
    ]


def test_graph_errors_with_the_steps_shorthand_name_steps() -> None:
    raw = {"id": "p", "steps": [{"id": "list", "task": "t"},
                                {"id": "parse", "task": "t", "map": {"over": "lst.files"}}]}
    assert errors_of(raw) == [
        ("steps[1].map.over", "'lst' is not an upstream of 'parse'; map over one of: list (or add it to depends)"),
    ]
    raw = {"id": "p", "steps": [{"id": "list", "task": "t"}, {"id": "parse", "task": "t", "map": {"over": "a..b"}}]}
    assert [path for path, _ in errors_of(raw)] == ["steps[1].map.over"]


def test_all_map_problems_are_reported_at_once() -> None:
    raw = pipeline(
        task("list"),
        task("a", "list", map={"over": "lst"}),
        task("b", "a", map={"over": "a.x"}),
        outputs={"out": {"from": "b"}},
    )
    assert [path for path, _ in errors_of(raw)] == ["nodes[1].map.over", "nodes[2].map.over", "outputs.out.from"]


def test_node_errors_directly() -> None:
    defn = PipelineDefinition.model_validate(pipeline(task("list"), task("parse", map={"over": "list"})))
    assert [e.path for e in node_errors(defn)] == ["nodes[1].map.over"]


# --- canonical form --------------------------------------------------------------------------


def test_a_definition_without_map_hashes_as_before() -> None:
    """Definitions stored before maps existed keep their sha256: re-saving one unchanged must not
    make a new version just because nodes learned a `map` field."""
    defn = validate_pipeline(pipeline(task("a"), task("b", "a"), {"id": "ok", "kind": "approval", "depends": ["b"]},
                                      outputs={"r": {"from": "b"}}))
    dumped = defn.model_dump(mode="json", by_alias=True, exclude={"triggers", "emits", "name", "notify"})
    # No dump of a map-less node has the key, so none differs from what it was before.
    assert all("map" not in node for node in dumped["nodes"])
    assert all("map" not in node.model_dump() for node in defn.nodes)
    expected = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    assert all("map" not in node for node in defn.canonical_dict()["nodes"])
    assert defn.canonical_json() == expected
    assert defn.sha256() == hashlib.sha256(expected.encode()).hexdigest()
    # Spelling out `map: null` is the same definition.
    spelled = validate_pipeline(pipeline(task("a", map=None), task("b", "a"),
                                         {"id": "ok", "kind": "approval", "depends": ["b"], "map": None},
                                         outputs={"r": {"from": "b"}}))
    assert spelled.sha256() == defn.sha256()


def test_a_known_definition_keeps_its_sha256() -> None:
    # Pinned: the canonical JSON of this definition as the model gave it before nodes had
    # `map` (computed with that model). A change here means every stored definition would get
    # a new version on its next unchanged save.
    defn = PipelineDefinition.model_validate(pipeline(task("a"), task("b", "a")))
    assert defn.canonical_json() == (
        '{"concurrency":{"max_active_runs":null,"max_active_tasks":null},"depends":[],"description":"",'
        '"id":"p","nodes":[{"approval":null,"depends":[],"description":"","heartbeat_s":60,"id":"a",'
        '"kind":"task","on_failure":"stop","params":{},"priority":0,"retry":{"backoff":"exponential",'
        '"base_delay_s":5.0,"jitter":"none","max_attempts":1,"max_delay_s":300.0},"task":"t",'
        '"template":null,"timeout_s":null,"trigger_rule":"all_success"},{"approval":null,'
        '"depends":["a"],"description":"","heartbeat_s":60,"id":"b","kind":"task","on_failure":"stop",'
        '"params":{},"priority":0,"retry":{"backoff":"exponential","base_delay_s":5.0,"jitter":"none",'
        '"max_attempts":1,"max_delay_s":300.0},"task":"t","template":null,"timeout_s":null,'
        '"trigger_rule":"all_success"}],"outputs":{},"params":{},"schedule":[],"schedule_options":'
        '{"catchup":"none","end_at":null,"jitter_s":0,"max_catchup_runs":10,"overlap":"allow",'
        '"start_at":null,"timezone":"UTC"},"tags":[],"versions":["default"]}'
    )


def test_a_map_is_part_of_the_hash_and_round_trips() -> None:
    raw = parse_definition_text(ISSUE_EXAMPLE)
    mapped = validate_pipeline(raw)
    plain = copy.deepcopy(raw)
    del plain["nodes"][1]["map"]
    assert validate_pipeline(plain).sha256() != mapped.sha256()
    node = mapped.canonical_dict()["nodes"][1]
    assert node["map"] == {"over": "list.files", "max_concurrency": 50, "tolerated_failures": 0}
    assert PipelineDefinition.model_validate(mapped.canonical_dict()) == mapped
    changed = copy.deepcopy(raw)
    changed["nodes"][1]["map"]["tolerated_failures"] = "10%"
    again = validate_pipeline(changed)
    assert again.sha256() != mapped.sha256()
    assert PipelineDefinition.model_validate(again.canonical_dict()) == again
    assert again.node("parse").map is not None and again.node("parse").map.tolerated_failures == "10%"
