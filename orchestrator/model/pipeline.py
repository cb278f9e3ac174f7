"""Pipeline definitions: the pydantic models a YAML/JSON definition is validated into.

Everything here is pure data validation. Graph-level checks (missing dependencies, cycles,
outputs from unknown nodes, pipeline-level depends) live in `orchestrator.graph`, which can
report every problem at once instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import date, datetime
from fractions import Fraction
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.model.notify import NotifyList
from orchestrator.model.versions import version_list_problems, version_name_problem

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"

_SLUG_RE = re.compile(SLUG_PATTERN)
_TASK_NAME_RE = re.compile(TASK_NAME_PATTERN)

SLUG_RULE = "use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
TASK_NAME_RULE = "use 1 to 128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
EVENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.:-]{0,127}$"
_EVENT_NAME_RE = re.compile(EVENT_NAME_PATTERN)
EVENT_NAME_RULE = (
    "use 1 to 128 lowercase letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
)

# The context key graph.validate_pipeline reads to point an error raised by a model-level
# validator at the field it is about, rather than at the enclosing object.
ERROR_FIELD_KEY = "field"


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error from a model validator, located at `field` of the model being validated."""
    return PydanticCustomError("invalid_field", message, {ERROR_FIELD_KEY: field})


def is_slug(value: str) -> bool:
    return _SLUG_RE.fullmatch(value) is not None


def _check_slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(f"{value!r} is not a valid id: {SLUG_RULE}")
    return value


Slug = Annotated[str, AfterValidator(_check_slug)]


def slugify(name: str) -> str:
    """Best-effort slug for a task name, used to derive node ids in the `steps` shorthand."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower())
    slug = slug.lstrip("_-")[:63]
    return slug


def _none_as(default: Any) -> Any:
    """A before-validator body: YAML turns `key:` with nothing after it into None."""

    def convert(value: Any) -> Any:
        return default() if value is None else value

    return convert


def _to_json_value(value: Any, where: str) -> Any:
    """`value` as plain JSON data, or ValueError naming the offending place.

    Params and schemas are hashed and handed to workers as JSON, so YAML-only values must not
    reach them: a set has no stable order (the hash would vary between processes), NaN is not
    JSON. Dates, which YAML produces from unquoted `2024-01-01`, become ISO strings.
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value}{_at(where)} is not allowed (JSON numbers must be finite)")
        return value
    if isinstance(value, date):  # datetime is a subclass of date
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_to_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"key {key!r}{_at(where)} must be a string (quote it)")
            out[key] = _to_json_value(item, f"{where}.{key}" if where else key)
        return out
    raise ValueError(f"a {type(value).__name__}{_at(where)} is not a JSON value")


def _at(where: str) -> str:
    return f" at {where}" if where else ""


def _json_object(value: Any) -> Any:
    if value is None or not isinstance(value, dict):
        return value
    return _to_json_value(value, "")


