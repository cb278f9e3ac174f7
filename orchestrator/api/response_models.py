"""Pydantic models of every JSON answer of the API, for the OpenAPI document.

They describe, they do not serialize: handlers still build plain dicts and `responses.JSON`
turns datetimes into RFC 3339 strings ending in `Z` and UUIDs into their canonical strings.
So `datetime` and `uuid.UUID` fields here are emitted as `{"type": "string", "format":
"date-time" | "uuid"}`, which is what goes over the wire. Every model allows extra properties:
rows may grow columns, and a client must ignore what it does not know. Declared fields carry
the exact type and are nullable only where the column or value can be null.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
RunTrigger = Literal["manual", "schedule", "pipeline", "event", "api"]
TaskStatus = Literal[
    "pending", "ready", "dispatched", "running", "waiting", "succeeded", "failed", "skipped", "cancelled"
]
DEAD_LETTERED = ("True while the task is in the dead-letter queue: it failed (a worker's task out of attempts, "
                 "or not retryable) and its entry was not retried or purged.")
TaskKind = Literal["task", "approval", "manual", "map"]
Role = Literal["viewer", "operator", "admin"]


class Loose(BaseModel):
    """Base of every response model: unknown properties are allowed (and kept)."""

    model_config = ConfigDict(extra="allow")


# --- errors --------------------------------------------------------------------------------


class ErrorBody(Loose):
    code: str = Field(description="Machine-readable: not_found, invalid, conflict, unauthorized, ...")
    message: str = Field(description="What went wrong, for a person.")
    details: Any = Field(description="Per-field problems (`[{path, message}]`) or null.")


class ErrorResponse(Loose):
    """The one error shape of the API."""

    error: ErrorBody


class RefusalBody(Loose):
    code: str
    message: str
    details: Any = None


# --- service -------------------------------------------------------------------------------


class HealthResponse(Loose):
    status: str


class InfoResponse(Loose):
    version: str
    mode: str
    database: str = Field(description="`ok` or `error: <ExceptionType>`")
    storage: str = Field(description="`ok` or `error: <ExceptionType>`")
    transports: list[str]


class TickResponse(Loose):
    schedules_fired: int
    scheduled_runs: int
    slots_skipped: int
    queued_runs_started: int
    expired: int
    waits_expired: int
    maps_resolved: int = Field(default=0, description="map nodes the tick expanded or settled (a safety net)")
    dead_letters_purged: int = Field(default=0, description="dead letters past TICKWEAVE_DLQ_RETENTION_DAYS, "
                                                            "purged (batch after batch, within the deadline)")
    notifications_delivered: int = 0
    notifications_retrying: int = Field(default=0, description="notification attempts that failed and will be retried")
    notifications_failed: int = Field(default=0, description="notification deliveries given up")
    claimed: int
    dispatched: int
    dispatch_failed: int
    batches: int
    deadline_s: float | None = Field(default=None, description="seconds the tick had (its deadline, when it began); "
                                                               "null: none")
    deadline_stopped: list[str] = Field(default_factory=list, description="steps the deadline stopped with work "
                                                                          "possibly left (the next tick goes on)")
    durations_ms: dict[str, float]


class OpenAPIDocument(Loose):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


# --- pipelines and schedules -----------------------------------------------------------------


class Schedule(Loose):
    id: uuid.UUID
    pipeline: str
    position: int
    cron: str
    timezone: str
    state: Literal["active", "paused", "ended"]
    catchup: Literal["none", "latest", "all"]
    max_catchup_runs: int
    overlap: Literal["allow", "skip", "buffer_one", "cancel_other"]
    jitter_s: int
    start_at: datetime | None
    end_at: datetime | None
    next_fire_at: datetime | None
    next_fire_times: list[datetime]
    last_fired_slot: datetime | None
    last_fired_at: datetime | None
    skipped_slots: int


class ScheduleList(Loose):
    items: list[Schedule]


class PipelineStats(Loose):
    use_count: int
    last_used_at: datetime | None
    runs_by_status: dict[str, int]


class Pipeline(Loose):
    id: str
    name: str | None = Field(description="The display name (`name` in the definition); null when it has none.")
    version: int
    sha256: str
    paused: bool
    created_at: datetime
    updated_at: datetime
    description: str
    stats: PipelineStats
    next_fire_times: list[datetime]
    schedules: list[Schedule]


class TemplateRef(Loose):
    template: str
    version: int


class PipelineDetail(Pipeline):
    definition: dict[str, Any] = Field(description="The resolved (executable) definition.")
    source_definition: dict[str, Any] | None = Field(
        description="The definition as written, when it names templates; null otherwise."
    )
    templates: dict[str, TemplateRef] = Field(description="Node id -> the template version it resolved against.")


class PipelineSaved(PipelineDetail):
    changed: bool = Field(description="False when the definition equals the current version (no new version).")


class PipelineList(Loose):
    items: list[Pipeline]
    next_cursor: str | None


class PipelineDeleted(Loose):
    deleted: str = Field(description="The id of the pipeline deleted.")
    cancelled_runs: int = Field(description="Runs cancelled first (with `cancel_runs=true`).")


# --- runs and tasks ----------------------------------------------------------------------------


class RunSummary(Loose):
    id: uuid.UUID
    pipeline_id: str
    pipeline_version: int
    status: RunStatus
    trigger: RunTrigger
    scheduled_at: datetime | None
    triggered_by: str | None = Field(description="The name of the API key that started it (its first "
                                                 "characters when the key has no name, and for runs started "
                                                 "before keys' names were recorded); null for schedules.")
    event_id: str | None = Field(description="The event that started it (trigger `event`); null otherwise.")
    schedule_id: uuid.UUID | None
    versions: list[str] = Field(description="The run's first 20 versions; `version_count` has the number.")
    version_count: int
    unfinished_tasks: int
    failed_tasks: int = Field(description="The run's tasks that failed, map items included (a tolerated "
                                          "failure, `on_failure: continue`, counts too).")
    succeeded_with_failures: bool = Field(description="Succeeded, with failed tasks its `on_failure: continue` "
                                                      "or `tolerated_failures` let it go past.")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunList(Loose):
    items: list[RunSummary]
    next_cursor: str | None


class AttemptOfTask(Loose):
    attempt: int
    status: str
    dispatched_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: Any = Field(description="Cut to a few hundred characters; GET /api/tasks/{id} has it whole.")
    code_version: str | None


class MapSummary(Loose):
    """A mapped node (or one map node): what it maps over, its limits, and its items."""

    over: str | None = Field(description="The list mapped over: `<node>.<path>` or `params.<name>`.")
    width: int | None = Field(description="Its items (over its versions, for a node); null until expanded.")
    max_concurrency: int | None
    tolerated_failures: int | str = Field(description="A count, or a percentage such as \"10%\".")
    items: dict[str, int] = Field(description="Its items by status (statuses with none are left out).")


class TaskOfRun(Loose):
    """A task of a run in a page: bounded (`GET /api/tasks/{id}` has every detail). A map item
    (a task of a mapped node for one item) has `map_index`, `map_item` and `map_parent_id`; a
    map node (kind `map`) has `map`."""

    id: uuid.UUID
    node: str
    version: str
    position: int = Field(description="The node's index in the pipeline definition.")
    kind: TaskKind
    task: str | None
    status: TaskStatus
    attempt: int
    max_attempts: int
    depends: list[str] = Field(description="Upstream nodes, the first 50 by id; `depends_count` has the number. "
                                           "A map node's never list its items; a map item has none.")
    depends_count: int
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    progress: float | None
    message: str | None
    output: Any = Field(description="Whole when small; else its scalar fields and `truncated: true`.")
    error: Any = Field(description="Whole when small; else its scalar fields and `truncated: true`.")
    dead_lettered: bool = Field(description=DEAD_LETTERED)
    attempts: list[AttemptOfTask] | None = Field(
        default=None, description="With `include=attempts`: the task's last 10 attempts, oldest first.")
    map_index: int | None = Field(default=None, description="A map item's index in the list (from 0).")
    map_item: Any = Field(default=None, description="A map item's item, bounded like `output`.")
    map_parent_id: uuid.UUID | None = Field(default=None, description="A map item's map node.")
    map: MapSummary | None = Field(default=None, description="A map node's spec, width and items by status.")


class TaskPage(Loose):
    """A page of a run's tasks, in (node, version, map_index) order: a map node, then its items."""

    items: list[TaskOfRun]
    next_cursor: str | None


