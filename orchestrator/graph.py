"""Definition parsing, validation with located errors, and DAG checks and ordering.

Pure functions over `orchestrator.model`: no database, no web framework. Validation collects
every problem it can find, each with a path into the definition (`nodes[2].depends[0]`), so
that an API caller or a CLI user can fix a definition in one pass.
"""

from __future__ import annotations

import difflib
import heapq
import types
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator import safe_json
from orchestrator.model.pipeline import (
    ERROR_FIELD_KEY,
    MAP_PARAMS_SOURCE,
    PipelineDefinition,
    PipelineDependency,
)

# A definition is a small document; these bounds only stop hostile input. YAML aliases can
# make a few hundred bytes expand into billions of values once serialized ("billion laughs"),
# and deep nesting exhausts the interpreter stack in json/pydantic.
MAX_EXPANDED_VALUES = 200_000
MAX_NESTING_DEPTH = 64


@dataclass(frozen=True)
class DefinitionError:
    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DefinitionInvalid(ValueError):
    """A definition was rejected; `errors` holds every problem found, each with its path."""

    def __init__(self, errors: Sequence[DefinitionError]) -> None:
        self.errors: list[DefinitionError] = list(errors)
        super().__init__("; ".join(str(error) for error in self.errors) or "invalid definition")

    def to_list(self) -> list[dict[str, str]]:
        return [error.to_dict() for error in self.errors]


# --- parsing -------------------------------------------------------------------------------


