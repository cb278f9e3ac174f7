"""Definition parsing, located validation errors, and the DAG algorithms."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.graph import (
    DefinitionError,
    DefinitionInvalid,
    find_cycle,
    format_path,
    node_errors,
    parse_definition_text,
    pipeline_level_errors,
    topological_order,
    validate_pipeline,
)
from orchestrator.model import PipelineDefinition


def errors_of(raw: Any) -> list[tuple[str, str]]:
    with pytest.raises(DefinitionInvalid) as exc:
        validate_pipeline(raw)
    return [(e.path, e.message) for e in exc.value.errors]


def pipeline(nodes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "p", "nodes": nodes, **extra}


def node(node_id: str, *depends: str) -> dict[str, Any]:
    return {"id": node_id, "task": "t", "depends": list(depends)}


# --- error values --------------------------------------------------------------------------


def test_definition_error_and_invalid() -> None:
    error = DefinitionError("nodes[0].id", "bad")
    assert error.to_dict() == {"path": "nodes[0].id", "message": "bad"}
    invalid = DefinitionInvalid([error, DefinitionError("", "whole thing")])
    assert isinstance(invalid, ValueError)
    assert str(invalid) == "nodes[0].id: bad; whole thing"
    assert invalid.to_list() == [error.to_dict(), {"path": "", "message": "whole thing"}]


def test_format_path() -> None:
    assert format_path(("nodes", 2, "depends", 0)) == "nodes[2].depends[0]"
    assert format_path(("schedule_options", "timezone")) == "schedule_options.timezone"
    assert format_path(("outputs", "report", "from")) == "outputs.report.from"
    assert format_path(()) == ""


# --- parsing -------------------------------------------------------------------------------

YAML_TEXT = """\
id: ucd-parse
schedule: "0 3 * * *"
nodes:
  - id: download
    task: http-download
  - id: parse
    task: parse-ucd
    depends: download