class NodeCounts(Loose):
    """A node of a run, a mapped node included (one entry, its items counted in `map`)."""

    node: str
    position: int = Field(description="The node's index in the pipeline definition.")
    kind: TaskKind
    task: str | None
    status: TaskStatus | None = Field(description=(
        "The first of running, dispatched, ready, waiting, pending, failed, cancelled, skipped, "
        "succeeded that one of its tasks has."))
    tasks: int = Field(description="The node's tasks: one per version of the run (a mapped node's map nodes; "
                                   "its items are in `map`).")
    counts: dict[str, int] = Field(description="The node's tasks by status (statuses with none are left out).")
    map: MapSummary | None = Field(default=None, description="A mapped node: its spec, width and items by status.")


class NodePage(Loose):
    """A page of a run's nodes with their tasks counted by status, in definition order."""

    items: list[NodeCounts]
    next_cursor: str | None


class Run(Loose):
    """A run: its tasks counted by status and by node, and the first page of each."""

    id: uuid.UUID
    workspace_id: str
    pipeline_id: str
    pipeline_version: int
    status: RunStatus
    trigger: RunTrigger
    trigger_source_execution_id: uuid.UUID | None
    trigger_source_pipeline_id: str | None
    scheduled_at: datetime | None
    triggered_by: str | None
    event_id: str | None
    idempotency_key: str | None
    params: dict[str, Any]
    versions: list[str]
    unfinished_tasks: int
    failed_tasks: int = Field(description="The run's tasks that failed, map items included (a tolerated "
                                          "failure, `on_failure: continue`, counts too).")
    succeeded_with_failures: bool = Field(description="Succeeded, with failed tasks its `on_failure: continue` "
                                                      "or `tolerated_failures` let it go past.")
    error: str | None
    schedule_id: uuid.UUID | None
    backfill_id: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params_truncated: bool = Field(description="True when `params` was too large to answer whole: the "
                                                "parameters that fit are shown.")
    task_count: int = Field(description="Every task of the run, map items included.")
    node_count: int
    item_count: int = Field(description="The run's map items (tasks of mapped nodes, one per item).")
    counts: dict[str, int] = Field(description="Tasks by status, map items included (statuses with none are "
                                               "left out); an expanded map node waiting for its items is running.")
    map_items: dict[str, int] = Field(description="The map items alone by status: `counts` minus these counts "
                                                  "the run by node and version.")
    nodes: list[NodeCounts] = Field(description="The first page of nodes; GET /api/runs/{id}/nodes has the rest.")
    nodes_next_cursor: str | None
    tasks: list[TaskOfRun] = Field(description="The first page of tasks; GET /api/runs/{id}/tasks has the rest.")
    tasks_next_cursor: str | None
    outputs_truncated: bool