def _coerce_str_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=1, ge=1, le=100)
    backoff: Literal["fixed", "exponential"] = "exponential"
    base_delay_s: float = Field(default=5, ge=0)
    max_delay_s: float = Field(default=300, ge=0)
    jitter: Literal["none", "full"] = "none"

    @field_validator("base_delay_s", "max_delay_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        # `ge=0` lets +inf through, and an infinite delay would park a task forever.
        if not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before retrying after failed attempt number `attempt` (1-based).

        Jitter is not applied here: the caller owns the random source, which keeps this
        deterministic and testable.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        if self.backoff == "fixed":
            delay = self.base_delay_s
        else:
            try:
                # ldexp raises instead of silently producing inf for a large attempt number.
                delay = math.ldexp(self.base_delay_s, attempt - 1)
            except OverflowError:
                delay = self.max_delay_s
        return min(delay, self.max_delay_s)


class ApprovalPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: int | None = Field(default=None, gt=0)
    on_timeout: Literal["reject", "escalate"] = "reject"


# The run's task limit (issue 19): a map never has more children than this, so neither a
# concurrency bound nor a count of tolerated failures above it can mean anything.
# Tasks of one run, a map's items included (they are created in one transaction each).
MAX_TASKS_PER_RUN = 100_000
MAX_MAP_WIDTH = MAX_TASKS_PER_RUN
# The name `map.over` starts with to read the node's merged params instead of an upstream's output.
MAP_PARAMS_SOURCE = "params"

MAP_OVER_RULE = (
    "use <upstream node id>.<path into its output> (e.g. list.files, or just list when the "
    "whole output is the list) or params.<name>"
)
TOLERATED_FAILURES_RULE = "use a count such as 3 or a percentage such as '10%'"
# 0 to 100 with at most 6 decimals. Bounding the decimals keeps MapSpec.tolerated exact and
# equal to floor(p / 100 * width + 1e-9) for every width up to MAX_MAP_WIDTH: p * width / 100
# is then a multiple of 1e-8, so it is never within 1e-9 below an integer it does not equal.
TOLERATED_PERCENT_PATTERN = r"^(?:100(?:\.0{1,6})?|\d{1,2}(?:\.\d{1,6})?)%$"
_TOLERATED_PERCENT_RE = re.compile(TOLERATED_PERCENT_PATTERN)
# For the exported JSON Schema only: `over` is checked by MapSpec._check_over, whose messages
# say what is wrong, which a pattern mismatch would not.
MAP_OVER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}(?:\.[^.]+)*$"


def split_map_over(value: str) -> tuple[str, list[str]]:
    """`list.files` -> ("list", ["files"]); `params.a.0` -> ("params", ["a", "0"]).

    ValueError with a message a person can act on when `value` is not a valid `map.over`.
    """
    if not value:
        raise ValueError(f"map.over is empty: {MAP_OVER_RULE}")
    head, *path = value.split(".")
    if head == "" or any(segment == "" for segment in path):
        raise ValueError(
            f"{value!r} has an empty segment (a leading or trailing dot, or two dots in a row): "
            f"{MAP_OVER_RULE}"
        )
    if head == MAP_PARAMS_SOURCE:
        if not path:
            raise ValueError(f"{value!r} names no param: use params.<name>, e.g. params.files")
        return head, path
    if not is_slug(head):
        raise ValueError(f"{value!r} does not start with a node id ({head!r}: {SLUG_RULE}); {MAP_OVER_RULE}")
    return head, path


def _tolerated_failures_input(value: Any) -> Any:
    """Refuse anything but a count 0..MAX_MAP_WIDTH or a percentage string 0%..100%.

    Runs before pydantic's own checks so that each refusal says what to write instead; bool is
    refused explicitly because pydantic (and Python) would otherwise read `true` as 1.
    """
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a number of failures: {TOLERATED_FAILURES_RULE}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative: {TOLERATED_FAILURES_RULE}")
        if value > MAX_MAP_WIDTH:
            raise ValueError(
                f"{value} is more than a map can have items ({MAX_MAP_WIDTH}); "
                "use '100%' to tolerate every failure"
            )
        return value
    if isinstance(value, str):
        if _TOLERATED_PERCENT_RE.fullmatch(value) is not None:
            return value
        if re.fullmatch(r"\d+", value):
            raise ValueError(
                f"{value!r} is a string: write the count without quotes ({value}) or as a percentage ('{value}%')"
            )
        number = value.removesuffix("%")
        if value.endswith("%") and re.fullmatch(r"\d+(?:\.\d+)?", number):
            if Fraction(number) > 100:
                raise ValueError(f"{value!r} is more than 100%: {TOLERATED_FAILURES_RULE}")
            raise ValueError(f"{value!r} has more than 6 decimals: {TOLERATED_FAILURES_RULE}")
    raise ValueError(f"{value!r} is not a count or a percentage: {TOLERATED_FAILURES_RULE}")


def tolerated_count(tolerated_failures: int | str, width: int) -> int:
    """MapSpec.tolerated for a threshold as stored with a map node (a count, or "p%")."""
    if width < 0:
        raise ValueError(f"a map's width is at least 0, got {width}")
    if isinstance(tolerated_failures, int):
        return tolerated_failures
    percent = Fraction(tolerated_failures.removesuffix("%"))
    return math.floor(percent * width / 100)


