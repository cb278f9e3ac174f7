"""The OpenAPI 3.1 document of the HTTP API, served at GET /api/openapi.json.

`OPERATIONS` is the table: one entry per (method, path) with its summary, tag, the role it
needs, request body model, query and header parameters, the response model of each success
status and the error statuses it can answer with (all in the one error shape). Schemas come
from the pydantic models (request bodies in orchestrator/api/schemas.py and the definition
models, answers in orchestrator/api/response_models.py) through `models_json_schema`, so the
document cannot drift from the models that validate requests.

`build_openapi(routes)` describes only the operations whose route the app really has: the
table may hold entries for routes being added (`PLANNED`), and they appear in the document
the moment their route is mounted. tests/integration/test_openapi.py checks both directions
(every route described, every table entry either mounted or in `PLANNED`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.routing import BaseRoute, Route

from orchestrator.api import response_models as r
from orchestrator.api.schemas import (
    ApprovalRequest,
    BackfillRequest,
    CallbackBatchRequest,
    CallbackRequest,
    CompleteRequest,
    EventRequest,
    HeartbeatRequest,
    KeyRequest,
    OrchestrationRequest,
    PurgeRequest,
    RegisterRequest,
    TriggerRequest,
)
from orchestrator.api.worker_reads import ReadUrls, ReadUrlsRequest
from orchestrator.engine.templates import TemplateDefinition
from orchestrator.model import PipelineDefinition
from orchestrator.model.notify import NotifyDefaults
from orchestrator.model.pipeline import EVENT_NAME_PATTERN, SLUG_PATTERN, TASK_NAME_PATTERN

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
MAX_PAGE_SIZE = 500  # keep in step with orchestrator.api.common.MAX_PAGE_SIZE

Auth = Literal["key", "tick", "none"]
Location = Literal["query", "header"]

_ERROR_TEXT: dict[int, str] = {
    400: "Bad request.",
    401: "No API key, or a key that is unknown or revoked.",
    403: "The key's role does not allow this action.",
    404: "No such object in the key's workspace (or a malformed id).",
    409: "The object's state does not allow this action.",
    413: "The request body is over the size limit.",
    422: "The request is invalid; `details` lists each problem with its path.",
    503: "The database is unavailable; retry shortly (`Retry-After`).",
}


@dataclass(frozen=True)
class Param:
    name: str
    location: Location
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    role: str | None = None  # the API key role needed when auth == "key"
    auth: Auth = "key"
    body: type[BaseModel] | None = None
    body_types: tuple[str, ...] = ("application/json",)
    body_required: bool = True
    params: tuple[Param, ...] = ()
    responses: dict[int, type[BaseModel]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    description: str = ""
    # More media types of a success status, e.g. {200: {"text/plain": {"type": "string"}}}.
    other_content: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.method.upper(), self.path


# --- parameters ----------------------------------------------------------------------------

_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
               "Page size.")
_CURSOR = Param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page.")
_PIPELINE_FILTER = Param("pipeline", "query", {"type": "string"}, "Only this pipeline's.")
_PAGE = (_LIMIT, _CURSOR)
MAX_TASK_PAGE = 200  # keep in step with orchestrator.engine.runs.MAX_TASK_PAGE
MAX_NODE_PAGE = 500  # and MAX_NODE_PAGE
_INCLUDE = Param("include", "query", {"type": "string", "enum": ["attempts"]},
                 "`attempts`: each task of the page with its last 10 attempts.")
_ITEMS = Param("items", "query", {"type": "boolean", "default": True},
               "`false`: leave map items (the tasks of a mapped node, one per item) out of the page.")
_IDEMPOTENCY_KEY = Param("Idempotency-Key", "header", {"type": "string", "minLength": 1, "maxLength": 255},
                         "A retry with the same key and the same body answers the same result (200) instead "
                         "of starting again; the same key with a different body is refused (422, "
                         "`idempotency_key_reused`).")

_UUID = {"type": "string", "format": "uuid"}
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "pipeline_id": {"type": "string", "pattern": SLUG_PATTERN},
    "template_id": {"type": "string", "pattern": SLUG_PATTERN},
    "task_name": {"type": "string", "pattern": TASK_NAME_PATTERN},
    "event_id": {"type": "string", "minLength": 1, "maxLength": 255},
    "run_id": _UUID,
    "task_id": _UUID,
    "entry_id": _UUID,
    "delivery_id": _UUID,
    "key_id": _UUID,
    "backfill_id": _UUID,
    "output_id": _UUID,
    "orchestration_id": _UUID,
    "attempt": {"type": "integer", "minimum": 1, "maximum": 2_147_483_647},
}

_AUTH_ERRORS = (401, 403, 503)
_DEFINITION_TYPES = ("application/json", "application/yaml")


def _op(
    method: str, path: str, summary: str, tag: str, role: str | None, ok: dict[int, type[BaseModel]], *,
    errors: Iterable[int] = (), **kw: Any,
) -> Operation:
    auth: Auth = kw.pop("auth", "key" if role else "none")
    base: tuple[int, ...] = {"key": _AUTH_ERRORS, "tick": (401, 503), "none": ()}[auth]
    if "{" in path:
        errors = (*errors, 404)
    if kw.get("body") is not None:
        errors = (*errors, 413, 422)
    if kw.get("params"):
        errors = (*errors, 422)
    return Operation(method, path, summary, tag, role, auth, responses=ok,
                     errors=tuple(sorted({*base, *errors})), **kw)


OPERATIONS: tuple[Operation, ...] = (
    # service
    _op("GET", "/health", "Liveness", "service", None, {200: r.HealthResponse}),
    _op("GET", "/api/info", "Version, mode, database and storage status", "service", None, {200: r.InfoResponse}),
    _op("GET", "/api/openapi.json", "This document", "service", None, {200: r.OpenAPIDocument}, errors=()),
    _op("POST", "/api/tick", "Run one tick", "service", None, {200: r.TickResponse}, auth="tick",
        description="Fires due schedules, expires leases, claims and dispatches ready tasks. Needs the tick "
                    "secret (`x-tick-secret`, or `Authorization: Bearer <tick secret>`), not an API key."),
    # pipelines
    _op("POST", "/api/pipelines", "Create a pipeline", "pipelines", "admin", {201: r.PipelineDetail},
        body=PipelineDefinition, body_types=_DEFINITION_TYPES, errors=(409,)),
    _op("GET", "/api/pipelines", "List pipelines with stats", "pipelines", "viewer", {200: r.PipelineList},
        params=_PAGE),
    _op("GET", "/api/pipelines/{pipeline_id}", "A pipeline with its definition and stats", "pipelines", "viewer",
        {200: r.PipelineDetail}),
    _op("PUT", "/api/pipelines/{pipeline_id}", "New version of a pipeline", "pipelines", "admin",
        {200: r.PipelineSaved}, body=PipelineDefinition, body_types=_DEFINITION_TYPES, errors=(409,)),
    _op("DELETE", "/api/pipelines/{pipeline_id}", "Delete a pipeline (its history stays readable)", "pipelines",
        "admin", {200: r.PipelineDeleted}, errors=(409,),
        params=(Param("cancel_runs", "query", {"type": "boolean", "default": False},
                      "Cancel its pending and running runs first (else such runs refuse the delete: 409)."),),
        description="Its schedules stop; its runs, tasks, outputs and dead letters stay readable; it leaves the "
                    "lists and GET answers 404. Refused (409) while other pipelines' `depends` name it. POST a "
                    "definition with the same id to create it anew (its versions continue)."),
    _op("POST", "/api/pipelines/validate", "Validate definitions without storing them", "pipelines", "viewer",
        {200: r.AnyObject}, body=r.AnyJSON, body_types=_DEFINITION_TYPES,
        description="One definition, a list of them, or `{\"pipelines\": [...]}`; nothing is stored."),
    _op("POST", "/api/pipelines/{pipeline_id}/pause", "Pause schedules and triggers", "pipelines", "operator",
        {200: r.Pipeline}, errors=(409,)),
    _op("POST", "/api/pipelines/{pipeline_id}/resume", "Resume schedules and triggers", "pipelines", "operator",
        {200: r.Pipeline}, errors=(409,)),
    _op("GET", "/api/schedules", "Schedules with next fire times", "pipelines", "viewer", {200: r.ScheduleList},
        params=(_PIPELINE_FILTER,)),
    # runs
    _op("POST", "/api/pipelines/{pipeline_id}/runs", "Trigger a run", "runs", "operator",
        {201: r.TriggeredRun, 200: r.TriggeredRun}, body=TriggerRequest, body_required=False,
        params=(_IDEMPOTENCY_KEY,),
        errors=(409,)),
    _op("POST", "/api/orchestrations", "Trigger a set of pipelines as one orchestration", "runs", "operator",
        {201: r.AnyObject, 200: r.AnyObject}, body=OrchestrationRequest, params=(_IDEMPOTENCY_KEY,),
        errors=(404, 409)),
    _op("GET", "/api/orchestrations/{orchestration_id}", "An orchestration with its runs", "runs", "viewer",
        {200: r.AnyObject}),
    _op("POST", "/api/pipelines/{pipeline_id}/backfill", "Backfill schedule slots of a past range", "runs",
        "operator", {201: r.BackfillStarted, 200: r.BackfillStarted}, body=BackfillRequest, errors=(409,),
        description="A dry run (`dry_run: true`) answers 200 with the plan; otherwise 201."),
    _op("GET", "/api/backfills/{backfill_id}", "A backfill with its runs", "runs", "viewer", {200: r.Backfill}),
    _op("POST", "/api/backfills/{backfill_id}/cancel", "Cancel a backfill and its unfinished runs", "runs",
        "operator", {200: r.BackfillCancelled}, errors=(409,)),
    _op("GET", "/api/runs", "List runs, newest first", "runs", "viewer", {200: r.RunList},
        params=(_PIPELINE_FILTER,
                Param("status", "query", {"type": "string", "enum": list(get_args(r.RunStatus))}),
                *_PAGE)),
    _op("GET", "/api/runs/{run_id}", "A run: its tasks counted by status and node, and a first page of them",
        "runs", "viewer", {200: r.Run},
        params=(Param("limit", "query", {"type": "integer", "minimum": 0, "maximum": MAX_TASK_PAGE},
                      "Size of the first page of tasks (default 100)."), _INCLUDE, _ITEMS),
        description="Bounded whatever the size of the run: `counts` and `nodes` count its tasks, `tasks` is "
                    "the first page; GET /api/runs/{run_id}/tasks and /nodes page through the rest. A mapped "
                    "node is one entry of `nodes` (`kind: map`, its items counted in `map.items`); `counts` "
                    "counts every task, map items included, and `map_items` the items alone."),
    _op("GET", "/api/runs/{run_id}/tasks", "A page of a run's tasks", "runs", "viewer", {200: r.TaskPage},
        params=(Param("status", "query", {"type": "string", "enum": list(get_args(r.TaskStatus))}, "Only tasks in this status."),
                Param("node", "query", {"type": "string", "maxLength": 255}, "Only this node's tasks."),
                Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_TASK_PAGE},
                      "Page size (default 100)."),
                _CURSOR, _INCLUDE, _ITEMS),
        description="In (node, version, map_index) order, keyset-paginated: pass `next_cursor` (or a run "
                    "answer's `tasks_next_cursor`) as `cursor` with the same filters. With `node` naming a "
                    "mapped node: its map node, then its items in index order (`map_index`, `map_item`)."),
    _op("GET", "/api/runs/{run_id}/nodes", "A page of a run's nodes with their tasks counted by status", "runs",
        "viewer", {200: r.NodePage},
        params=(Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_NODE_PAGE},
                      "Page size (default 100)."), _CURSOR),
        description="In definition order; pass `next_cursor` (or a run answer's `nodes_next_cursor`) as `cursor`. "
                    "A mapped node is one entry with `map`: what it maps over, its width and its items by status."),
    _op("POST", "/api/runs/{run_id}/cancel", "Cancel a run", "runs", "operator", {200: r.Run}, errors=(409,)),
    _op("POST", "/api/runs/{run_id}/retry", "Redrive a failed run from its failed tasks", "runs", "operator",
        {200: r.RetriedRun}, errors=(409,)),
    _op("GET", "/api/tasks/{task_id}", "A task with its attempts", "runs", "viewer", {200: r.Task},
        description="A map node has `map` (spec, width, items by status) and, once settled, its manifest "
                    "reference as `output`; a map item has `map_index`, `map_item` and `map_parent_id`."),
    _op("GET", "/api/tasks/{task_id}/attempts/{attempt}/log", "The log of one attempt of a task", "runs", "viewer",
        {200: r.AnyJSON}, other_content={200: {"text/plain": {"type": "string"}}},
        params=(Param("offset", "query", {"type": "integer", "minimum": 0},
                      "Byte offset into the log: the answer holds the bytes from there on (default 0)."),),
        description="`text/plain; charset=utf-8`: what the task logged and printed during that attempt (the "
                    "worker SDK keeps the first 1 MiB, then a `[log truncated: N bytes dropped]` line). "
                    "`X-Log-Size`: the stored log's size in bytes now; `X-Log-Complete`: `true` once the attempt "
                    "is finished (the log will not change), else `false` (poll again from offset X-Log-Size). "
                    "While the attempt runs and has stored nothing yet: an empty body. 404: the task or "
                    "attempt is not in the key's workspace, or the finished attempt stored no log."),
    _op("GET", "/api/tasks/{task_id}/output", "The content of a task's stored output", "runs", "viewer",
        {200: r.AnyJSON},
        description="What the task's successful attempt wrote, whether or not the pipeline declares it under "
                    "`outputs:`. 404: not a task of the key's workspace, or it has no stored output."),
    _op("POST", "/api/tasks/{task_id}/complete", "Advance a manual step", "runs", "operator", {200: r.Decision},
        body=CompleteRequest, errors=(409,)),
    _op("POST", "/api/approvals/{task_id}", "Approve or reject an approval step", "runs", "operator",
        {200: r.Decision}, body=ApprovalRequest, errors=(409,)),
    # events
    _op("POST", "/api/events", "Post an external event (once per event id)", "events", "operator",
        {201: r.EventRecorded, 200: r.EventRecorded}, body=EventRequest, errors=(409,)),
    _op("GET", "/api/events", "List events, newest first", "events", "viewer", {200: r.EventList},
        params=(Param("name", "query", {"type": "string", "pattern": EVENT_NAME_PATTERN}), *_PAGE)),
    _op("GET", "/api/events/{event_id}", "An event with the runs it started", "events", "viewer", {200: r.Event}),
    # dead letters
    _op("GET", "/api/dlq", "Dead letters, newest first", "dlq", "viewer", {200: r.DeadLetterList},
        params=(_PIPELINE_FILTER,
                Param("include_retried", "query", {"type": "boolean"}, "Also entries already retried."),
                *_PAGE)),
    _op("POST", "/api/dlq/purge", "Delete dead letters older than a number of days", "dlq", "operator",
        {200: r.Purged}, body=PurgeRequest),
    _op("GET", "/api/dlq/{entry_id}", "A dead letter with every attempt", "dlq", "viewer", {200: r.DeadLetter},
        errors=(422,)),
    _op("POST", "/api/dlq/{entry_id}/retry", "Retry a dead-lettered task", "dlq", "operator", {200: r.DeadLetterRetried},
        errors=(409,)),
    # notifications
    _op("GET", "/api/notifications", "Notification deliveries, newest first", "notifications", "viewer",
        {200: r.NotificationDeliveryList},
        params=(Param("status", "query", {"type": "string", "enum": ["pending", "sending", "delivered", "failed"]}),
                *_PAGE)),
    _op("GET", "/api/notifications/defaults", "The workspace's default notification targets", "notifications",
        "admin", {200: r.NotificationDefaults}),
    _op("PUT", "/api/notifications/defaults", "Set the workspace's default notification targets", "notifications",
        "admin", {200: r.NotificationDefaults}, body=NotifyDefaults),
    _op("GET", "/api/notifications/secret", "The webhook signing secret (made on first use)", "notifications",
        "admin", {200: r.NotificationSecret}),
    _op("POST", "/api/notifications/secret", "Rotate the webhook signing secret", "notifications", "admin",
        {200: r.NotificationSecret}, body_required=False,
        description="The previous secret keeps signing alongside the new one for TICKWEAVE_NOTIFY_SECRET_GRACE_S "
                    "(default a day)."),
    _op("GET", "/api/notifications/{delivery_id}", "A delivery with its attempts and event", "notifications",
        "viewer", {200: r.NotificationDeliveryDetail}),
    _op("POST", "/api/notifications/{delivery_id}/retry", "One more attempt for a failed delivery",
        "notifications", "operator", {200: r.NotificationRetried}, body_required=False, errors=(409,)),
    # templates
    _op("POST", "/api/templates", "Create a node template", "templates", "admin", {201: r.TemplateDetail},
        body=TemplateDefinition, body_types=_DEFINITION_TYPES, errors=(409,)),
    _op("GET", "/api/templates", "List templates", "templates", "viewer", {200: r.TemplateList}, params=_PAGE),
    _op("GET", "/api/templates/{template_id}", "A template", "templates", "viewer", {200: r.TemplateDetail}),
    _op("PUT", "/api/templates/{template_id}", "New version of a template", "templates", "admin",
        {200: r.TemplateSaved}, body=TemplateDefinition, body_types=_DEFINITION_TYPES, errors=(409,)),
    # outputs and metrics
    _op("GET", "/api/outputs", "Persisted pipeline outputs", "outputs", "viewer", {200: r.ItemsPage},
        params=(_PIPELINE_FILTER, Param("version", "query", {"type": "string"}),
                Param("output", "query", {"type": "string"}), *_PAGE)),
    _op("GET", "/api/outputs/{output_id}", "A persisted output", "outputs", "viewer", {200: r.AnyObject}),
    _op("GET", "/api/outputs/{output_id}/content", "The content of a persisted output", "outputs", "viewer",
        {200: r.AnyJSON}),
    _op("GET", "/api/metrics", "Counts, durations, failure breakdown, approval rates", "metrics", "viewer",
        {200: r.AnyObject}, other_content={200: {"text/plain": {"type": "string"}}},
        params=(Param("format", "query", {"type": "string", "enum": ["json", "prometheus"]},
                      "`prometheus` answers in the Prometheus text format (also chosen by `Accept: text/plain`)."),
                Param("window", "query", {"type": "string"}, "`3600`, `90s`, `15m`, `1h`, `7d`, `2w`; default 24h."),
                _PIPELINE_FILTER)),
    # workers
    _op("POST", "/api/workers/register", "Register a worker service and its tasks", "workers", "admin",
        {200: r.WorkerRegistered}, body=RegisterRequest, errors=(409,)),
    _op("GET", "/api/workers", "Registered worker services", "workers", "viewer", {200: r.WorkerList}),
    _op("GET", "/api/task-definitions/{task_name}/history", "Code versions of a task name", "workers", "viewer",
        {200: r.TaskHistory}),
    _op("POST", "/api/callback/{task_id}", "Worker callback: the outcome of an attempt", "worker protocol", None,
        {200: r.CallbackResult, 404: r.CallbackFailure, 409: r.CallbackFailure}, body=CallbackRequest,
        auth="none", errors=(401, 403, 503),
        description="Authenticated by the task token in the body. A duplicate callback answers 200 and "
                    "changes nothing; one for a stale attempt or a finished task answers 409."),
    _op("POST", "/api/callbacks", "Worker callbacks: the outcomes of many attempts at once", "worker protocol",
        None, {200: r.CallbackBatchResult}, body=CallbackBatchRequest, auth="none", errors=(503,),
        description="Each callback is authenticated by its own task token, fenced and answered alone, in the "
                    "order sent: `results[i].status` is what `POST /api/callback/{task_id}` would answer for "
                    "it (200, 401, 404, 409, 422), and a refused one refuses nothing else. The request as a "
                    "whole answers 413 (body over the limit) or 422 (not `{\"callbacks\": [...]}`, an empty "
                    "list, more than `TICKWEAVE_MAX_CALLBACKS_PER_BATCH` callbacks, default 100), and then "
                    "nothing is recorded."),
    _op("POST", "/api/worker/read-urls", "Presigned GET URLs of mapped items for a reducer", "worker protocol", None,
        {200: ReadUrls}, body=ReadUrlsRequest, auth="none", errors=(401, 403, 503),
        description="Authenticated by the task token in the body; each key must be under a read prefix of the "
                    "token's storage grant (the children's outputs of a map node the task reads); at most 500 keys."),
    _op("POST", "/api/heartbeat", "Worker heartbeat", "worker protocol", None,
        {200: r.HeartbeatAccepted, 409: r.HeartbeatFailure}, body=HeartbeatRequest, auth="none",
        errors=(401, 403, 503), description="Authenticated by the task token in the body."),
    # keys
    _op("POST", "/api/keys", "Create an API key (shown once)", "keys", "admin", {201: r.KeyCreated},
        body=KeyRequest),
    _op("GET", "/api/keys", "The workspace's API keys (never the keys themselves)", "keys", "admin",
        {200: r.ApiKeyList}),
    _op("DELETE", "/api/keys/{key_id}", "Revoke an API key", "keys", "admin", {200: r.KeyRevoked}, errors=(409,)),
)

# Operations whose routes are being added; until they are mounted they stay out of the document.
PLANNED: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/api/outputs"),
    ("GET", "/api/outputs/{output_id}"),
    ("GET", "/api/outputs/{output_id}/content"),
    ("GET", "/api/orchestrations/{orchestration_id}"),
    ("POST", "/api/orchestrations"),
    ("POST", "/api/pipelines/validate"),
    ("GET", "/api/metrics"),
})

# Routes that are not JSON API operations.
UNDOCUMENTED_PATHS: frozenset[str] = frozenset({"/"})

_CONVERTOR = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def route_operations(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """(METHOD, path template) of every Route (Mounts, e.g. static files, and the dashboard excluded)."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if not isinstance(route, Route) or route.path in UNDOCUMENTED_PATHS:
            continue
        path = _CONVERTOR.sub(r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, path))
    return found


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[{}]", "", op.path.removeprefix("/api")).replace(".", "_").strip("/").replace("/", "_")
    return f"{op.method.lower()}_{words.replace('-', '_') or 'root'}"


