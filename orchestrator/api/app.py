"""The Starlette application: routes of the HTTP contract in DESIGN.md, thin over the engine."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from orchestrator.api import run_views, worker_reads
from orchestrator.api.request import PayloadTooLarge, read_definition, read_json, validate
from orchestrator.api.responses import JSON, error
from orchestrator.api.schemas import (
    ApprovalRequest,
    BackfillRequest,
    BatchedCallback,
    CallbackBatchEnvelope,
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
from orchestrator.config import Settings
from orchestrator.engine import runs as run_reads
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.errors import (
    Conflict,
    EngineError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
)
from orchestrator.engine.keys import Principal
from orchestrator.engine.service import Engine
from orchestrator.engine.worker_protocol import CallbackInput

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_PAGE_SIZE = 500
_STATUS_BY_ERROR: dict[type[EngineError], int] = {
    NotFound: 404, Conflict: 409, InvalidInput: 422, Unauthorized: 401, Forbidden: 403, PayloadTooLarge: 413,
    TooLarge: 413, IdempotencyKeyReused: 422,
}
_RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")

Handler = Callable[[Request], Awaitable[Response]]


def _version() -> str:
    from importlib import metadata  # ~25 ms at import; only /api/info needs it

    try:
        return metadata.version("tickweave")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _dashboard_csp() -> str:
    """Only the page's own inline script (by hash) runs, and it may talk only to this origin."""
    import hashlib
    import re

    html = (STATIC_DIR / "index.html").read_bytes()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
        for s in re.findall(rb"<script>(.*?)</script>", html, re.S)
    )
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _api_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"{what} '{value}' not found") from None


def _encode_cursor(created_at: datetime, run_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(run_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), uuid.UUID(run_id)
    except (ValueError, TypeError, binascii.Error, RecursionError):  # RecursionError: "[[[[..." encoded
        raise InvalidInput("cursor is not one this API returned; pass next_cursor from the previous page") from None


def _encode_event_cursor(received_at: datetime, event_id: str) -> str:
    raw = json.dumps([received_at.isoformat(), event_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_event_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        received, event_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(event_id, str):
            raise TypeError(event_id)
        return datetime.fromisoformat(received), event_id
    except (ValueError, TypeError, binascii.Error, RecursionError):  # RecursionError: "[[[[..." encoded
        raise InvalidInput("cursor is not one this API returned; pass next_cursor from the previous page") from None


def _event_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "name": row["name"], "payload": row["payload"], "received_by": row["received_by"],
        "received_at": row["received_at"], "runs": row["runs"],
    }


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidInput("Idempotency-Key must be 1 to 255 characters")
    return key


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    # "²".isdigit(); and int() of 5,000 digits raises (the int-string limit)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
    return int(raw)


def _schedule_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "pipeline": row["pipeline_id"], "position": row["position"], "cron": row["cron"],
        "timezone": row["timezone"], "state": row["state"], "catchup": row["catchup"],
        "max_catchup_runs": row["max_catchup_runs"], "overlap": row["overlap"], "jitter_s": row["jitter_s"],
        "start_at": row["start_at"], "end_at": row["end_at"], "next_fire_at": row["next_fire_at"],
        "next_fire_times": row["next_fire_times"], "last_fired_slot": row["last_fired_slot"],
        "last_fired_at": row["last_fired_at"], "skipped_slots": row["skipped_slots"],
    }


def _merged_fire_times(schedules: list[dict[str, Any]], count: int = 5) -> list[Any]:
    return sorted({t for s in schedules for t in s["next_fire_times"]})[:count]


def _template_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "version": row["version"], "sha256": row["sha256"], "task": row["task"],
        "description": row["description"] or "", "created_at": row["created_at"], "updated_at": row["updated_at"],
        "used_by": list(row["used_by"]),
    }