"""


def test_parse_yaml_and_json_agree() -> None:
    from_yaml = parse_definition_text(YAML_TEXT)
    from_json = parse_definition_text(json.dumps(from_yaml))
    assert from_yaml == from_json
    assert from_yaml["nodes"][1]["depends"] == "download"
    assert validate_pipeline(from_yaml).node("parse").depends == ["download"]


def test_parse_bytes_bom_and_content_type() -> None:
    assert parse_definition_text(b'\xef\xbb\xbf{"id": "p"}') == {"id": "p"}
    assert parse_definition_text("  [1, 2]") == [1, 2]
    assert parse_definition_text("id: p\n", "application/yaml") == {"id": "p"}
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text("id: p\n", "application/json; charset=utf-8")
    assert exc.value.errors[0].message.startswith("invalid JSON at line 1 column 1: ")


def test_json_syntax_error_has_line_and_column() -> None:
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text('{\n  "id": "p",\n  "nodes": [,]\n}')
    assert [e.to_dict() for e in exc.value.errors] == [
        {"path": "", "message": "invalid JSON at line 3 column 13: Expecting value"}
    ]


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text("id: p\nnodes:\n  - id: a\n   task: t\n")
    [error] = exc.value.errors
    assert error.path == ""
    assert error.message.startswith("invalid YAML at line 4 column ")
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text("id: p\n---\nid: q\n")
    assert exc.value.errors[0].message.startswith("invalid YAML at line 2 column 1: ")


def test_invalid_utf8() -> None:
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text(b"id: \xff\n")
    assert "not valid UTF-8" in exc.value.errors[0].message


def test_yaml_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    with pytest.raises(DefinitionInvalid) as exc:
        parse_definition_text("\n".join(lines))
    assert "too large" in exc.value.errors[0].message


def test_deep_nesting_is_refused() -> None:
    for text in ("[" * 100 + "]" * 100, "[" * 100_000):
        with pytest.raises(DefinitionInvalid) as exc:
            parse_definition_text(text)
        assert "nested too deeply" in exc.value.errors[0].message


def test_moderate_aliases_are_fine() -> None:
    text = "retry: &r {max_attempts: 3}\nnodes:\n  - {id: a, task: t, retry: *r}\n  - {id: b, task: t, retry: *r}\n"
    data = parse_definition_text(text)
    assert data["nodes"][1]["retry"] == {"max_attempts": 3}


# --- model errors, located -----------------------------------------------------------------


def test_not_an_object() -> None:
    raw: Any
    for raw in (None, [], "id: p", 3):
        assert errors_of(raw) == [("", "a pipeline definition must be an object")]


def test_pydantic_errors_get_paths_and_plain_messages() -> None:
    errors = errors_of(
        {
            "id": "Bad Id",
            "schedule": ["0 3 * * *", "99 * * * *"],
            "schedule_options": {"timezone": "Mars/Olympus"},
            "nodes": [node("a"), node("b", "a"), {"id": "c", "task": "t", "depends": ["a", 7]}],
        }
    )
    assert errors == [
        (
            "id",
            "'Bad Id' is not a valid id: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        ),
        (
            "schedule[1]",
            "invalid cron expression '99 * * * *': use five fields (minute hour day-of-month month day-of-week), "
            "e.g. '0 3 * * *', or '@daily'",
        ),
        (
            "schedule_options.timezone",
            "unknown timezone 'Mars/Olympus': use an IANA name such as 'UTC' or 'Europe/Berlin'",
        ),
        ("nodes[2].depends[1]", "Input should be a valid string"),
    ]


def test_model_validator_errors_point_at_their_field() -> None:
    errors = errors_of(
        pipeline(
            [{"id": "a"}, {"id": "b", "task": "t", "template": "x"}],
            schedule_options={"start_at": "2024-02-01T00:00:00Z", "end_at": "2024-01-01T00:00:00Z"},
        )
    )
    assert [path for path, _ in errors] == ["schedule_options.end_at", "nodes[0].task", "nodes[1].template"]
    assert (
        errors[0][1]
        == "end_at (2024-01-01T00:00:00+00:00) must be after start_at (2024-02-01T00:00:00+00:00)"
    )


def test_missing_and_unknown_fields() -> None:
    errors = errors_of({"nodes": [{"id": "a", "task": "t", "dependz": []}], "schedul": "x"})
    assert errors == [
        ("id", "this field is required"),
        ("nodes[0].dependz", "unknown field 'dependz' (did you mean 'depends'?)"),
        ("schedul", "unknown field 'schedul' (did you mean 'schedule'?)"),
    ]
    errors = errors_of(pipeline([node("a")], outputs={"r": {"from": "a", "zzz": 1}}))
    assert errors == [("outputs.r.zzz", "unknown field 'zzz'; allowed fields: from, schema")]


def test_non_string_mapping_keys() -> None:
    raw = pipeline([node("a")], outputs={1: {"from": "a"}})
    assert errors_of(raw) == [("outputs[1]", "key 1 must be a string (quote it)")]


def test_nodes_and_steps_together() -> None:
    assert errors_of({"id": "p", "nodes": [node("a")], "steps": ["b"]}) == [
        ("steps", "give either nodes or steps, not both")
    ]


def test_at_least_one_node() -> None:
    assert errors_of({"id": "p"}) == [("nodes", "a pipeline needs at least one node")]
    assert errors_of({"id": "p", "steps": []}) == [("steps", "a pipeline needs at least one node")]


# --- node-level graph errors ---------------------------------------------------------------


def test_duplicate_node_ids() -> None:
    assert errors_of(pipeline([node("a"), node("b"), node("a"), node("b"), node("a")])) == [
        ("nodes[2].id", "duplicate node id 'a' (also nodes[0])"),
        ("nodes[3].id", "duplicate node id 'b' (also nodes[1])"),
        ("nodes[4].id", "duplicate node id 'a' (also nodes[0])"),
    ]


def test_depends_on_missing_node() -> None:
    assert errors_of(pipeline([node("a"), node("b", "a", "zz")])) == [
        ("nodes[1].depends[1]", "node 'b' depends on 'zz', which is not a node of this pipeline")
    ]


def test_self_dependency() -> None:
    assert errors_of(pipeline([node("a", "a")])) == [("nodes[0].depends[0]", "node 'a' depends on itself")]


def test_duplicate_dependency() -> None:
    assert errors_of(pipeline([node("a"), node("b", "a", "a")])) == [
        ("nodes[1].depends[1]", "node 'b' lists 'a' more than once (also depends[0])")
    ]


def test_two_node_cycle() -> None:
    assert errors_of(pipeline([node("b", "a"), node("a", "b")])) == [("nodes", "cycle: a -> b -> a")]


def test_cycle_starts_at_smallest_id() -> None:
    nodes = [node("start"), node("x", "z", "start"), node("z", "y"), node("y", "x")]
    assert errors_of(pipeline(nodes)) == [("nodes", "cycle: x -> z -> y -> x")]


def test_output_from_missing_node() -> None:
    raw = pipeline([node("a")], outputs={"ok": {"from": "a"}, "report": {"from": "zz"}})
    assert errors_of(raw) == [
        ("outputs.report.from", "output 'report' comes from 'zz', which is not a node of this pipeline")
    ]


def test_all_graph_errors_are_reported_together() -> None:
    raw = pipeline(
        [node("a", "c"), node("b", "a", "b", "nope"), node("c", "b"), node("a")],
        outputs={"r": {"from": "ghost"}},
    )
    assert errors_of(raw) == [
        ("nodes[3].id", "duplicate node id 'a' (also nodes[0])"),
        ("nodes[1].depends[1]", "node 'b' depends on itself"),
        ("nodes[1].depends[2]", "node 'b' depends on 'nope', which is not a node of this pipeline"),
        ("nodes", "cycle: a -> c -> b -> a"),
        ("outputs.r.from", "output 'r' comes from 'ghost', which is not a node of this pipeline"),
    ]


def test_steps_errors_are_reported_under_steps() -> None:
    raw = {"id": "p", "steps": ["a", {"id": "b", "task": "t", "depends": ["a", "zz"]}, "a", {"id": "C"}]}
    assert errors_of(raw)[0][0] == "steps[3].id"
    raw = {"id": "p", "steps": ["a", {"id": "b", "task": "t", "depends": ["a", "zz"]}, "a"]}
    assert errors_of(raw) == [
        ("steps[2].id", "duplicate node id 'a' (also steps[0])"),
        ("steps[1].depends[1]", "node 'b' depends on 'zz', which is not a node of this pipeline"),
    ]


def test_node_errors_directly() -> None:
    defn = PipelineDefinition.model_validate(pipeline([node("a", "b"), node("b", "a")]))
    assert node_errors(defn) == [DefinitionError("nodes", "cycle: a -> b -> a")]
    assert node_errors(PipelineDefinition.model_validate(pipeline([node("a"), node("b", "a")]))) == []


def test_valid_definition_passes() -> None:
    defn = validate_pipeline(parse_definition_text(YAML_TEXT))
    assert defn.node_ids == ["download", "parse"]


# --- graph algorithms ----------------------------------------------------------------------


def test_find_cycle_examples() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"]}) is None
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"b": ["a"], "a": ["b"]}) == ["a", "b", "a"]
    assert find_cycle({"q": ["r"], "r": ["p"], "p": ["q"], "z": ["q"]}) == ["p", "q", "r", "p"]
    assert find_cycle({"a": iter(["b"]), "b": ("a",)}) == ["a", "b", "a"]


def test_topological_order_examples() -> None:
    assert topological_order({}) == []
    assert topological_order({"c": [], "b": [], "a": []}) == ["a", "b", "c"]
    assert topological_order({"a": ["z"], "m": []}) == ["m", "z", "a"]
    assert topological_order({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=r"cycle: a -> b -> a"):
        topological_order({"a": ["b"], "b": ["a"], "c": []})


def test_long_chains_do_not_recurse() -> None:
    n = 10_000
    chain = {f"n{i:05d}": ([f"n{i - 1:05d}"] if i else []) for i in range(n)}
    assert find_cycle(chain) is None
    assert topological_order(chain) == sorted(chain)
    chain["n00000"] = ["n09999"]
    cycle = find_cycle(chain)
    assert cycle is not None and len(cycle) == n + 1
    assert cycle[0] == cycle[-1] == "n00000"


# --- pipeline-level ------------------------------------------------------------------------


def make(pid: str, *depends: dict[str, Any], outputs: tuple[str, ...] = ()) -> PipelineDefinition:
    return PipelineDefinition.model_validate(
        {
            "id": pid,
            "nodes": [node("a")],
            "depends": list(depends),
            "outputs": {name: {"from": "a"} for name in outputs},
        }
    )


def test_pipeline_level_ok() -> None:
    defs = {
        "fetch": make("fetch", outputs=("archive",)),
        "parse": make("parse", {"pipeline": "fetch", "outputs": ["archive"]}),
    }
    assert pipeline_level_errors(defs) == []


def test_pipeline_level_missing_pipeline_and_output() -> None:
    defs = {
        "fetch": make("fetch", outputs=("archive", "index")),
        "parse": make(
            "parse",
            {"pipeline": "fetch", "outputs": ["archive", "report"]},
            {"pipeline": "ghost"},
        ),
        "plain": make("plain"),
        "use-plain": make("use-plain", {"pipeline": "plain", "outputs": ["x"]}),
    }
    assert [(e.path, e.message) for e in pipeline_level_errors(defs)] == [
        (
            "parse.depends[0].outputs[1]",
            "pipeline 'fetch' does not declare an output 'report' (it declares: archive, index)",
        ),
        ("parse.depends[1].pipeline", "pipeline 'parse' depends on 'ghost', which does not exist"),
        (
            "use-plain.depends[0].outputs[0]",
            "pipeline 'plain' does not declare an output 'x' (it declares: none)",
        ),
    ]


def test_pipeline_level_cycles() -> None:
    defs = {
        "c": make("c", {"pipeline": "b"}),
        "b": make("b", {"pipeline": "a"}),
        "a": make("a", {"pipeline": "c", "trigger": "none"}),
    }
    assert pipeline_level_errors(defs) == [DefinitionError("depends", "pipeline cycle: a -> c -> b -> a")]
    assert pipeline_level_errors({"a": make("a", {"pipeline": "a"})}) == [
        DefinitionError("depends", "pipeline cycle: a -> a")
    ]


def test_pipeline_listed_twice() -> None:
    defs = {"u": make("u"), "d": make("d", {"pipeline": "u"}, {"pipeline": "u", "trigger": "none"})}
    assert pipeline_level_errors(defs) == [
        DefinitionError("d.depends[1].pipeline", "pipeline 'u' is listed more than once (also depends[0])")
    ]


# --- properties ----------------------------------------------------------------------------

NAMES = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("abcxyz0189"),
    st.text(alphabet="abz09_-", max_size=6),
)


@st.composite
def dags(draw: st.DrawFn, max_nodes: int = 25) -> dict[str, list[str]]:
    """A random DAG: edges only from a higher to a lower index, then names shuffled."""
    n = draw(st.integers(min_value=1, max_value=max_nodes))
    names = draw(st.lists(NAMES, min_size=n, max_size=n, unique=True))
    names = draw(st.permutations(names))
    edges: dict[str, list[str]] = {}
    for i in range(n):
        deps = draw(st.lists(st.integers(min_value=0, max_value=i - 1), unique=True)) if i else []
        edges[names[i]] = [names[j] for j in deps]
    order = draw(st.permutations(list(edges)))
    return {name: edges[name] for name in order}


def assert_topological(order: list[str], edges: Mapping[str, list[str]]) -> None:
    assert sorted(order) == sorted(edges)
    assert len(set(order)) == len(order)
    position = {name: i for i, name in enumerate(order)}
    for name, deps in edges.items():
        for dep in deps:
            assert position[dep] < position[name]


@settings(max_examples=200, deadline=None)
@given(dags())
def test_random_dags_are_acyclic_and_ordered(edges: dict[str, list[str]]) -> None:
    assert find_cycle(edges) is None
    assert_topological(topological_order(edges), edges)
    assert topological_order(edges) == topological_order(dict(reversed(list(edges.items()))))


@settings(max_examples=200, deadline=None)
@given(dags(), st.data())
def test_back_edge_creates_a_found_cycle(edges: dict[str, list[str]], data: st.DataObject) -> None:
    with_deps = sorted(name for name, deps in edges.items() if deps)
    if not with_deps:
        top = sorted(edges)[0]
        edges = {**edges, top: [top]}
    else:
        # Walk down from a node along dependencies, then close the path with a back edge.
        start = data.draw(st.sampled_from(with_deps))
        current = start
        steps = data.draw(st.integers(min_value=1, max_value=len(edges)))
        for _ in range(steps):
            if not edges[current]:
                break
            current = data.draw(st.sampled_from(sorted(edges[current])))
        edges = {**edges, current: [*edges[current], start]}
    cycle = find_cycle(edges)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    body = cycle[:-1]
    assert body[0] == min(body)
    assert len(set(body)) == len(body)
    for here, there in itertools.pairwise(cycle):
        assert there in edges[here]
    assert find_cycle(edges) == cycle
    with pytest.raises(ValueError):
        topological_order(edges)


@settings(max_examples=200, deadline=None)
@given(dags())
def test_validate_pipeline_accepts_generated_dags(edges: dict[str, list[str]]) -> None:
    raw = {"id": "gen", "nodes": [{"id": name, "task": "t", "depends": deps} for name, deps in edges.items()]}
    defn = validate_pipeline(json.loads(json.dumps(raw)))
    assert defn.node_ids == list(edges)
    assert node_errors(defn) == []
    assert_topological(topological_order({n.id: n.depends for n in defn.nodes}), edges)