class TriggeredRun(Run):
    created: bool = Field(description="False when the Idempotency-Key named an existing run (answered with 200).")


class RetriedRun(Run):
    retried_tasks: int


class Attempt(Loose):
    task_id: uuid.UUID
    attempt: int
    status: str
    dispatched_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: Any
    code_version: str | None


class Task(Loose):
    id: uuid.UUID
    run_id: uuid.UUID
    pipeline_id: str
    node_id: str
    version: str
    kind: TaskKind
    task_name: str | None
    status: TaskStatus
    attempt: int
    max_attempts: int
    params: dict[str, Any]
    params_truncated: bool = Field(description="True when `params` was too large to answer whole: the "
                                                "parameters that fit are shown.")
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    progress: float | None
    message: str | None
    output: Any = Field(description="A settled map node's: its manifest reference (`key`, `manifest: true`, "
                                    "`count`, `succeeded`, `failed`, `skipped`, `items_prefix`).")
    error: Any
    dead_lettered: bool = Field(description=DEAD_LETTERED)
    code_version: str | None
    depends: list[str] = Field(description="Upstream nodes, the first 50 by id (a map node's never list its items; "
                                           "a map item has none).")
    depends_count: int
    attempts: list[Attempt]
    map_index: int | None = Field(default=None, description="A map item's index in the list (from 0).")
    map_item: Any = Field(default=None, description="A map item's item, whole.")
    map_parent_id: uuid.UUID | None = Field(default=None, description="A map item's map node.")
    map: MapSummary | None = Field(default=None, description="A map node's spec, width and items by status.")