def _security(op: Operation) -> list[dict[str, list[str]]]:
    if op.auth == "key":
        return [{"bearerAuth": []}, {"apiKeyHeader": []}]
    if op.auth == "tick":
        return [{"tickSecret": []}, {"tickBearer": []}]
    return []


Refs = dict[tuple[Any, str], dict[str, Any]]  # (model, json schema mode) -> {"$ref": ...}


def _components(ops: Sequence[Operation]) -> tuple[Refs, dict[str, Any]]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(r.ErrorResponse, "serialization")]
    for op in ops:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        wanted += [(model, "serialization") for model in op.responses.values()]
    unique = list(dict.fromkeys(wanted))
    refs, defs = models_json_schema(unique, ref_template=REF_TEMPLATE)
    found: Refs = {}
    for key, schema in refs.items():
        found[key] = schema
    return found, defs.get("$defs", {})


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": _ERROR_TEXT.get(status, "Error."),
        "content": {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}},
    }


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in re.findall(r"\{([^}]+)\}", op.path):
        params.append({"name": name, "in": "path", "required": True,
                       "schema": _PATH_PARAMS.get(name, {"type": "string"})})
    for p in op.params:
        entry: dict[str, Any] = {"name": p.name, "in": p.location, "required": p.required, "schema": p.schema}
        if p.description:
            entry["description"] = p.description
        params.append(entry)
    return params