def _pipeline_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "version": row["version"], "sha256": row["sha256"], "paused": row["paused"],
        "created_at": row["created_at"], "updated_at": row["updated_at"],
        "description": row.get("description") or (row.get("definition") or {}).get("description", ""),
        "stats": {
            "use_count": row.get("use_count", 0), "last_used_at": row.get("last_used_at"),
            "runs_by_status": row.get("runs_by_status") or {},
        },
        "next_fire_times": _merged_fire_times(row.get("schedules", [])),
        "schedules": [_schedule_view(s) for s in row.get("schedules", [])],
    }


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    settings.check_mode()  # lambda mode: no app on the development token key or tick secret
    engine_ref: dict[str, Engine] = {}

    def get_engine() -> Engine:
        # Built on first use, not at import or app creation: a cold Lambda pays only for what
        # the first request needs.
        if "engine" not in engine_ref:
            engine_ref["engine"] = engine or Engine(settings)
        return engine_ref["engine"]

    if engine is not None:
        engine_ref["engine"] = engine

    def guarded(role: str | None) -> Callable[[Callable[..., Awaitable[Response]]], Handler]:
        """Wrap a handler: authenticate (when `role` is set), check the role, map engine errors."""

        def wrap(handler: Callable[..., Awaitable[Response]]) -> Handler:
            async def endpoint(request: Request) -> Response:
                try:
                    if role is None:
                        return await handler(request)
                    principal = await run_in_threadpool(get_engine().authenticate, _api_key(request))
                    if not principal.allows(role):
                        raise Forbidden(f"this action needs the '{role}' role; the key has '{principal.role}'")
                    return await handler(request, principal)
                except EngineError as exc:
                    status = _STATUS_BY_ERROR.get(type(exc), 400)
                    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                    return error(status, exc.code, exc.message, exc.details, headers)

            return endpoint

        return wrap

    limit_bytes = settings.max_body_bytes

    async def health(request: Request) -> Response:
        return JSON({"status": "ok"})

    async def info(request: Request) -> Response:
        def probe() -> dict[str, Any]:
            result: dict[str, Any] = {"version": _version(), "mode": settings.mode}
            try:
                with get_engine().db.connection() as conn:
                    conn.execute("SELECT 1")
                result["database"] = "ok"
            except Exception as exc:
                result["database"] = f"error: {type(exc).__name__}"
            try:
                from orchestrator.storage.s3 import orchestrator_s3

                orchestrator_s3(settings).head_bucket(Bucket=settings.bucket)
                result["storage"] = "ok"
            except Exception as exc:
                result["storage"] = f"error: {type(exc).__name__}"
            # Nothing about keys or secrets: this answer needs no authentication.
            result["transports"] = sorted(get_engine().transports)
            return result

        return JSON(await run_in_threadpool(probe))

    async def tick(request: Request) -> Response:
        supplied = request.headers.get("x-tick-secret") or _api_key(request) or ""
        if not hmac.compare_digest(supplied.encode(), settings.tick_secret.encode()):
            return error(401, "unauthorized", "the tick needs the tick secret ('Authorization: Bearer' or 'x-tick-secret')")
        summary = await run_in_threadpool(get_engine().tick)
        return JSON(summary.to_dict())

    def pipeline_with_schedules(workspace_id: str, pipeline_id: str) -> dict[str, Any]:
        row = get_engine().get_pipeline(workspace_id, pipeline_id)
        row["schedules"] = get_engine().list_schedules(workspace_id, [pipeline_id])
        resolution = get_engine().pipeline_templates(workspace_id, pipeline_id)
        row["source_definition"] = resolution["source_definition"]
        row["templates"] = resolution["templates"]
        return row

    @guarded("admin")
    async def create_pipeline(request: Request, principal: Principal) -> Response:
        raw = await read_definition(request, limit_bytes)
        saved = await run_in_threadpool(get_engine().create_pipeline, principal.workspace_id, raw, actor=principal.key_prefix)
        row = await run_in_threadpool(pipeline_with_schedules, principal.workspace_id, saved.id)
        return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                     "templates": row["templates"]}, status_code=201)

    @guarded("admin")
    async def update_pipeline(request: Request, principal: Principal) -> Response:
        pipeline_id = request.path_params["pipeline_id"]
        raw = await read_definition(request, limit_bytes)
        saved = await run_in_threadpool(
            get_engine().update_pipeline, principal.workspace_id, pipeline_id, raw, actor=principal.key_prefix
        )
        row = await run_in_threadpool(pipeline_with_schedules, principal.workspace_id, saved.id)
        return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                     "templates": row["templates"], "changed": saved.changed})

    @guarded("viewer")
    async def list_pipelines(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 100)
        after = request.query_params.get("cursor")
        def load() -> list[dict[str, Any]]:
            rows = get_engine().list_pipelines(principal.workspace_id, limit=limit, after_id=after)
            schedules = get_engine().list_schedules(principal.workspace_id, [r["id"] for r in rows])
            for r in rows:
                r["schedules"] = [s for s in schedules if s["pipeline_id"] == r["id"]]
            return rows

        rows = await run_in_threadpool(load)
        next_cursor = rows[-1]["id"] if len(rows) == limit else None
        return JSON({"items": [_pipeline_view(r) for r in rows], "next_cursor": next_cursor})

    @guarded("viewer")
    async def get_pipeline(request: Request, principal: Principal) -> Response:
        row = await run_in_threadpool(pipeline_with_schedules, principal.workspace_id, request.path_params["pipeline_id"])
        return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                     "templates": row["templates"]})

    def pause_or_resume(paused: bool) -> Handler:
        @guarded("operator")
        async def endpoint(request: Request, principal: Principal) -> Response:
            pipeline_id = request.path_params["pipeline_id"]
            await run_in_threadpool(get_engine().set_paused, principal.workspace_id, pipeline_id, paused)
            row = await run_in_threadpool(pipeline_with_schedules, principal.workspace_id, pipeline_id)
            return JSON(_pipeline_view(row))

        return endpoint

    @guarded("viewer")
    async def list_schedules(request: Request, principal: Principal) -> Response:
        pipeline = request.query_params.get("pipeline")
        rows = await run_in_threadpool(
            get_engine().list_schedules, principal.workspace_id, [pipeline] if pipeline else None
        )
        return JSON({"items": [_schedule_view(r) for r in rows]})

    @guarded("operator")
    async def trigger(request: Request, principal: Principal) -> Response:
        pipeline_id = request.path_params["pipeline_id"]
        body = validate(TriggerRequest, await read_json(request, limit_bytes, allow_empty=True))
        key = _idempotency_key(request)
        if body.include != "none":
            orchestration = await run_in_threadpool(
                lambda: get_engine().trigger_orchestration(
                    principal.workspace_id, root=pipeline_id, include=body.include, versions=body.versions,
                    params=body.params, trigger="manual", triggered_by=principal.key_prefix, idempotency_key=key,
                )
            )
            root = next((r for r in orchestration.runs if r["pipeline_id"] == pipeline_id), None)
            if root is None:  # the key named an orchestration started for other pipelines
                raise Conflict(
                    f"the Idempotency-Key was used for orchestration {orchestration.id}, which has no run of "
                    f"'{pipeline_id}'; use a new key"
                )
            run = await run_in_threadpool(get_engine().run_summary, principal.workspace_id, root["id"])
            return JSON(
                {**run_views.run_view(run), "created": orchestration.created,
                 "orchestration": {"id": orchestration.id,
                                   "runs": [run_views.run_list_item(r) for r in orchestration.runs]}},
                status_code=201 if orchestration.created else 200,
            )
        result = await run_in_threadpool(
            lambda: get_engine().trigger_run(
                principal.workspace_id, pipeline_id, versions=body.versions, params=body.params,
                trigger="manual", triggered_by=principal.key_prefix, idempotency_key=key,
            )
        )
        run = await run_in_threadpool(get_engine().run_summary, principal.workspace_id, result.id)
        return JSON(
            {**run_views.run_view(run), "created": result.created},
            status_code=201 if result.created else 200,
        )

    @guarded("operator")
    async def create_orchestration(request: Request, principal: Principal) -> Response:
        body = validate(OrchestrationRequest, await read_json(request, limit_bytes))
        key = _idempotency_key(request)
        result = await run_in_threadpool(
            lambda: get_engine().trigger_orchestration(
                principal.workspace_id, pipeline_ids=body.pipelines, versions=body.versions, params=body.params,
                trigger="api", triggered_by=principal.key_prefix, idempotency_key=key,
            )
        )
        row, runs = await run_in_threadpool(get_engine().get_orchestration, principal.workspace_id, result.id)
        return JSON({**row, "runs": [run_views.run_list_item(r) for r in runs], "created": result.created},
                    status_code=201 if result.created else 200)

    @guarded("viewer")
    async def get_orchestration(request: Request, principal: Principal) -> Response:
        orchestration_id = _parse_uuid(request.path_params["orchestration_id"], "orchestration")
        row, runs = await run_in_threadpool(get_engine().get_orchestration, principal.workspace_id, orchestration_id)
        return JSON({**row, "runs": [run_views.run_list_item(r) for r in runs]})

    @guarded("viewer")
    async def validate_pipelines(request: Request, principal: Principal) -> Response:
        raw = await read_definition(request, limit_bytes, "set of pipeline definitions")
        if isinstance(raw, dict) and "pipelines" in raw:
            if set(raw) != {"pipelines"} or not isinstance(raw["pipelines"], list):
                raise InvalidInput('send {"pipelines": [definition, ...]}, a list of definitions, or one definition')
            raws = raw["pipelines"]
        elif isinstance(raw, list):
            raws = raw
        else:
            raws = [raw]
        if not raws:
            raise InvalidInput("there is no definition to validate")
        if len(raws) > 1000:
            raise TooLarge(f"{len(raws)} definitions; at most 1000 are validated at once")
        report = await run_in_threadpool(get_engine().validate_pipelines, principal.workspace_id, raws)
        return JSON(report)

    @guarded("viewer")
    async def list_outputs(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 50)
        cursor = request.query_params.get("cursor")
        before = _decode_cursor(cursor) if cursor else None
        rows = await run_in_threadpool(
            lambda: get_engine().list_outputs(
                principal.workspace_id, pipeline_id=request.query_params.get("pipeline"),
                version=request.query_params.get("version"), output=request.query_params.get("output"),
                limit=limit, before=before,
            )
        )
        next_cursor = _encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
        return JSON({"items": rows, "next_cursor": next_cursor})

    @guarded("viewer")
    async def get_output(request: Request, principal: Principal) -> Response:
        output_id = _parse_uuid(request.path_params["output_id"], "output")
        row = await run_in_threadpool(get_engine().get_output, principal.workspace_id, output_id)
        row.pop("key", None)
        return JSON(row)

    @guarded("viewer")
    async def output_content(request: Request, principal: Principal) -> Response:
        output_id = _parse_uuid(request.path_params["output_id"], "output")
        body = await run_in_threadpool(get_engine().output_content, principal.workspace_id, output_id)
        return Response(body, media_type="application/json")

    @guarded("viewer")
    async def list_runs(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 50)
        status = request.query_params.get("status")
        if status is not None and status not in _RUN_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(_RUN_STATUSES)}")
        cursor = request.query_params.get("cursor")
        before = _decode_cursor(cursor) if cursor else None
        rows = await run_in_threadpool(
            lambda: get_engine().list_runs(
                principal.workspace_id, pipeline_id=request.query_params.get("pipeline"), status=status,
                limit=limit, before=before,
            )
        )
        next_cursor = _encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
        return JSON({"items": [run_views.run_list_item(r) for r in rows], "next_cursor": next_cursor})

    @guarded("operator")
    async def post_event(request: Request, principal: Principal) -> Response:
        body = validate(EventRequest, await read_json(request, limit_bytes))
        result = await run_in_threadpool(
            lambda: get_engine().record_event(
                principal.workspace_id, body.name, body.id, body.payload, actor=principal.key_prefix
            )
        )
        event = await run_in_threadpool(get_engine().get_event, principal.workspace_id, result.id)
        return JSON({**_event_view(event), "created": result.created}, status_code=201 if result.created else 200)

    @guarded("viewer")
    async def list_events(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 50)
        cursor = request.query_params.get("cursor")
        before = _decode_event_cursor(cursor) if cursor else None
        rows = await run_in_threadpool(
            lambda: get_engine().list_events(
                principal.workspace_id, name=request.query_params.get("name"), limit=limit, before=before
            )
        )
        next_cursor = _encode_event_cursor(rows[-1]["received_at"], rows[-1]["id"]) if len(rows) == limit else None
        return JSON({"items": [_event_view(r) for r in rows], "next_cursor": next_cursor})

    @guarded("viewer")
    async def get_event(request: Request, principal: Principal) -> Response:
        event = await run_in_threadpool(get_engine().get_event, principal.workspace_id, request.path_params["event_id"])
        return JSON(_event_view(event))

    @guarded("viewer")
    async def get_run(request: Request, principal: Principal) -> Response:
        run_id = _parse_uuid(request.path_params["run_id"], "run")
        limit = run_views.query_limit(request, run_reads.FIRST_TASK_PAGE, run_reads.MAX_TASK_PAGE, minimum=0)
        attempts = run_views.include_attempts(request)
        items = run_views.include_items(request)
        run = await run_in_threadpool(lambda: get_engine().run_summary(
            principal.workspace_id, run_id, tasks_limit=limit, include_attempts=attempts, items=items))
        return JSON(run_views.run_view(run))

    @guarded("viewer")
    async def run_tasks(request: Request, principal: Principal) -> Response:
        run_id = _parse_uuid(request.path_params["run_id"], "run")
        status, node = run_views.task_filters(request)
        limit = run_views.query_limit(request, run_reads.FIRST_TASK_PAGE, run_reads.MAX_TASK_PAGE)
        after = run_views.decode_task_cursor(request.query_params.get("cursor"))
        attempts = run_views.include_attempts(request)
        items = run_views.include_items(request)
        page = await run_in_threadpool(lambda: get_engine().list_run_tasks(
            principal.workspace_id, run_id, status=status, node=node, after=after, limit=limit,
            include_attempts=attempts, items=items))
        return JSON({"items": [run_views.task_view(t) for t in page.items],
                     "next_cursor": run_views.encode_task_cursor(page.next_after)})

    @guarded("viewer")
    async def run_nodes(request: Request, principal: Principal) -> Response:
        run_id = _parse_uuid(request.path_params["run_id"], "run")
        limit = run_views.query_limit(request, run_reads.FIRST_NODE_PAGE, run_reads.MAX_NODE_PAGE)
        after = run_views.decode_node_cursor(request.query_params.get("cursor"))
        page = await run_in_threadpool(lambda: get_engine().list_run_nodes(
            principal.workspace_id, run_id, after=after, limit=limit))
        return JSON({"items": page.items, "next_cursor": run_views.encode_node_cursor(page.next_after)})

    @guarded("viewer")
    async def get_task(request: Request, principal: Principal) -> Response:
        task_id = _parse_uuid(request.path_params["task_id"], "task")
        task, attempts = await run_in_threadpool(get_engine().get_task, principal.workspace_id, task_id)
        return JSON(run_views.task_detail(task, attempts))

    @guarded("operator")
    async def cancel_run(request: Request, principal: Principal) -> Response:
        run_id = _parse_uuid(request.path_params["run_id"], "run")
        await run_in_threadpool(lambda: get_engine().cancel_run(principal.workspace_id, run_id, actor=principal.key_prefix))
        run = await run_in_threadpool(get_engine().run_summary, principal.workspace_id, run_id)
        return JSON(run_views.run_view(run))

    @guarded("operator")
    async def retry_run(request: Request, principal: Principal) -> Response:
        run_id = _parse_uuid(request.path_params["run_id"], "run")
        count = await run_in_threadpool(get_engine().redrive_run, principal.workspace_id, run_id)
        run = await run_in_threadpool(get_engine().run_summary, principal.workspace_id, run_id)
        return JSON({**run_views.run_view(run), "retried_tasks": count})

    def decision_payload(result: Any) -> dict[str, Any]:
        return {"task_status": result.task_status, "run_id": result.run_id, "run_status": result.run_status,
                "newly_ready": result.newly_ready}

    @guarded("operator")
    async def complete_task(request: Request, principal: Principal) -> Response:
        task_id = _parse_uuid(request.path_params["task_id"], "task")
        body = validate(CompleteRequest, await read_json(request, limit_bytes))
        result = await run_in_threadpool(lambda: get_engine().decide(
            principal.workspace_id, task_id, kind="manual", succeeded=body.success, actor=principal.key_prefix,
            comment=body.comment))
        return JSON(decision_payload(result))

    @guarded("operator")
    async def approve(request: Request, principal: Principal) -> Response:
        task_id = _parse_uuid(request.path_params["task_id"], "task")
        body = validate(ApprovalRequest, await read_json(request, limit_bytes))
        result = await run_in_threadpool(lambda: get_engine().decide(
            principal.workspace_id, task_id, kind="approval", succeeded=body.decision == "approve",
            actor=principal.key_prefix, comment=body.comment))
        return JSON(decision_payload(result))

    @guarded("viewer")
    async def list_dlq(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 50)
        cursor = request.query_params.get("cursor")
        before = _decode_cursor(cursor) if cursor else None
        include_retried = request.query_params.get("include_retried", "false").lower() in ("1", "true", "yes")
        rows = await run_in_threadpool(lambda: get_engine().list_dead_letters(
            principal.workspace_id, pipeline_id=request.query_params.get("pipeline"),
            include_retried=include_retried, limit=limit, before=before))
        next_cursor = _encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
        return JSON({"items": rows, "next_cursor": next_cursor})

    @guarded("operator")
    async def retry_dlq(request: Request, principal: Principal) -> Response:
        entry_id = _parse_uuid(request.path_params["entry_id"], "dead letter")
        entry = await run_in_threadpool(get_engine().retry_dead_letter, principal.workspace_id, entry_id)
        run = await run_in_threadpool(
            lambda: get_engine().run_summary(principal.workspace_id, entry["run_id"], tasks_limit=0))
        return JSON({"dead_letter": entry, "run_id": run["id"], "run_status": run["status"]})

    @guarded("operator")
    async def purge_dlq(request: Request, principal: Principal) -> Response:
        body = validate(PurgeRequest, await read_json(request, limit_bytes))
        purged = await run_in_threadpool(get_engine().purge_dead_letters, principal.workspace_id, body.older_than_days)
        return JSON({"purged": purged})

    @guarded("admin")
    async def create_key(request: Request, principal: Principal) -> Response:
        body = validate(KeyRequest, await read_json(request, limit_bytes))
        raw, key_id = await run_in_threadpool(
            lambda: get_engine().create_api_key(principal.workspace_id, body.role, name=body.name))
        # The key itself is in this answer and nowhere else: it is stored only as a digest.
        return JSON({"id": key_id, "key": raw, "workspace": principal.workspace_id, "role": body.role,
                     "name": body.name}, status_code=201)

    @guarded("admin")
    async def list_keys(request: Request, principal: Principal) -> Response:
        rows = await run_in_threadpool(get_engine().list_api_keys, principal.workspace_id)
        return JSON({"items": rows})

    @guarded("admin")
    async def revoke_key(request: Request, principal: Principal) -> Response:
        key_id = _parse_uuid(request.path_params["key_id"], "key")
        await run_in_threadpool(get_engine().revoke_api_key, principal, key_id)
        return JSON({"id": key_id, "revoked": True})

    @guarded("admin")
    async def create_template(request: Request, principal: Principal) -> Response:
        raw = await read_definition(request, limit_bytes, "template")
        saved = await run_in_threadpool(get_engine().create_template, principal.workspace_id, raw, actor=principal.key_prefix)
        row = await run_in_threadpool(get_engine().get_template, principal.workspace_id, saved.id)
        return JSON({**_template_view(row), "body": row["body"]}, status_code=201)

    @guarded("admin")
    async def update_template(request: Request, principal: Principal) -> Response:
        template_id = request.path_params["template_id"]
        raw = await read_definition(request, limit_bytes, "template")
        saved = await run_in_threadpool(
            get_engine().update_template, principal.workspace_id, template_id, raw, actor=principal.key_prefix
        )
        row = await run_in_threadpool(get_engine().get_template, principal.workspace_id, saved.id)
        return JSON({**_template_view(row), "body": row["body"], "changed": saved.changed})

    @guarded("viewer")
    async def list_templates(request: Request, principal: Principal) -> Response:
        limit = _limit(request, 100)
        after = request.query_params.get("cursor")
        rows = await run_in_threadpool(
            lambda: get_engine().list_templates(principal.workspace_id, limit=limit, after_id=after)
        )
        next_cursor = rows[-1]["id"] if len(rows) == limit else None
        return JSON({"items": [_template_view(r) for r in rows], "next_cursor": next_cursor})

    @guarded("viewer")
    async def get_template(request: Request, principal: Principal) -> Response:
        row = await run_in_threadpool(get_engine().get_template, principal.workspace_id, request.path_params["template_id"])
        return JSON({**_template_view(row), "body": row["body"]})

    @guarded("operator")
    async def backfill(request: Request, principal: Principal) -> Response:
        body = validate(BackfillRequest, await read_json(request, limit_bytes))
        result = await run_in_threadpool(lambda: get_engine().start_backfill(
            principal.workspace_id, request.path_params["pipeline_id"], start=body.start, end=body.end,
            versions=body.versions, max_active_runs=body.max_active_runs, reprocess=body.reprocess,
            dry_run=body.dry_run, actor=principal.key_prefix))
        return JSON(result, status_code=200 if body.dry_run else 201)

    @guarded("viewer")
    async def get_backfill(request: Request, principal: Principal) -> Response:
        backfill_id = _parse_uuid(request.path_params["backfill_id"], "backfill")
        row, runs = await run_in_threadpool(get_engine().get_backfill, principal.workspace_id, backfill_id)
        by_status: dict[str, int] = {}
        for run in runs:
            by_status[run["status"]] = by_status.get(run["status"], 0) + 1
        return JSON({**row, "runs_by_status": by_status, "runs": runs})

    @guarded("operator")
    async def cancel_backfill(request: Request, principal: Principal) -> Response:
        backfill_id = _parse_uuid(request.path_params["backfill_id"], "backfill")
        cancelled = await run_in_threadpool(
            lambda: get_engine().cancel_backfill(principal.workspace_id, backfill_id, actor=principal.key_prefix))
        return JSON({"id": backfill_id, "status": "cancelled", "cancelled_runs": cancelled})

    @guarded("admin")
    async def register_worker(request: Request, principal: Principal) -> Response:
        body = validate(RegisterRequest, await read_json(request, limit_bytes))
        if len({t.name for t in body.tasks}) != len(body.tasks):
            raise InvalidInput("each task name may be registered once per request")
        registration = await run_in_threadpool(lambda: get_engine().register_worker(
            principal.workspace_id, service=body.service, version=body.version, transport=body.transport,
            endpoint=body.endpoint, tasks=[t.model_dump() for t in body.tasks]))
        # The signing secret is the registering admin's to hand to the worker (the SDK keeps it);
        # it is never listed or logged, and registering again returns the same one.
        return JSON({"service": body.service, "version": body.version, "tasks": [
            {"name": t.name, "code_hash": t.code_hash, "new_code_version": t.new_code_version}
            for t in registration.tasks], "signing_secret": registration.signing_secret})

    @guarded("viewer")
    async def list_workers(request: Request, principal: Principal) -> Response:
        return JSON({"items": await run_in_threadpool(get_engine().list_workers, principal.workspace_id)})

    @guarded("viewer")
    async def task_history(request: Request, principal: Principal) -> Response:
        name = request.path_params["task_name"]
        rows = await run_in_threadpool(get_engine().task_code_history, principal.workspace_id, name)
        if not rows:
            raise NotFound(f"no worker has registered a task named '{name}'")
        return JSON({"task": name, "versions": rows})

    @guarded(None)
    async def callback(request: Request) -> Response:
        task_id = _parse_uuid(request.path_params["task_id"], "task")
        body = validate(CallbackRequest, await read_json(request, limit_bytes))
        result = await run_in_threadpool(
            lambda: get_engine().record_callback(
                task_id, body.token, status=body.status,
                output=body.output.model_dump() if body.output else None,
                error=body.error.model_dump(exclude_none=True) if body.error else None,
            )
        )
        payload = {
            "accepted": result.accepted, "outcome": result.outcome, "task_status": result.task_status,
            "run_status": result.run_status,
        }
        if result.accepted or result.outcome == "duplicate":
            return JSON(payload)  # a duplicate is answered, not an error: the worker may retry safely
        return JSON({**payload, "error": {"code": result.outcome, "message": _refusal_message(result.outcome),
                                          "details": None}},
                    status_code=404 if result.outcome == "not_found" else 409)

    @guarded(None)
    async def callbacks(request: Request) -> Response:
        items = _callback_batch(await read_json(request, limit_bytes), settings.max_callbacks_per_batch)
        answers: list[dict[str, Any] | None] = [None] * len(items)
        sent_ids = [_sent_task_id(item) for item in items]
        inputs: list[CallbackInput] = []
        positions: list[int] = []
        for index, item in enumerate(items):
            try:
                inputs.append(_callback_input(index, item))
            except EngineError as exc:  # this item alone is refused; the others are still recorded
                answers[index] = _batched_refusal(sent_ids[index], exc)
                continue
            positions.append(index)
        if inputs:
            results = await run_in_threadpool(get_engine().record_callbacks, inputs)
            for index, result in zip(positions, results, strict=True):
                answers[index] = (_batched_answer(sent_ids[index], result) if isinstance(result, AttemptResult)
                                  else _batched_refusal(sent_ids[index], result))
        return JSON({"results": answers})

    @guarded(None)
    async def heartbeat(request: Request) -> Response:
        body = validate(HeartbeatRequest, await read_json(request, limit_bytes))
        accepted, status, task_id = await run_in_threadpool(
            lambda: get_engine().record_heartbeat(body.token, progress=body.progress, message=body.message)
        )
        if accepted:
            return JSON({"accepted": True, "task_id": task_id, "task_status": status})
        return JSON({"accepted": False, "task_id": task_id, "reason": status,
                     "error": {"code": "refused", "message": f"heartbeat refused: {status}", "details": None}},
                    status_code=409)

    openapi_cache: dict[str, Any] = {}

    async def openapi(request: Request) -> Response:
        if "doc" not in openapi_cache:
            from orchestrator.api.openapi import build_openapi  # the models' schemas: only when asked

            openapi_cache["doc"] = build_openapi(routes, version=_version())
        return JSON(openapi_cache["doc"])

    @guarded("viewer")
    async def metrics(request: Request, principal: Principal) -> Response:
        from orchestrator.engine import metrics as engine_metrics

        fmt = (request.query_params.get("format") or "").lower()
        if fmt not in ("", "json", "prometheus"):
            raise InvalidInput(f"format must be 'json' or 'prometheus'; got {fmt!r}")
        accept = request.headers.get("accept", "")
        prometheus = fmt == "prometheus" or (not fmt and "text/plain" in accept and "application/json" not in accept)
        window_s = engine_metrics.parse_window(request.query_params.get("window"))
        pipeline = request.query_params.get("pipeline") or None
        data = await run_in_threadpool(
            lambda: get_engine().metrics(principal.workspace_id, window_s=window_s, pipeline_id=pipeline))
        if prometheus:
            return Response(engine_metrics.to_prometheus(data), media_type=engine_metrics.PROMETHEUS_CONTENT_TYPE)
        return JSON(data)

    dashboard_csp: dict[str, str] = {}

    async def dashboard(request: Request) -> Response:
        if "csp" not in dashboard_csp:  # computed on first use: a cold Lambda pays nothing for it
            dashboard_csp["csp"] = _dashboard_csp()
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
            "Content-Security-Policy": dashboard_csp["csp"], "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
        return error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error",
                     f"no route for {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail))

    async def data_error(request: Request, exc: Exception) -> Response:
        # A value the database cannot hold (a NUL character in text or JSON, a number out of
        # range) came in with the request: the caller's mistake, and its transaction rolled back.
        log.info("value refused by the database on %s %s: %s", request.method, request.url.path, exc)
        return error(422, "invalid", "the request holds a value that cannot be stored "
                     "(a NUL character, or a number out of range)")

    async def internal_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, psycopg.OperationalError):
            # The database is unreachable (restart, failover): nothing was half-written, and the
            # same request can be sent again; workers and EventBridge retry on 503.
            log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
            return error(503, "unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "1"})
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "internal", "internal error; the server log has the details")

    routes = [
        Route("/", dashboard, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/tick", tick, methods=["POST"]),
        Route("/api/pipelines", create_pipeline, methods=["POST"]),
        Route("/api/pipelines/validate", validate_pipelines, methods=["POST"]),
        Route("/api/pipelines", list_pipelines, methods=["GET"]),
        Route("/api/pipelines/{pipeline_id}", get_pipeline, methods=["GET"]),
        Route("/api/pipelines/{pipeline_id}", update_pipeline, methods=["PUT"]),
        Route("/api/pipelines/{pipeline_id}/runs", trigger, methods=["POST"]),
        Route("/api/pipelines/{pipeline_id}/pause", pause_or_resume(True), methods=["POST"]),
        Route("/api/pipelines/{pipeline_id}/resume", pause_or_resume(False), methods=["POST"]),
        Route("/api/schedules", list_schedules, methods=["GET"]),
        Route("/api/runs", list_runs, methods=["GET"]),
        Route("/api/orchestrations", create_orchestration, methods=["POST"]),
        Route("/api/orchestrations/{orchestration_id}", get_orchestration, methods=["GET"]),
        Route("/api/outputs", list_outputs, methods=["GET"]),
        Route("/api/outputs/{output_id}", get_output, methods=["GET"]),
        Route("/api/outputs/{output_id}/content", output_content, methods=["GET"]),
        Route("/api/events", post_event, methods=["POST"]),
        Route("/api/events", list_events, methods=["GET"]),
        Route("/api/events/{event_id:path}", get_event, methods=["GET"]),  # ids may hold "/"
        Route("/api/runs/{run_id}", get_run, methods=["GET"]),
        Route("/api/runs/{run_id}/tasks", run_tasks, methods=["GET"]),
        Route("/api/runs/{run_id}/nodes", run_nodes, methods=["GET"]),
        Route("/api/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/api/runs/{run_id}/retry", retry_run, methods=["POST"]),
        Route("/api/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/api/tasks/{task_id}/complete", complete_task, methods=["POST"]),
        Route("/api/approvals/{task_id}", approve, methods=["POST"]),
        Route("/api/dlq", list_dlq, methods=["GET"]),
        Route("/api/dlq/purge", purge_dlq, methods=["POST"]),
        Route("/api/dlq/{entry_id}/retry", retry_dlq, methods=["POST"]),
        Route("/api/templates", create_template, methods=["POST"]),
        Route("/api/templates", list_templates, methods=["GET"]),
        Route("/api/templates/{template_id}", get_template, methods=["GET"]),
        Route("/api/templates/{template_id}", update_template, methods=["PUT"]),
        Route("/api/pipelines/{pipeline_id}/backfill", backfill, methods=["POST"]),
        Route("/api/backfills/{backfill_id}", get_backfill, methods=["GET"]),
        Route("/api/backfills/{backfill_id}/cancel", cancel_backfill, methods=["POST"]),
        Route("/api/workers/register", register_worker, methods=["POST"]),
        Route("/api/workers", list_workers, methods=["GET"]),
        Route("/api/tasks/{task_name}/history", task_history, methods=["GET"]),
        Route("/api/keys", create_key, methods=["POST"]),
        Route("/api/keys", list_keys, methods=["GET"]),
        Route("/api/keys/{key_id}", revoke_key, methods=["DELETE"]),
        Route("/api/callback/{task_id}", callback, methods=["POST"]),
        Route("/api/callbacks", callbacks, methods=["POST"]),
        Route("/api/heartbeat", heartbeat, methods=["POST"]),
        Route("/api/worker/read-urls", worker_reads.read_urls, methods=["POST"]),
        Route("/api/metrics", metrics, methods=["GET"]),
        Route("/api/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: not_found, psycopg.DataError: data_error, Exception: internal_error},
    )
    app.state.get_engine = get_engine
    return app


def _callback_batch(data: Any, limit: int) -> list[Any]:
    """The items of a `POST /api/callbacks` body, each still unchecked; the envelope refused
    whole (422, nothing recorded) when it is not `{"callbacks": [1 to limit items]}`."""
    shape = f'send {{"callbacks": [{{"task_id", "token", "status", "output" | "error"}}, ...]}} with 1 to {limit} callbacks'
    if not isinstance(data, dict):
        raise InvalidInput(f"the request body is a JSON {_json_type(data)}, not an object; {shape}",
                           details=[{"path": "", "message": "expected an object"}])
    try:
        envelope = validate(CallbackBatchEnvelope, data)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc.message}; {shape}", details=exc.details) from None
    count = len(envelope.callbacks)
    if count == 0:
        raise InvalidInput(f"callbacks is empty; {shape}",
                           details=[{"path": "callbacks", "message": "at least 1 callback"}])
    if count > limit:
        raise InvalidInput(
            f"callbacks holds {count} callbacks, over the limit of {limit} per request; send the rest in "
            "another request", details=[{"path": "callbacks", "message": f"at most {limit} callbacks"}])
    return envelope.callbacks


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _sent_task_id(item: Any) -> str | None:
    """The item's task_id as sent, echoed in its answer (None unless it is a string)."""
    task_id = item.get("task_id") if isinstance(item, dict) else None
    return task_id if isinstance(task_id, str) else None


def _callback_input(index: int, item: Any) -> CallbackInput:
    """One batched callback checked as the single callback's body is (InvalidInput naming the
    item's position and fields otherwise)."""
    try:
        body = validate(BatchedCallback, item)
    except InvalidInput as exc:
        details = [{**d, "path": f"callbacks.{index}" + (f".{d['path']}" if d["path"] else "")}
                   for d in exc.details or []]
        raise InvalidInput(f"callbacks[{index}] is invalid: " + exc.message.removeprefix("the request body is invalid: "),
                           details=details) from None
    output = body.output.model_dump() if body.output else None
    error = body.error.model_dump(exclude_none=True) if body.error else None
    # The batch is recorded by one statement: a value the database cannot hold would refuse every
    # callback of it (the single callback answers such a value with a 422 of its own).
    for name, value in (("output", output), ("error", error)):
        if _holds_nul(value):
            raise InvalidInput(f"callbacks[{index}].{name} holds a NUL character, which cannot be stored",
                               details=[{"path": f"callbacks.{index}.{name}", "message": "a NUL character"}])
    return CallbackInput(body.task_id, body.token, body.status, output, error)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def _batched_answer(task_id: str | None, result: AttemptResult) -> dict[str, Any]:
    """A recorded (or refused) callback of a batch, answered as the single callback answers it."""
    answer: dict[str, Any] = {
        "task_id": task_id, "status": 200, "accepted": result.accepted, "outcome": result.outcome,
        "task_status": result.task_status, "run_status": result.run_status,
    }
    if result.accepted or result.outcome == "duplicate":
        return answer
    return {**answer, "status": 404 if result.outcome == "not_found" else 409,
            "error": {"code": result.outcome, "message": _refusal_message(result.outcome), "details": None}}


def _batched_refusal(task_id: str | None, exc: EngineError) -> dict[str, Any]:
    """A callback of a batch refused before it reached its task (a bad token, a malformed item)."""
    return {"task_id": task_id, "status": _STATUS_BY_ERROR.get(type(exc), 400), "accepted": False, "outcome": None,
            "task_status": None, "run_status": None,
            "error": {"code": exc.code, "message": exc.message, "details": exc.details}}


def _refusal_message(outcome: str) -> str:
    return {
        "stale_attempt": "the callback is for an attempt that is no longer current; nothing changed",
        "already_finished": "the task already finished; nothing changed",
        "not_active": "the task is not running; nothing changed",
        "not_found": "no such task",
    }.get(outcome, outcome)