class Decision(Loose):
    task_status: str | None
    run_id: uuid.UUID | None
    run_status: str | None
    newly_ready: int


# --- events ------------------------------------------------------------------------------------


class EventRun(Loose):
    id: uuid.UUID
    pipeline_id: str
    status: RunStatus


class Event(Loose):
    id: str
    name: str
    payload: dict[str, Any]
    received_by: str | None
    received_at: datetime
    runs: list[EventRun]


class EventRecorded(Event):
    created: bool = Field(description="False when this event id was recorded before (answered with 200).")


class EventList(Loose):
    items: list[Event]
    next_cursor: str | None


# --- dead letters ------------------------------------------------------------------------------


class DeadLetter(Loose):
    id: uuid.UUID
    workspace_id: str
    pipeline_id: str
    run_id: uuid.UUID
    task_id: uuid.UUID
    node_id: str
    version: str
    task_name: str | None
    inputs: dict[str, Any]
    attempts: list[Any]
    error: Any
    code_version: str | None
    created_at: datetime
    retried_at: datetime | None


class DeadLetterList(Loose):
    items: list[DeadLetter]
    next_cursor: str | None


class DeadLetterRetried(Loose):
    dead_letter: DeadLetter
    run_id: uuid.UUID
    run_status: RunStatus


class Purged(Loose):
    purged: int


# --- notifications -----------------------------------------------------------------------------


DeliveryStatus = Literal["pending", "sending", "delivered", "failed"]


class NotificationDelivery(Loose):
    id: uuid.UUID
    event_id: uuid.UUID = Field(description="The same for every target and attempt: receivers drop duplicates by it.")
    event_type: str
    pipeline_id: str
    run_id: uuid.UUID
    task_id: uuid.UUID | None
    target_kind: Literal["webhook", "sns"]
    target: str = Field(description="A webhook's scheme and host only (its path may carry a secret); an SNS topic ARN.")
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    http_status: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


class NotificationDeliveryDetail(NotificationDelivery):
    history: list[dict[str, Any]] = Field(description="One entry per attempt: attempt, at, ok, http_status, error, duration_ms.")
    event: dict[str, Any]


class NotificationDeliveryList(Loose):
    items: list[NotificationDelivery]
    next_cursor: str | None


class NotificationRetried(Loose):
    id: uuid.UUID
    status: DeliveryStatus
    next_attempt_at: datetime | None


class NotificationDefaults(Loose):
    notify: list[dict[str, Any]] | None = Field(description="Targets for pipelines without `notify`; null: none.")
    updated_at: datetime | None


class NotificationSecret(Loose):
    secret: str = Field(description="Webhook bodies are signed with it (X-Tickweave-Signature).")
    rotated_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="Until then the previous secret signs too (a second signature in the header).")


# --- keys --------------------------------------------------------------------------------------


class KeyCreated(Loose):
    id: uuid.UUID
    key: str = Field(description="The key itself: shown here once, stored only as a digest.")
    workspace: str
    role: Role
    name: str


class ApiKey(Loose):
    id: uuid.UUID
    prefix: str
    role: Role
    name: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyList(Loose):
    items: list[ApiKey]


class KeyRevoked(Loose):
    id: uuid.UUID
    revoked: bool


# --- templates ---------------------------------------------------------------------------------


class Template(Loose):
    id: str
    version: int
    sha256: str
    task: str | None
    description: str
    created_at: datetime
    updated_at: datetime
    used_by: list[str] = Field(description="Pipelines whose current version uses this template.")


class TemplateDetail(Template):
    body: dict[str, Any]


class TemplateSaved(TemplateDetail):
    changed: bool


class TemplateList(Loose):
    items: list[Template]
    next_cursor: str | None


# --- backfills ---------------------------------------------------------------------------------


class BackfillSlot(Loose):
    slot: datetime
    action: Literal["run", "skip"]
    reason: str | None


class BackfillStarted(Loose):
    pipeline: str
    dry_run: bool
    slots: list[BackfillSlot]
    runs: int
    skipped: int
    id: uuid.UUID | None = Field(default=None, description="Absent on a dry run.")
    run_ids: list[uuid.UUID] | None = Field(default=None, description="Absent on a dry run.")