def _operation(op: Operation, refs: Refs) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": _operation_id(op), "summary": op.summary, "tags": [op.tag], "security": _security(op),
    }
    if op.description:
        doc["description"] = op.description
    if op.role:
        doc["x-required-role"] = op.role
        doc["description"] = (op.description + "\n\n" if op.description else "") + f"Needs the `{op.role}` role."
    params = _parameters(op)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        schema = refs[(op.body, "validation")]
        doc["requestBody"] = {"required": op.body_required,
                              "content": {media: {"schema": schema} for media in op.body_types}}
    responses: dict[str, Any] = {}
    for status, model in sorted(op.responses.items()):
        responses[str(status)] = {
            "description": (model.__doc__ or "").strip().split("\n")[0] or "OK",
            "content": {"application/json": {"schema": refs[(model, "serialization")]},
                        **{media: {"schema": schema} for media, schema in op.other_content.get(status, {}).items()}},
        }
    for status in op.errors:
        responses.setdefault(str(status), _error_response(status))
    doc["responses"] = responses
    return doc


def build_openapi(routes: Sequence[BaseRoute], *, version: str = "0+unknown") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the operations in OPERATIONS whose route is in `routes`."""
    mounted = route_operations(routes)
    ops = [op for op in OPERATIONS if op.key in mounted]
    refs, defs = _components(ops)
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Tickweave",
            "version": version,
            "description": "A serverless, tick-driven pipeline orchestrator. Every error is "
                           '`{"error": {"code", "message", "details"}}`.',
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": tag} for tag in dict.fromkeys(op.tag for op in ops)],
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer <key>`."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                 "description": "An API key in the `x-api-key` header."},
                "tickSecret": {"type": "apiKey", "in": "header", "name": "x-tick-secret",
                               "description": "The tick secret (POST /api/tick only)."},
                "tickBearer": {"type": "http", "scheme": "bearer",
                               "description": "The tick secret as `Authorization: Bearer <tick secret>`."},
            },
        },
    }
