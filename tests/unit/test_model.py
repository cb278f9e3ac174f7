"""The pipeline definition models: shorthand, coercions, defaults, hashing and field errors."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.model import (
    ApprovalPolicy,
    Concurrency,
    NodeDefinition,
    OutputDefinition,
    PipelineDefinition,
    PipelineDependency,
    RetryPolicy,
    ScheduleOptions,
    slugify,
)


def minimal(**extra: Any) -> dict[str, Any]:
    return {"id": "p", "nodes": [{"id": "a", "task": "work"}], **extra}


def error_of(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[int | str, ...], str, Any]]:
    return [(tuple(e["loc"]), e["msg"], (e.get("ctx") or {}).get("field")) for e in exc.value.errors()]


# --- steps shorthand -----------------------------------------------------------------------


def test_steps_strings_become_a_chain_of_nodes() -> None:
    defn = PipelineDefinition.model_validate({"id": "p", "steps": ["fetch", "Parse.UCD", "report"]})
    assert defn.node_ids == ["fetch", "parse-ucd", "report"]
    assert [n.task for n in defn.nodes] == ["fetch", "Parse.UCD", "report"]
    assert [n.depends for n in defn.nodes] == [[], ["fetch"], ["parse-ucd"]]


def test_steps_dicts_keep_their_own_depends() -> None:
    defn = PipelineDefinition.model_validate(
        {
            "id": "p",
            "steps": [
                {"id": "a", "task": "t"},
                {"id": "b", "task": "t"},
                {"id": "c", "task": "t", "depends": []},
                {"id": "d", "task": "t", "depends": "a"},
                "last",
            ],
        }
    )
    assert [n.depends for n in defn.nodes] == [[], ["a"], [], ["a"], ["d"]]


def test_steps_are_not_serialized() -> None:
    defn = PipelineDefinition.model_validate({"id": "p", "steps": ["a"]})
    dumped = defn.canonical_dict()
    assert "steps" not in dumped
    assert dumped["nodes"][0]["id"] == "a"
    assert not hasattr(defn, "steps")


def test_steps_and_nodes_together_is_an_error() -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate({**minimal(), "steps": ["b"]})
    assert error_of(exc) == [((), "give either nodes or steps, not both", "steps")]


def test_slugify() -> None:
    assert slugify("Parse.UCD:v2") == "parse-ucd-v2"
    assert slugify("_x") == "x"
    assert len(slugify("a" * 200)) == 63


# --- coercions and defaults ----------------------------------------------------------------


def test_single_strings_become_lists() -> None:
    defn = PipelineDefinition.model_validate(
        {
            "id": "p",
            "schedule": "0 3 * * *",
            "versions": "15.1.0",
            "tags": "unicode",
            "depends": [{"pipeline": "up", "outputs": "archive"}],
            "nodes": [{"id": "a", "task": "t"}, {"id": "b", "task": "t", "depends": "a"}],
        }
    )
    assert defn.schedule == ["0 3 * * *"]
    assert defn.versions == ["15.1.0"]
    assert defn.tags == ["unicode"]
    assert defn.depends[0].outputs == ["archive"]
    assert defn.node("b").depends == ["a"]


def test_empty_yaml_values_mean_defaults() -> None:
    defn = PipelineDefinition.model_validate(
        {
            "id": "p",
            "params": None,
            "schedule": None,
            "depends": None,
            "outputs": None,
            "versions": None,
            "nodes": [{"id": "a", "task": "t", "depends": None, "params": None, "retry": None}],
        }
    )
    assert defn.params == {} and defn.schedule == [] and defn.depends == [] and defn.outputs == {}
    assert defn.versions == ["default"]
    assert defn.nodes[0].depends == [] and defn.nodes[0].retry == RetryPolicy()


def test_integer_versions_are_kept_but_floats_are_refused() -> None:
    assert PipelineDefinition.model_validate(minimal(versions=[2024, "16.0.0"])).versions == [
        "2024",
        "16.0.0",
    ]
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(minimal(versions=[1.10]))
    [(loc, msg, _)] = error_of(exc)
    assert loc == ("versions", 0)
    assert "quote it" in msg


@pytest.mark.parametrize(
    ("versions", "loc", "fragment"),
    [
        ([], ("versions",), "at least one version"),
        (["a", "a"], ("versions",), "'a' is listed more than once"),
        (["ok", "has space"], ("versions", 1), "'has space' is not a valid version"),
        (["x" * 129], ("versions", 0), "is not a valid version"),
    ],
)
def test_bad_versions(versions: list[str], loc: tuple[int | str, ...], fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(minimal(versions=versions))
    [(got_loc, msg, _)] = error_of(exc)
    assert got_loc == loc
    assert fragment in msg


def test_defaults() -> None:
    defn = PipelineDefinition.model_validate(minimal())
    assert defn.description == "" and defn.versions == ["default"] and defn.params == {}
    assert defn.schedule == [] and defn.depends == [] and defn.outputs == {} and defn.tags == []
    assert defn.schedule_options == ScheduleOptions()
    assert defn.schedule_options.timezone == "UTC" and defn.schedule_options.catchup == "none"
    assert defn.schedule_options.max_catchup_runs == 10 and defn.schedule_options.overlap == "allow"
    assert defn.concurrency == Concurrency(max_active_runs=None, max_active_tasks=None)
    node = defn.nodes[0]
    assert node.kind == "task" and node.params == {} and node.depends == []
    assert node.timeout_s is None and node.heartbeat_s == 60 and node.priority == 0
    assert node.on_failure == "stop" and node.trigger_rule == "all_success" and node.approval is None
    assert node.retry == RetryPolicy(
        max_attempts=1, backoff="exponential", base_delay_s=5, max_delay_s=300, jitter="none"
    )
    assert PipelineDependency(pipeline="up").trigger == "on_success"
    assert ApprovalPolicy().on_timeout == "reject"


def test_node_lookup() -> None:
    defn = PipelineDefinition.model_validate(minimal())
    assert defn.node("a").task == "work"
    with pytest.raises(KeyError):
        defn.node("missing")


def test_a_pipeline_needs_a_node() -> None:
    for raw in ({"id": "p"}, {"id": "p", "nodes": []}, {"id": "p", "steps": []}):
        with pytest.raises(ValidationError) as exc:
            PipelineDefinition.model_validate(raw)
        assert error_of(exc) == [(("nodes",), "Value error, a pipeline needs at least one node", None)]


# --- ids and names -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "has space", "dot.ted", "a" * 64])
def test_ids_must_be_slugs(bad: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate({"id": bad, "nodes": [{"id": bad, "task": "t"}]})
    errors = error_of(exc)
    assert [loc for loc, _, _ in errors] == [("id",), ("nodes", 0, "id")]
    assert all("lowercase letters, digits" in msg for _, msg, _ in errors)


@pytest.mark.parametrize("good", ["a", "0", "a-b_c", "a" * 63])
def test_good_slugs(good: str) -> None:
    assert PipelineDefinition.model_validate({"id": good, "nodes": [{"id": good, "task": "t"}]}).id == good


def test_task_names() -> None:
    assert NodeDefinition(id="a", task="pkg.module:Func-1").task == "pkg.module:Func-1"
    with pytest.raises(ValidationError) as exc:
        NodeDefinition(id="a", task="no spaces")
    [(loc, msg, _)] = error_of(exc)
    assert loc == ("task",) and "'no spaces' is not a valid name" in msg


# --- task/template rule --------------------------------------------------------------------


def test_task_node_needs_task_or_template() -> None:
    assert NodeDefinition(id="a", template="download").template == "download"
    with pytest.raises(ValidationError) as exc:
        NodeDefinition(id="a")
    assert error_of(exc)[0][2] == "task"
    assert "needs task" in error_of(exc)[0][1]
    with pytest.raises(ValidationError) as exc:
        NodeDefinition(id="a", task="t", template="x")
    assert error_of(exc) == [((), "give either task or template, not both", "template")]


def test_approval_and_manual_nodes_run_no_task() -> None:
    node = NodeDefinition(
        id="ok", kind="approval", approval=ApprovalPolicy(timeout_s=60, on_timeout="escalate")
    )
    assert node.approval is not None and node.approval.timeout_s == 60
    assert NodeDefinition(id="m", kind="manual").task is None
    with pytest.raises(ValidationError) as exc:
        NodeDefinition(id="a", kind="manual", task="t")
    assert error_of(exc)[0][2] == "task"
    with pytest.raises(ValidationError) as exc:
        NodeDefinition(id="a", task="t", approval={"timeout_s": 5})  # type: ignore[arg-type]
    assert error_of(exc)[0][2] == "approval"


# --- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "loc"),
    [
        ({"heartbeat_s": 4}, ("heartbeat_s",)),
        ({"heartbeat_s": 3601}, ("heartbeat_s",)),
        ({"timeout_s": 0}, ("timeout_s",)),
        ({"priority": 1001}, ("priority",)),
        ({"retry": {"max_attempts": 0}}, ("retry", "max_attempts")),
        ({"retry": {"max_attempts": 101}}, ("retry", "max_attempts")),
        ({"retry": {"base_delay_s": -1}}, ("retry", "base_delay_s")),
        ({"retry": {"max_delay_s": float("inf")}}, ("retry", "max_delay_s")),
        ({"retry": {"backoff": "linear"}}, ("retry", "backoff")),
        ({"trigger_rule": "any"}, ("trigger_rule",)),
    ],
)
def test_node_bounds(node: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeDefinition.model_validate({"id": "a", "task": "t", **node})
    assert [e[0] for e in error_of(exc)] == [loc]


# --- retry delays --------------------------------------------------------------------------


def test_retry_delays() -> None:
    exp = RetryPolicy(max_attempts=5, base_delay_s=5, max_delay_s=300)
    assert [exp.delay_s(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert exp.delay_s(10_000) == 300
    fixed = RetryPolicy(backoff="fixed", base_delay_s=7, max_delay_s=5)
    assert fixed.delay_s(1) == 5 and fixed.delay_s(50) == 5
    assert RetryPolicy(base_delay_s=0).delay_s(99) == 0
    with pytest.raises(ValueError):
        exp.delay_s(0)


# --- schedule ------------------------------------------------------------------------------


def test_good_cron_expressions() -> None:
    defn = PipelineDefinition.model_validate(minimal(schedule=["0 3 * * *", "*/5 * * * 1-5", "@daily"]))
    assert len(defn.schedule) == 3


@pytest.mark.parametrize("expression", ["61 * * * *", "not cron", "", "0 0 * * * *"])
def test_bad_cron_names_the_expression(expression: str) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(minimal(schedule=["0 3 * * *", expression]))
    [(loc, msg, _)] = error_of(exc)
    assert loc == ("schedule", 1)
    assert f"invalid cron expression {expression!r}" in msg


def test_unknown_timezone_names_it() -> None:
    for zone in ("Mars/Olympus", "/etc/passwd"):
        with pytest.raises(ValidationError) as exc:
            PipelineDefinition.model_validate(minimal(schedule_options={"timezone": zone}))
        [(loc, msg, _)] = error_of(exc)
        assert loc == ("schedule_options", "timezone")
        assert f"unknown timezone {zone!r}" in msg
    assert ScheduleOptions(timezone="Europe/Berlin").zone().key == "Europe/Berlin"


def test_end_at_must_follow_start_at() -> None:
    start = datetime(2024, 1, 2, tzinfo=UTC)
    for end in (start, start - timedelta(days=1)):
        with pytest.raises(ValidationError) as exc:
            ScheduleOptions(start_at=start, end_at=end)
        [(_, msg, field)] = error_of(exc)
        assert field == "end_at"
        assert msg.startswith("end_at (")
    assert ScheduleOptions(start_at=start, end_at=start + timedelta(seconds=1)).end_at is not None


def test_naive_bounds_are_in_the_schedule_timezone() -> None:
    options = ScheduleOptions(timezone="Europe/Berlin", start_at=datetime(2024, 7, 1, 3, 0))
    assert options.start_at is not None
    assert options.start_at.utcoffset() == timedelta(hours=2)
    defn = PipelineDefinition.model_validate(minimal(schedule_options={"start_at": "2024-01-01"}))
    assert defn.canonical_dict()["schedule_options"]["start_at"] == "2024-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"catchup": "some"}, ("schedule_options", "catchup")),
        ({"max_catchup_runs": 0}, ("schedule_options", "max_catchup_runs")),
        ({"overlap": "queue"}, ("schedule_options", "overlap")),
        ({"jitter_s": 3601}, ("schedule_options", "jitter_s")),
    ],
)
def test_schedule_option_bounds(options: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(minimal(schedule_options=options))
    assert [e[0] for e in error_of(exc)] == [loc]


# --- outputs -------------------------------------------------------------------------------


def test_outputs_use_from_and_schema_aliases() -> None:
    defn = PipelineDefinition.model_validate(
        minimal(outputs={"report": {"from": "a", "schema": {"type": "object"}}})
    )
    out = defn.outputs["report"]
    assert out.from_ == "a" and out.schema_ == {"type": "object"}
    assert out.model_dump() == {"from": "a", "schema": {"type": "object"}}
    assert defn.canonical_dict()["outputs"] == {"report": {"from": "a", "schema": {"type": "object"}}}
    assert OutputDefinition.model_validate({"from_": "a"}).from_ == "a"


def test_output_names_are_slugs() -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(minimal(outputs={"Bad Name": {"from": "a"}}))
    [(loc, msg, _)] = error_of(exc)
    assert loc == ("outputs",) and "'Bad Name' is not a valid output name" in msg


# --- extra fields --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (minimal(owner="me"), ("owner",)),
        ({"id": "p", "nodes": [{"id": "a", "task": "t", "dependz": ["b"]}]}, ("nodes", 0, "dependz")),
        (
            {"id": "p", "nodes": [{"id": "a", "task": "t", "retry": {"tries": 3}}]},
            ("nodes", 0, "retry", "tries"),
        ),
        (minimal(outputs={"r": {"from": "a", "format": "csv"}}), ("outputs", "r", "format")),
        (minimal(schedule_options={"tz": "UTC"}), ("schedule_options", "tz")),
        (minimal(depends=[{"pipeline": "u", "output": ["x"]}]), ("depends", 0, "output")),
        (minimal(concurrency={"max_runs": 1}), ("concurrency", "max_runs")),
    ],
)
def test_extra_fields_are_rejected(raw: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    with pytest.raises(ValidationError) as exc:
        PipelineDefinition.model_validate(raw)
    errors = exc.value.errors()
    assert [(tuple(e["loc"]), e["type"]) for e in errors] == [(loc, "extra_forbidden")]


# --- canonical form and hash ---------------------------------------------------------------

RICH: dict[str, Any] = {
    "id": "ucd-parse",
    "description": "Parse Unicode data files",
    "versions": ["15.1.0", "16.0.0"],
    "params": {"strict": True, "nested": {"b": 1, "a": [1, 2]}},
    "schedule": ["0 3 * * *", "0 15 * * 1"],
    "schedule_options": {"timezone": "Europe/Berlin", "catchup": "latest"},
    "depends": [{"pipeline": "ucd-fetch", "outputs": ["archive"]}],
    "outputs": {"report": {"from": "summarize", "schema": {"type": "object", "required": ["rows"]}}},
    "concurrency": {"max_active_runs": 1, "max_active_tasks": 50},
    "nodes": [
        {"id": "download", "task": "http-download", "params": {"url": "https://x", "b": 2}},
        {"id": "parse", "task": "parse-ucd", "depends": ["download"], "retry": {"max_attempts": 4}},
        {"id": "approve", "kind": "approval", "depends": ["parse"], "approval": {"timeout_s": 86400}},
        {"id": "summarize", "task": "summarize", "depends": ["approve"]},
    ],
}


def reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reverse_keys(v) for v in value]
    return value


def test_sha256_is_stable_across_key_order() -> None:
    a = PipelineDefinition.model_validate(RICH)
    b = PipelineDefinition.model_validate(reverse_keys(RICH))
    assert list(RICH["params"]) != list(b.params)
    assert a.canonical_json() == b.canonical_json()
    assert a.sha256() == b.sha256()
    assert len(a.sha256()) == 64 and int(a.sha256(), 16) >= 0


def test_sha256_ignores_spelling_of_defaults() -> None:
    explicit = copy.deepcopy(RICH)
    explicit["nodes"][0]["retry"] = {"max_attempts": 1}
    explicit["schedule_options"]["overlap"] = "allow"
    a = PipelineDefinition.model_validate(RICH)
    assert a.sha256() == PipelineDefinition.model_validate(explicit).sha256()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["params"].update(strict=False),
        lambda d: d["nodes"][1]["retry"].update(max_attempts=5),
        lambda d: d["nodes"].reverse(),
        lambda d: d["schedule"].pop(),
        lambda d: d.update(description="other"),
        lambda d: d["outputs"]["report"].update(schema=None),
        lambda d: d["nodes"][1].update(map={"over": "download.files"}),
    ],
)
def test_sha256_changes_with_content(change: Any) -> None:
    changed = copy.deepcopy(RICH)
    change(changed)
    assert (
        PipelineDefinition.model_validate(changed).sha256()
        != PipelineDefinition.model_validate(RICH).sha256()
    )


def test_canonical_round_trip() -> None:
    a = PipelineDefinition.model_validate(RICH)
    b = PipelineDefinition.model_validate(a.canonical_dict())
    assert a == b
    assert a.canonical_json() == b.canonical_json()
    assert ":" in a.canonical_json() and ", " not in a.canonical_json()


# --- params are JSON -----------------------------------------------------------------------


def test_params_dates_become_iso_strings() -> None:
    defn = PipelineDefinition.model_validate(
        minimal(params={"since": date(2024, 1, 1), "at": datetime(2024, 1, 1, 10, tzinfo=UTC), "n": [1.5]})
    )
    assert defn.params == {"since": "2024-01-01", "at": "2024-01-01T10:00:00+00:00", "n": [1.5]}


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"x": float("nan")}, "nan at x is not allowed"),
        ({"a": [1, {"s": {"b", "a"}}]}, "a set at a[1].s is not a JSON value"),
        ({"b": b"raw"}, "a bytes at b is not a JSON value"),
        ({1: "x"}, "key 1 must be a string"),
    ],
)
def test_params_must_be_json(params: dict[Any, Any], fragment: str) -> None:
    for raw in (minimal(params=params), {"id": "p", "nodes": [{"id": "a", "task": "t", "params": params}]}):
        with pytest.raises(ValidationError) as exc:
            PipelineDefinition.model_validate(raw)
        [(loc, msg, _)] = error_of(exc)
        assert loc[-1] == "params"
        assert fragment in msg
    with pytest.raises(ValidationError):
        OutputDefinition.model_validate({"from": "a", "schema": params})