def parse_definition_text(text: str | bytes, content_type: str | None = None) -> Any:
    """Parse a YAML or JSON document into plain Python values (not yet validated)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DefinitionInvalid(
                [DefinitionError("", f"the definition is not valid UTF-8 (byte {exc.start})")]
            ) from None
    text = text.removeprefix("\ufeff")
    stripped = text.lstrip()
    as_json = (content_type is not None and "json" in content_type.lower()) or stripped.startswith(("{", "["))
    try:
        data = _parse_json(text) if as_json else _parse_yaml(text)
    except RecursionError:
        raise DefinitionInvalid([DefinitionError("", "the definition is nested too deeply")]) from None
    problem = _shape_problem(data)
    if problem is not None:
        raise DefinitionInvalid([DefinitionError("", problem)])
    return data


def _parse_json(text: str) -> Any:
    try:
        return safe_json.loads(text)
    except safe_json.UnsafeJson as exc:
        message = str(exc) if str(exc).startswith("invalid JSON") else f"invalid JSON: {exc}"
        raise DefinitionInvalid([DefinitionError("", message)]) from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise DefinitionInvalid([DefinitionError("", f"invalid YAML{where}: {detail}")]) from None
    except yaml.YAMLError as exc:
        raise DefinitionInvalid([DefinitionError("", f"invalid YAML: {exc}")]) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # PyYAML's constructors raise these for values they recognise but cannot build: an
        # integer past Python's int-string limit, a date like 2024-02-30 or year 0, a
        # `!!timestamp` it cannot split.
        if "integer string conversion" in str(exc):
            detail = f"an integer has more than {safe_json.MAX_INT_DIGITS} digits"
        else:
            detail = f"a value could not be read ({exc})"
        raise DefinitionInvalid([DefinitionError("", f"invalid YAML: {detail}")]) from None


def _shape_problem(data: Any) -> str | None:
    """Why `data` is too big, too deep or not storable (a lone surrogate), or None if it is fine."""
    # Counts values as they will be once serialized, so a shared (aliased) subtree counts once
    # per reference; the walk stops at the limit, so its cost is bounded too.
    return safe_json.shape_problem(
        data, "the definition", max_depth=MAX_NESTING_DEPTH, max_values=MAX_EXPANDED_VALUES
    )


# --- validation ----------------------------------------------------------------------------


def validate_pipeline(raw: Any) -> PipelineDefinition:
    """Validate a parsed definition; raise DefinitionInvalid listing every error found."""
    if not isinstance(raw, dict):
        raise DefinitionInvalid([DefinitionError("", "a pipeline definition must be an object")])
    # With the `steps:` shorthand the user never wrote `nodes`, so point errors at `steps`.
    list_name = "steps" if "steps" in raw and "nodes" not in raw else "nodes"
    try:
        definition = PipelineDefinition.model_validate(raw)
    except ValidationError as exc:
        errors = [_from_pydantic(error) for error in exc.errors(include_url=False)]
        raise DefinitionInvalid([_rename_list(error, list_name) for error in errors]) from None
    graph_errors = [*schedule_errors(definition), *_node_errors(definition, list_name)]
    if graph_errors:
        raise DefinitionInvalid(graph_errors)
    return definition


def format_path(loc: Iterable[int | str]) -> str:
    """`("nodes", 2, "depends", 0)` -> `nodes[2].depends[0]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def _from_pydantic(error: Mapping[str, Any]) -> DefinitionError:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    field = ctx.get(ERROR_FIELD_KEY)
    if isinstance(field, str):
        loc = (*loc, field)
    message = str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if len(loc) >= 2 and loc[-1] == "[key]":
        # pydantic locates a bad mapping key as (..., key, "[key]"); YAML reads `1:` as an int.
        loc = loc[:-1]
        message = f"key {loc[-1]!r} must be a string (quote it)"
    elif kind == "extra_forbidden":
        message = _unknown_field_message(loc)
    elif kind == "missing":
        message = "this field is required"
    return DefinitionError(format_path(loc), message)


def _unknown_field_message(loc: tuple[int | str, ...]) -> str:
    name = str(loc[-1]) if loc else ""
    allowed = _allowed_fields(loc[:-1])
    if not allowed:
        return f"unknown field {name!r}"
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        return f"unknown field {name!r} (did you mean {close[0]!r}?)"
    return f"unknown field {name!r}; allowed fields: {', '.join(allowed)}"


def _allowed_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names (as written in a definition) of the model found at `loc`."""
    model: type[BaseModel] | None = PipelineDefinition
    pending: list[Any] = []
    for part in loc:
        if pending:
            # Inside a list or dict: this part is an index or key; step to the item type.
            model, pending = _unwrap(pending.pop())
            continue
        if model is None:
            return []
        field = _field_by_alias(model, str(part))
        if field is None:
            return []
        model, pending = _unwrap(field)
    if model is None or pending:
        return []
    if model is PipelineDefinition:
        return sorted([*_aliases(model), "steps"])
    return sorted(_aliases(model))


def _aliases(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _field_by_alias(model: type[BaseModel], name: str) -> Any:
    for field_name, info in model.model_fields.items():
        if (info.alias or field_name) == name:
            return info.annotation
    return None


def _unwrap(annotation: Any) -> tuple[type[BaseModel] | None, list[Any]]:
    """Split an annotation into (model, pending item annotations of enclosing containers)."""
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        args = typing.get_args(annotation)
        return None, [args[-1]]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, []
    return None, []


def _rename_list(error: DefinitionError, list_name: str) -> DefinitionError:
    if list_name == "nodes":
        return error
    path = error.path
    if path == "nodes" or path.startswith("nodes["):
        path = list_name + path.removeprefix("nodes")
    return DefinitionError(path, error.message.replace("nodes[", f"{list_name}["))


# --- schedules -----------------------------------------------------------------------------

# start_at and end_at must lie in this window: cron arithmetic near datetime's limits (year 1,
# year 9999) overflows, and a time outside it is a typo or a sentinel, not a schedule.
EARLIEST_SCHEDULE_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_SCHEDULE_TIME = datetime(3000, 1, 1, tzinfo=UTC)


def schedule_errors(defn: PipelineDefinition) -> list[DefinitionError]:
    """What the schedule part of a definition being accepted must not hold, each with its path.

    The model (which also reads stored definitions back) only checks that a cron parses and a
    timezone loads; a definition being created, updated or validated is also held to what the
    tick needs: a cron that fires at all, with no reversed range or step past its field's range
    (`cron.expression_problem`), an IANA timezone that does not depend on the host, and start_at /
    end_at within [EARLIEST_SCHEDULE_TIME, LATEST_SCHEDULE_TIME).
    """
    from orchestrator.engine import cron  # pure (croniter and zoneinfo only), no database

    errors: list[DefinitionError] = []
    for i, expression in enumerate(defn.schedule):
        problem = cron.expression_problem(expression)
        if problem is not None:
            errors.append(DefinitionError(f"schedule[{i}]", problem))
    options = defn.schedule_options
    problem = cron.timezone_problem(options.timezone)
    if problem is not None:
        errors.append(DefinitionError("schedule_options.timezone", problem))
    for name, value in (("start_at", options.start_at), ("end_at", options.end_at)):
        if value is None:
            continue
        if not EARLIEST_SCHEDULE_TIME <= value < LATEST_SCHEDULE_TIME:
            hint = "; leave end_at out for a schedule that never ends" if name == "end_at" else ""
            errors.append(DefinitionError(
                f"schedule_options.{name}",
                f"{name} ({_iso(value)}) must be from {_iso(EARLIEST_SCHEDULE_TIME)} to before "
                f"{_iso(LATEST_SCHEDULE_TIME)}{hint}",
            ))
    return errors


def end_at_problem(defn: PipelineDefinition, now: datetime) -> DefinitionError | None:
    """A new pipeline whose schedule ended before `now` (database time) would never fire.

    Not part of `validate_pipeline`, which does not know the time nor whether the pipeline is
    new: a pipeline whose schedule has ended can still be updated unchanged. Applied on create
    (and by validate to ids not stored yet); the offline CLI reports it as a warning.
    """
    end_at = defn.schedule_options.end_at
    if not defn.schedule or end_at is None or end_at > now:
        return None
    return DefinitionError(
        "schedule_options.end_at",
        f"end_at ({_iso(end_at)}) is already past (now {_iso(now)}): the schedule would never fire",
    )


def _iso(value: datetime) -> str:
    try:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    except OverflowError:  # near year 1 or 9999 in a zone east or west of UTC
        return value.isoformat()


# --- node-level graph ----------------------------------------------------------------------


def node_errors(defn: PipelineDefinition) -> list[DefinitionError]:
    """Graph problems of one pipeline's nodes and outputs, in definition order."""
    return _node_errors(defn, "nodes")


def _node_errors(defn: PipelineDefinition, list_name: str) -> list[DefinitionError]:
    errors: list[DefinitionError] = []
    first_index: dict[str, int] = {}
    for i, node in enumerate(defn.nodes):
        if node.id in first_index:
            errors.append(
                DefinitionError(
                    f"{list_name}[{i}].id",
                    f"duplicate node id {node.id!r} (also {list_name}[{first_index[node.id]}])",
                )
            )
        else:
            first_index[node.id] = i

    edges: dict[str, set[str]] = {node_id: set() for node_id in first_index}
    for i, node in enumerate(defn.nodes):
        seen: dict[str, int] = {}
        for k, dep in enumerate(node.depends):
            path = f"{list_name}[{i}].depends[{k}]"
            if dep in seen:
                errors.append(
                    DefinitionError(
                        path, f"node {node.id!r} lists {dep!r} more than once (also depends[{seen[dep]}])"
                    )
                )
                continue
            seen[dep] = k
            if dep == node.id:
                errors.append(DefinitionError(path, f"node {node.id!r} depends on itself"))
            elif dep not in first_index:
                errors.append(
                    DefinitionError(
                        path, f"node {node.id!r} depends on {dep!r}, which is not a node of this pipeline"
                    )
                )
            elif first_index[node.id] == i:
                # A duplicate node's edges are left out: the duplicate is already reported,
                # and a cycle made only by merging two copies would be noise.
                edges[node.id].add(dep)

    errors.extend(_map_errors(defn, list_name, first_index))

    cycle = find_cycle(edges)
    if cycle is not None:
        errors.append(DefinitionError(list_name, "cycle: " + " -> ".join(cycle)))

    kinds = {node.id: node.kind for node in defn.nodes}
    for name, output in defn.outputs.items():
        if output.from_ not in first_index:
            errors.append(
                DefinitionError(
                    f"outputs.{name}.from",
                    f"output {name!r} comes from {output.from_!r}, which is not a node of this pipeline",
                )
            )
        elif kinds[output.from_] != "task":
            # Approval and manual steps write no object, so there is nothing to persist.
            errors.append(
                DefinitionError(
                    f"outputs.{name}.from",
                    f"output {name!r} comes from {output.from_!r}, a {kinds[output.from_]} step; "
                    "an output must come from a task node (it persists what the task returns)",
                )
            )
        elif defn.nodes[first_index[output.from_]].map is not None:
            # A mapped node's result is a manifest of its children's outputs, not one object
            # an output schema could describe; a reducer downstream makes that object.
            errors.append(
                DefinitionError(
                    f"outputs.{name}.from",
                    f"output {name!r} comes from {output.from_!r}, which is mapped: an output cannot come "
                    "from a mapped node; take it from a node that reduces its items",
                )
            )
        if output.schema_ is not None:
            problem = json_schema_problem(output.schema_)
            if problem is not None:
                errors.append(DefinitionError(f"outputs.{name}.schema", f"not a valid JSON Schema: {problem}"))
    return errors


def _map_errors(defn: PipelineDefinition, list_name: str, first_index: Mapping[str, int]) -> list[DefinitionError]:
    """Problems of each node's `map.over` that need the graph: what it names must be a data
    upstream of the node. The syntax of `over` was checked by the model."""
    errors: list[DefinitionError] = []
    # A duplicate id is reported on its own; its first occurrence stands for it here, as in
    # the edges of _node_errors.
    by_id = {node_id: defn.nodes[i] for node_id, i in first_index.items()}
    for i, node in enumerate(defn.nodes):
        if node.map is None:
            continue
        path = f"{list_name}[{i}].map.over"
        source = node.map.source_node()
        if source is None:
            # A params path is not checked against the definition's params: a trigger or a
            # backfill may supply params the definition does not name.
            if MAP_PARAMS_SOURCE in node.depends and MAP_PARAMS_SOURCE in by_id:
                # `params.` always means the params, so an upstream node called `params`
                # cannot be mapped over; say so rather than silently read the params.
                errors.append(
                    DefinitionError(
                        path,
                        f"{node.map.over!r} reads the params, not the output of node "
                        f"{MAP_PARAMS_SOURCE!r}; rename that node to map over its output",
                    )
                )
            continue
        upstream = by_id.get(source)
        if source not in node.depends or source == node.id:
            usable = [
                dep for dep in dict.fromkeys(node.depends)
                if dep in by_id and dep != node.id and by_id[dep].kind == "task" and by_id[dep].map is None
            ]
            hint = (
                f"map over one of: {', '.join(usable)} (or add it to depends)"
                if usable
                else "add it to depends, or map over params.<name>"
            )
            errors.append(DefinitionError(path, f"{source!r} is not an upstream of {node.id!r}; {hint}"))
        elif upstream is None:
            continue  # a dependency on a missing node is already reported at its depends entry
        elif upstream.kind != "task":
            errors.append(
                DefinitionError(
                    path,
                    f"{source!r} is a {upstream.kind} step: its output is a decision, not data; "
                    "map over a task node's output",
                )
            )
        elif upstream.map is not None:
            errors.append(
                DefinitionError(
                    path,
                    f"nested maps are not supported: {source!r} is itself mapped; map over a node that reduces it",
                )
            )
    return errors


def json_schema_problem(schema: Mapping[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (Draft 2020-12), or None when it is."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"{exc.message}" + (f" (at {where})" if where else "")
    return None


# --- graph algorithms ----------------------------------------------------------------------


def _adjacency(edges: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Sorted, de-duplicated adjacency including vertices that only appear as dependencies."""
    adjacency: dict[str, list[str]] = {node: sorted(set(deps)) for node, deps in edges.items()}
    for deps in list(adjacency.values()):
        for dep in deps:
            adjacency.setdefault(dep, [])
    return adjacency


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle in `edges` (node -> its dependencies), or None if there is none.

    The cycle is closed by repeating its first element, each element depends on the next,
    and it is rotated to start at its smallest id. Vertices and edges are visited in sorted
    order, so the same graph always yields the same cycle.
    """
    adjacency = _adjacency(edges)
    # 0 = unvisited, 1 = on the current DFS path, 2 = finished.
    state: dict[str, int] = dict.fromkeys(adjacency, 0)
    for root in sorted(adjacency):
        if state[root]:
            continue
        # Explicit stack of (vertex, index of next dependency to visit) instead of recursion,
        # so that chains of many thousands of nodes do not hit the recursion limit.
        path: list[str] = [root]
        cursor: list[int] = [0]
        position: dict[str, int] = {root: 0}
        state[root] = 1
        while path:
            vertex = path[-1]
            deps = adjacency[vertex]
            if cursor[-1] == len(deps):
                state[vertex] = 2
                del position[vertex]
                path.pop()
                cursor.pop()
                continue
            dep = deps[cursor[-1]]
            cursor[-1] += 1
            if state[dep] == 1:
                body = path[position[dep] :]
                start = body.index(min(body))
                body = body[start:] + body[:start]
                return [*body, body[0]]
            if state[dep] == 0:
                state[dep] = 1
                position[dep] = len(path)
                path.append(dep)
                cursor.append(0)
    return None


def topological_order(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Every vertex once, dependencies before dependants, ties broken by smallest id."""
    adjacency = _adjacency(edges)
    waiting: dict[str, int] = {node: len(deps) for node, deps in adjacency.items()}
    dependants: dict[str, list[str]] = {node: [] for node in adjacency}
    for node, deps in adjacency.items():
        for dep in deps:
            dependants[dep].append(node)
    heap = [node for node, count in waiting.items() if count == 0]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        node = heapq.heappop(heap)
        order.append(node)
        for dependant in dependants[node]:
            waiting[dependant] -= 1
            if waiting[dependant] == 0:
                heapq.heappush(heap, dependant)
    if len(order) != len(adjacency):
        cycle = find_cycle(adjacency)
        shown = " -> ".join(cycle) if cycle else "unknown"
        raise ValueError(f"the graph has a cycle: {shown}")
    return order


# --- pipeline-level graph ------------------------------------------------------------------


class PipelineLinks(Protocol):
    """What the pipeline-level checks read of a pipeline: a definition, or a stored summary."""

    @property
    def depends(self) -> Sequence[PipelineDependency]: ...

    @property
    def outputs(self) -> Collection[str]: ...


@dataclass(frozen=True)
class LinkSummary:
    """A stored pipeline's `depends` and declared output names, without its definition."""

    depends: Sequence[PipelineDependency]
    outputs: Collection[str]


def pipeline_level_errors(definitions: Mapping[str, PipelineLinks]) -> list[DefinitionError]:
    """Problems of the `depends` between a set of pipelines (id -> definition or summary)."""
    errors: list[DefinitionError] = []
    edges: dict[str, set[str]] = {}
    for pipeline_id in sorted(definitions):
        definition = definitions[pipeline_id]
        edges[pipeline_id] = set()
        seen: dict[str, int] = {}
        for i, dep in enumerate(definition.depends):
            base = f"{pipeline_id}.depends[{i}]"
            if dep.pipeline in seen:
                errors.append(
                    DefinitionError(
                        f"{base}.pipeline",
                        f"pipeline {dep.pipeline!r} is listed more than once (also depends[{seen[dep.pipeline]}])",
                    )
                )
                continue
            seen[dep.pipeline] = i
            upstream = definitions.get(dep.pipeline)
            if upstream is None:
                errors.append(
                    DefinitionError(
                        f"{base}.pipeline",
                        f"pipeline {pipeline_id!r} depends on {dep.pipeline!r}, which does not exist",
                    )
                )
                continue
            edges[pipeline_id].add(dep.pipeline)
            for j, output in enumerate(dep.outputs):
                if output not in upstream.outputs:
                    declared = ", ".join(sorted(upstream.outputs)) or "none"
                    errors.append(
                        DefinitionError(
                            f"{base}.outputs[{j}]",
                            f"pipeline {dep.pipeline!r} does not declare an output {output!r} "
                            f"(it declares: {declared})",
                        )
                    )
    cycle = find_cycle(edges)
    if cycle is not None:
        errors.append(DefinitionError("depends", "pipeline cycle: " + " -> ".join(cycle)))
    return errors


# --- event-trigger graph -------------------------------------------------------------------


def event_trigger_cycle(definitions: Mapping[str, PipelineDefinition]) -> list[str] | None:
    """A cycle of pipelines starting each other through events, or None.

    Pipeline A leads to pipeline B when A `emits` an event that one of B's `triggers` names
    (filters are ignored: whether a payload will match is unknowable at registration, so a
    trigger that could fire counts). A pipeline that emits an event it is itself triggered by
    is a cycle of one, ["a", "a"]. The cycle reads in the direction events travel: each
    pipeline starts the next. Same graph, same cycle (find_cycle is deterministic).
    """
    triggered_by: dict[str, set[str]] = {}
    for pipeline_id, definition in definitions.items():
        for trigger in definition.triggers:
            triggered_by.setdefault(trigger.event, set()).add(pipeline_id)
    # find_cycle takes "node -> what it depends on"; an emitter "depends on" (is followed by)
    # the pipelines it starts, so the returned path follows the direction of the events.
    edges: dict[str, set[str]] = {pipeline_id: set() for pipeline_id in definitions}
    for pipeline_id, definition in definitions.items():
        for event in definition.emits:
            edges[pipeline_id].update(triggered_by.get(event, ()))
    return find_cycle(edges)


def event_cycle_message(cycle: Sequence[str], definitions: Mapping[str, PipelineDefinition]) -> str:
    """`event trigger cycle: a -> b -> a (a emits 'x' which triggers b; b emits 'y' ...)`."""
    links: list[str] = []
    for i in range(len(cycle) - 1):
        source, target = cycle[i], cycle[i + 1]
        triggers = {t.event for t in definitions[target].triggers}
        events = sorted(e for e in definitions[source].emits if e in triggers)
        shown = ", ".join(repr(e) for e in events)
        links.append(f"{source} emits {shown} which triggers {target}")
    return "event trigger cycle: " + " -> ".join(cycle) + " (" + "; ".join(links) + ")"