class MapSpec(BaseModel):
    """`map:` on a task node: run the node once per item of a list found at run time.

    `over` names where the list is: `<upstream node id>.<path>` into that upstream's output
    (a path segment of only digits indexes a list; an empty path means the whole output is
    the list) or `params.<name>[.<more>]` into the node's merged params. Whether the node is
    an upstream of the mapped node is a graph question, checked by orchestrator.graph.
    """

    model_config = ConfigDict(extra="forbid")

    over: str = Field(json_schema_extra={"pattern": MAP_OVER_PATTERN})
    # At most this many children out with workers at once; None: only the run's limits apply.
    max_concurrency: int | None = Field(default=None, ge=1, le=MAX_MAP_WIDTH)
    # How many children may fail for good while the node still succeeds: a count, or a
    # percentage of the map's width (Step Functions' tolerated failure threshold).
    tolerated_failures: (
        Annotated[int, Field(ge=0, le=MAX_MAP_WIDTH)] | Annotated[str, Field(pattern=TOLERATED_PERCENT_PATTERN)]
    ) = 0

    _tolerated_input = field_validator("tolerated_failures", mode="before")(_tolerated_failures_input)

    @field_validator("over")
    @classmethod
    def _check_over(cls, value: str) -> str:
        split_map_over(value)
        return value

    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _no_bool_concurrency(cls, value: Any) -> Any:
        # pydantic reads `true` as 1; a boolean here is a mistake, not a limit of one.
        if isinstance(value, bool):
            raise ValueError(f"{str(value).lower()} is not a number of children: use a whole number >= 1")
        return value

    def source(self) -> tuple[str, list[str]]:
        """("params", [name, ...]) or (upstream node id, [path segments]); segments as written."""
        return split_map_over(self.over)

    def source_node(self) -> str | None:
        """The upstream node mapped over, or None when the list comes from params."""
        head, _ = self.source()
        return None if head == MAP_PARAMS_SOURCE else head

    def tolerated(self, width: int) -> int:
        """The most children that may fail for good with the node still succeeding.

        A count is taken as is (it may exceed `width`); a percentage p gives
        floor(p / 100 * width), computed exactly (see TOLERATED_PERCENT_PATTERN).
        """
        return tolerated_count(self.tolerated_failures, width)

    def normalized(self) -> dict[str, Any]:
        """The spec as stored with a map node (jsonb): `over` split, the threshold as written."""
        head, path = self.source()
        return {
            "over": self.over,
            "source": head,
            "path": path,
            "max_concurrency": self.max_concurrency,
            "tolerated_failures": self.tolerated_failures,
        }


class NodeDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Slug
    task: str | None = None
    template: str | None = None
    kind: Literal["task", "approval", "manual"] = "task"
    params: dict[str, Any] = Field(default_factory=dict)
    depends: list[str] = Field(default_factory=list)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: int | None = Field(default=None, gt=0)
    heartbeat_s: int = Field(default=60, ge=5, le=3600)
    on_failure: Literal["stop", "continue"] = "stop"
    trigger_rule: Literal["all_success", "all_done", "one_failed", "none_failed"] = "all_success"
    priority: int = Field(default=0, ge=-1000, le=1000)
    approval: ApprovalPolicy | None = None
    description: str = ""
    # Dynamic fan-out (issue 19): one task per item of a list found at run time.
    map: MapSpec | None = None
    # How the node's tasks reach the bucket (issue 15): presigned URLs for the keys they read and
    # write (the default; no STS call per task), or `credentials`: STS session credentials scoped
    # to the node's prefix in its run, for code that needs an S3 client (a library writing
    # several objects, reading under a prefix). Left out of the stored definition while "urls".
    storage: Literal["urls", "credentials"] = "urls"

    _depends_list = field_validator("depends", mode="before")(_coerce_str_list)
    _params_none = field_validator("params", mode="before")(_none_as(dict))
    _params_json = field_validator("params", mode="before")(_json_object)
    _retry_none = field_validator("retry", mode="before")(_none_as(dict))

    @field_validator("task", "template")
    @classmethod
    def _task_name(cls, value: str | None) -> str | None:
        if value is not None and _TASK_NAME_RE.fullmatch(value) is None:
            raise ValueError(f"{value!r} is not a valid name: {TASK_NAME_RULE}")
        return value

    @model_validator(mode="after")
    def _kind_rules(self) -> NodeDefinition:
        if self.kind == "task":
            if self.task is not None and self.template is not None:
                raise field_error("template", "give either task or template, not both")
            if self.task is None and self.template is None:
                raise field_error(
                    "task", "a task node needs task (a worker task name) or template (a template id)"
                )
        else:
            # An approval or manual node is completed by a person, so a task or template on it
            # would never run; reject it rather than silently ignore it.
            for name in ("task", "template"):
                if getattr(self, name) is not None:
                    raise field_error(name, f"a {self.kind} node does not run a task; remove {name}")
        if self.approval is not None and self.kind != "approval":
            raise field_error("approval", "approval settings are only allowed on nodes of kind approval")
        if self.storage != "urls" and self.kind != "task":
            raise field_error("storage", f"a {self.kind} node runs no task, so it has no storage access to choose")
        if self.map is not None and self.kind != "task":
            # A person completes an approval or manual step once; there is no task to repeat.
            raise field_error(
                "map", f"a {self.kind} node cannot be mapped: map runs a task once per item, so it is only "
                "allowed on task nodes"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_map(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # `map` came after definitions were first stored: a node without one dumps exactly as
        # it did before, so the sha256 of an unchanged older definition stays what it was (see
        # PipelineDefinition.canonical_dict) and no other dump of a node gains `"map": null`.
        # No return annotation on purpose: pydantic would take it as the node's serialization
        # JSON Schema, replacing the fields' schema with a bare object.
        data: dict[str, Any] = handler(self)
        if self.map is None:
            data.pop("map", None)
        if data.get("storage") == "urls":
            data.pop("storage", None)
        return data


class PipelineDependency(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: Slug
    outputs: list[Slug] = Field(default_factory=list)
    trigger: Literal["on_success", "on_complete", "none"] = "on_success"

    _outputs_list = field_validator("outputs", mode="before")(_coerce_str_list)


class OutputDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    _schema_json = field_validator("schema_", mode="before")(_json_object)


class ScheduleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str = "UTC"
    catchup: Literal["none", "latest", "all"] = "none"
    max_catchup_runs: int = Field(default=10, ge=1, le=1000)
    overlap: Literal["allow", "skip", "buffer_one", "cancel_other"] = "allow"
    jitter_s: int = Field(default=0, ge=0, le=3600)
    start_at: datetime | None = None
    end_at: datetime | None = None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            # ValueError covers keys ZoneInfo refuses outright, such as absolute paths; OSError
            # a key the file system refuses (a name of 300 characters: ENAMETOOLONG).
            raise ValueError(
                f"unknown timezone {value!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'"
            ) from None
        return value

    @model_validator(mode="after")
    def _window(self) -> ScheduleOptions:
        # A naive bound means wall-clock time where the schedule fires; pinning it here keeps
        # comparisons with database time (always aware) from failing later.
        zone = ZoneInfo(self.timezone)
        if self.start_at is not None and self.start_at.tzinfo is None:
            self.start_at = self.start_at.replace(tzinfo=zone)
        if self.end_at is not None and self.end_at.tzinfo is None:
            self.end_at = self.end_at.replace(tzinfo=zone)
        if self.start_at is not None and self.end_at is not None and self.end_at <= self.start_at:
            raise field_error(
                "end_at",
                f"end_at ({self.end_at.isoformat()}) must be after start_at ({self.start_at.isoformat()})",
            )
        return self

    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class Concurrency(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_active_runs: int | None = Field(default=None, ge=1)
    max_active_tasks: int | None = Field(default=None, ge=1)


def _expand_steps(data: dict[str, Any]) -> dict[str, Any]:
    """Turn the `steps:` shorthand into `nodes:`, each step depending on the one before."""
    steps = data["steps"]
    if not isinstance(steps, list):
        # Let the `nodes` field report the type problem under the name the user wrote.
        rest = {k: v for k, v in data.items() if k != "steps"}
        return {**rest, "nodes": steps}
    nodes: list[Any] = []
    previous_id: Any = None
    for step in steps:
        node: Any
        if isinstance(step, str):
            node = {"id": slugify(step), "task": step}
        elif isinstance(step, dict):
            node = dict(step)
        else:
            node = step
        if isinstance(node, dict):
            if "depends" not in node and isinstance(previous_id, str):
                node["depends"] = [previous_id]
            previous_id = node.get("id")
        else:
            previous_id = None
        nodes.append(node)
    rest = {k: v for k, v in data.items() if k != "steps"}
    return {**rest, "nodes": nodes}


def _version_input(value: Any) -> Any:
    # YAML reads `2024` as an int, which is unambiguous, but `1.10` as the float 1.1, which is
    # not: ints are taken as written, floats are refused with a hint to quote them.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f"version {value!r} was read as a number; quote it so it is kept as written")
    return value


def _check_version(value: str) -> str:
    problem = version_name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


CRON_RULE = "use five fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * *', or '@daily'"


def _check_cron(value: str) -> str:
    # croniter reads a sixth field as seconds, while Quartz-style crons put seconds first; the
    # tick runs at most once a minute anyway, so six fields are refused rather than guessed at.
    if len(value.split()) > 5 or not croniter.is_valid(value):
        raise ValueError(f"invalid cron expression {value!r}: {CRON_RULE}")
    return value


Version = Annotated[str, BeforeValidator(_version_input), AfterValidator(_check_version)]
CronExpression = Annotated[str, AfterValidator(_check_cron)]


def is_event_name(value: str) -> bool:
    return _EVENT_NAME_RE.fullmatch(value) is not None


def _check_event_name(value: str) -> str:
    if not is_event_name(value):
        raise ValueError(f"{value!r} is not a valid event name: {EVENT_NAME_RULE}")
    return value


EventName = Annotated[str, AfterValidator(_check_event_name)]


class EventTrigger(BaseModel):
    """Start a run when an event named `event` arrives and its payload matches `filter`.

    Matching is deliberately small and predictable: every key of `filter` must be a top-level
    key of the payload whose value equals the filter's value (JSON equality, so 1 and 1.0 match
    but 1 and "1" do not); a list in the filter means "equals one of these". An empty filter
    matches every event of that name. Anything richer belongs in the pipeline itself.
    """

    model_config = ConfigDict(extra="forbid")

    event: EventName
    filter: dict[str, Any] = Field(default_factory=dict)

    _filter_none = field_validator("filter", mode="before")(_none_as(dict))
    _filter_json = field_validator("filter", mode="before")(_json_object)

    def matches(self, name: str, payload: dict[str, Any]) -> bool:
        if name != self.event:
            return False
        for key, expected in self.filter.items():
            if key not in payload:
                return False
            actual = payload[key]
            allowed = expected if isinstance(expected, list) else [expected]
            if not any(_json_equal(actual, option) for option in allowed):
                return False
        return True


def _json_equal(a: Any, b: Any) -> bool:
    # Python says True == 1, JSON does not: a filter {"dry_run": true} must not match 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# See PipelineDefinition.canonical_dict.
_OMITTED_WHEN_EMPTY = ("triggers", "emits", "name")

DISPLAY_NAME_MAX = 200


def _check_display_name(value: str) -> str:
    # Shown in lists and page titles: one line of printable text, not an id (ids stay slugs).
    if not value.strip():
        raise ValueError("name must not be empty or only spaces; leave it out for no display name")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("name must be one line of text without control characters")
    return value


DisplayName = Annotated[str, Field(min_length=1, max_length=DISPLAY_NAME_MAX), AfterValidator(_check_display_name)]


class PipelineDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Slug
    name: DisplayName | None = None  # display name; the id stays the key
    description: str = ""
    versions: list[Version] = Field(default_factory=lambda: ["default"])
    params: dict[str, Any] = Field(default_factory=dict)
    schedule: list[CronExpression] = Field(default_factory=list)
    schedule_options: ScheduleOptions = Field(default_factory=ScheduleOptions)
    depends: list[PipelineDependency] = Field(default_factory=list)
    outputs: dict[str, OutputDefinition] = Field(default_factory=dict)
    concurrency: Concurrency = Field(default_factory=Concurrency)
    nodes: list[NodeDefinition] = Field(default_factory=list, validate_default=True)
    tags: list[str] = Field(default_factory=list)
    # Event triggers (docs/events.md): runs start when a matching event is posted.
    triggers: list[EventTrigger] = Field(default_factory=list)
    # Event names this pipeline's tasks may post; only used to refuse trigger cycles.
    emits: list[EventName] = Field(default_factory=list)
    # Notification targets (docs/notifications.md); None: the workspace default, []: none.
    notify: NotifyList | None = None

    _params_none = field_validator("params", mode="before")(_none_as(dict))
    _params_json = field_validator("params", mode="before")(_json_object)
    _schedule_list = field_validator("schedule", mode="before")(_coerce_str_list)
    _tags_list = field_validator("tags", mode="before")(_coerce_str_list)
    _depends_none = field_validator("depends", mode="before")(_none_as(list))
    _outputs_none = field_validator("outputs", mode="before")(_none_as(dict))
    _options_none = field_validator("schedule_options", mode="before")(_none_as(dict))
    _concurrency_none = field_validator("concurrency", mode="before")(_none_as(dict))
    _triggers_none = field_validator("triggers", mode="before")(_none_as(list))
    _emits_list = field_validator("emits", mode="before")(_coerce_str_list)

    @model_validator(mode="before")
    @classmethod
    def _steps_shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "steps" not in data:
            return data
        if "nodes" in data:
            raise field_error("steps", "give either nodes or steps, not both")
        return _expand_steps(data)

    @field_validator("versions", mode="before")
    @classmethod
    def _versions_input(cls, value: Any) -> Any:
        if value is None:
            return ["default"]
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("versions")
    @classmethod
    def _versions_valid(cls, value: list[str]) -> list[str]:
        # Each name was checked by `Version`; what is left is the list: empty, too long, repeats.
        if not value:
            raise ValueError("at least one version is required (the default is ['default'])")
        problems = version_list_problems(value)
        if problems:
            raise ValueError("; ".join(f"{path}: {message}" for path, message in problems))
        return value

    @field_validator("outputs")
    @classmethod
    def _output_names(cls, value: dict[str, OutputDefinition]) -> dict[str, OutputDefinition]:
        for name in value:
            if not is_slug(name):
                raise ValueError(f"{name!r} is not a valid output name: {SLUG_RULE}")
        return value

    @field_validator("nodes")
    @classmethod
    def _has_nodes(cls, value: list[NodeDefinition]) -> list[NodeDefinition]:
        if not value:
            raise ValueError("a pipeline needs at least one node")
        return value

    @field_validator("emits")
    @classmethod
    def _emits_unique(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for item in value:
            if item in seen:
                raise ValueError(f"event {item!r} is listed more than once")
            seen.add(item)
        return value

    def matches_event(self, name: str, payload: dict[str, Any]) -> bool:
        """Whether any of this pipeline's triggers starts a run for the event."""
        return any(trigger.matches(name, payload) for trigger in self.triggers)

    @property
    def node_ids(self) -> list[str]:
        return [node.id for node in self.nodes]

    def node(self, node_id: str) -> NodeDefinition:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(f"pipeline {self.id!r} has no node {node_id!r}")

    def canonical_dict(self) -> dict[str, Any]:
        dumped = self.model_dump(mode="json", by_alias=True, exclude_none=False)
        # Fields added after definitions were first stored are left out while empty, so the
        # sha256 of an unchanged older definition stays what it was: re-saving it must not
        # create a new version just because the model learned a new field.
        # (A node's `map` is left out while None by NodeDefinition's serializer, for the same
        # reason.)
        for name in _OMITTED_WHEN_EMPTY:
            if not dumped.get(name):
                dumped.pop(name, None)
        if dumped.get("notify") is None:  # absent, not empty: `notify: []` is an explicit "none"
            dumped.pop("notify", None)
        return dumped

    def canonical_json(self) -> str:
        return json.dumps(self.canonical_dict(), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()