class BackfillRun(Loose):
    id: uuid.UUID
    scheduled_at: datetime | None
    status: RunStatus
    created_at: datetime
    finished_at: datetime | None
    failed_tasks: int = Field(description="The run's tasks that failed, map items included (a tolerated "
                                          "failure, `on_failure: continue`, counts too).")
    succeeded_with_failures: bool = Field(description="Succeeded, with failed tasks its `on_failure: continue` "
                                                      "or `tolerated_failures` let it go past.")


class Backfill(Loose):
    id: uuid.UUID
    workspace_id: str
    pipeline_id: str
    start_at: datetime
    end_at: datetime
    versions: list[str] | None
    max_active_runs: int | None
    reprocess: Literal["none", "failed", "all"]
    status: Literal["running", "cancelled", "completed"]
    created_by: str | None
    created_at: datetime
    cancelled_at: datetime | None
    runs_by_status: dict[str, int]
    runs: list[BackfillRun]


class BackfillCancelled(Loose):
    id: uuid.UUID
    status: Literal["cancelled"]
    cancelled_runs: int


# --- workers and the worker protocol -------------------------------------------------------------


class RegisteredTask(Loose):
    name: str
    code_hash: str
    new_code_version: bool


class WorkerRegistered(Loose):
    service: str
    version: str
    tasks: list[RegisteredTask]
    signing_secret: str | None = Field(
        description="http registrations: the secret that signs this endpoint's dispatches "
        "(X-Tickweave-Signature, HMAC-SHA256); the SDK's Worker.register keeps it. Null for lambda and sqs."
    )


class WorkerTask(Loose):
    name: str
    code_hash: str
    input_schema: dict[str, Any] | None


class Worker(Loose):
    service: str
    version: str
    transport: Literal["http", "lambda", "sqs"]
    endpoint: str
    registered_at: datetime
    last_seen_at: datetime = Field(description="When it was last heard from: registration, a heartbeat or a "
                                               "callback (written at most every 30 s).")
    health: Literal["healthy", "stale"] = Field(description="`stale`: not heard from for over `stale_after_s`.")
    stale_after_s: int
    tasks: list[WorkerTask]


class WorkerList(Loose):
    items: list[Worker]


class CodeVersion(Loose):
    code_hash: str
    service: str
    service_version: str
    first_seen_at: datetime


class TaskHistory(Loose):
    task: str
    versions: list[CodeVersion]


class CallbackResult(Loose):
    accepted: bool
    outcome: str = Field(description="succeeded, failed, retrying, duplicate, stale_attempt, ...")
    task_status: str | None
    run_status: str | None


class CallbackRefused(CallbackResult):
    error: RefusalBody


class CallbackFailure(RootModel[CallbackRefused | ErrorResponse]):
    """A refused callback (the outcome and why), or an error (a malformed task id, a bad token)."""


class BatchedCallbackAnswer(Loose):
    """One callback's answer in a batch: what `POST /api/callback/{task_id}` would have answered
    for it, with that answer's status."""

    task_id: str | None = Field(description="The item's `task_id` as sent (null when it sent no string).")
    status: int = Field(description="The status the single callback would answer: 200 (recorded, or a "
                                    "duplicate), 401, 404, 409, 413 or 422 (refused: see `error`).")
    accepted: bool
    outcome: str | None = Field(description="As the single callback's; null when the item was refused before "
                                            "reaching its task (a bad token, a malformed item).")
    task_status: str | None
    run_status: str | None
    error: RefusalBody | None = Field(default=None, description="Why the item was refused; absent when "
                                                                "`status` is 200.")


class CallbackBatchResult(Loose):
    """One answer per callback sent, in the order sent."""

    results: list[BatchedCallbackAnswer]


class HeartbeatAccepted(Loose):
    accepted: bool
    task_id: uuid.UUID
    task_status: str


class HeartbeatRefused(Loose):
    accepted: bool
    task_id: uuid.UUID
    reason: str
    error: RefusalBody


class HeartbeatFailure(RootModel[HeartbeatRefused | ErrorResponse]):
    """A refused heartbeat (why), or an error (a bad token, a token of another task)."""


# --- routes being added (loose until their handlers land) ----------------------------------------


class AnyObject(Loose):
    """A JSON object; its fields are not described yet."""


class AnyJSON(RootModel[Any]):
    """Any JSON value."""


class ItemsPage(Loose):
    items: list[dict[str, Any]]
    next_cursor: str | None = None
