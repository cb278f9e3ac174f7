"""Request bodies at the edge (pydantic); the engine gets plain values."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from orchestrator.config import DEFAULT_MAX_CALLBACKS_PER_BATCH
from orchestrator.model.pipeline import EVENT_NAME_PATTERN

BACKFILL_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: list[str] | None = Field(default=None, max_length=1000)
    params: dict[str, Any] = Field(default_factory=dict)
    # upstream / downstream: trigger the pipeline with its closure as one orchestration.
    include: Literal["none", "upstream", "downstream"] = "none"


class OrchestrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipelines: list[str] = Field(min_length=1, max_length=1000)
    versions: list[str] | None = Field(default=None, max_length=1000)
    params: dict[str, Any] = Field(default_factory=dict)


class OutputRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str = Field(min_length=1, max_length=1024)
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, max_length=64)


class CallbackError(BaseModel):
    model_config = ConfigDict(extra="allow")
    message: str = Field(default="", max_length=20_000)
    type: str | None = None
    code: str | None = None
    retryable: bool = True
    traceback: str | None = Field(default=None, max_length=20_000)


class CallbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=16_384)
    status: Literal["succeeded", "failed"]
    output: OutputRef | None = None
    error: CallbackError | None = None


class BatchedCallback(CallbackRequest):
    """One callback of `POST /api/callbacks`: the body of `POST /api/callback/{task_id}` with the
    task it is for (the token must be that task's, as for the single callback)."""

    task_id: uuid.UUID


class CallbackBatchEnvelope(BaseModel):
    """The body of `POST /api/callbacks` as read: the list, each item checked apart (a malformed
    item refuses itself only) and the length against the configured limit."""

    model_config = ConfigDict(extra="forbid")
    callbacks: list[Any]


class CallbackBatchRequest(BaseModel):
    """The body of `POST /api/callbacks` as documented (1 to `TICKWEAVE_MAX_CALLBACKS_PER_BATCH`
    callbacks, default 100)."""

    model_config = ConfigDict(extra="forbid")
    callbacks: list[BatchedCallback] = Field(min_length=1, max_length=DEFAULT_MAX_CALLBACKS_PER_BATCH)


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=16_384)
    progress: float | None = Field(default=None, ge=0, le=1)
    message: str | None = Field(default=None, max_length=2000)


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    success: bool
    comment: str | None = Field(default=None, max_length=2000)


class ApprovalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject"]
    comment: str | None = Field(default=None, max_length=2000)


class PurgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    older_than_days: int = Field(ge=0, le=36_500)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["viewer", "operator", "admin"]
    name: str = Field(default="", max_length=200)


class RegisteredTaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    code_hash: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9:._-]+$")
    input_schema: dict[str, Any] | None = None


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    version: str = Field(min_length=1, max_length=128)
    transport: Literal["http", "lambda", "sqs"]
    endpoint: str = Field(min_length=1, max_length=2048)
    tasks: list[RegisteredTaskSpec] = Field(min_length=1, max_length=1000)


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Bounded below: cron arithmetic near year 1 overflows (a 500 found by the schemathesis run).
    start: AwareDatetime = Field(ge=BACKFILL_EPOCH, description="First slot time (inclusive); 1970 or later.")
    end: AwareDatetime = Field(ge=BACKFILL_EPOCH, description="Last slot time (inclusive); in the past.")
    versions: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    max_active_runs: int | None = Field(default=None, ge=1, le=1000)
    reprocess: Literal["none", "failed", "all"] = "none"
    dry_run: bool = False


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=EVENT_NAME_PATTERN)
    # The caller's id of the event: its idempotency key (a retry with the same id starts nothing).
    id: str = Field(min_length=1, max_length=255)
    payload: dict[str, Any] = Field(default_factory=dict)
