"""Pipelines: create, validate, list, get, update, delete, pause/resume, trigger a run, start a backfill."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api import run_views
from orchestrator.api.common import (
    Handler,
    body_limit,
    get_engine,
    guarded,
    idempotency_key,
    page_limit,
    schedule_view,
)
from orchestrator.api.request import read_definition, read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import BackfillRequest, TriggerRequest
from orchestrator.engine.errors import Conflict, InvalidInput, TooLarge
from orchestrator.engine.keys import Principal


def _merged_fire_times(schedules: list[dict[str, Any]], count: int = 5) -> list[Any]:
    return sorted({t for s in schedules for t in s["next_fire_times"]})[:count]


def _pipeline_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "name": row.get("name") or (row.get("definition") or {}).get("name"),
        "version": row["version"], "sha256": row["sha256"], "paused": row["paused"],
        "created_at": row["created_at"], "updated_at": row["updated_at"],
        "description": row.get("description") or (row.get("definition") or {}).get("description", ""),
        "stats": {
            "use_count": row.get("use_count", 0), "last_used_at": row.get("last_used_at"),
            "runs_by_status": row.get("runs_by_status") or {},
        },
        "next_fire_times": _merged_fire_times(row.get("schedules", [])),
        "schedules": [schedule_view(s) for s in row.get("schedules", [])],
    }


def pipeline_with_schedules(request: Request, workspace_id: str, pipeline_id: str) -> dict[str, Any]:
    engine = get_engine(request)
    row = engine.get_pipeline(workspace_id, pipeline_id)
    row["schedules"] = engine.list_schedules(workspace_id, [pipeline_id])
    resolution = engine.pipeline_templates(workspace_id, pipeline_id)
    row["source_definition"] = resolution["source_definition"]
    row["templates"] = resolution["templates"]
    return row


@guarded("admin")
async def create_pipeline(request: Request, principal: Principal) -> Response:
    raw = await read_definition(request, body_limit(request))
    saved = await run_in_threadpool(get_engine(request).create_pipeline, principal.workspace_id, raw, actor=principal.actor)
    row = await run_in_threadpool(pipeline_with_schedules, request, principal.workspace_id, saved.id)
    return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                 "templates": row["templates"]}, status_code=201)


@guarded("admin")
async def update_pipeline(request: Request, principal: Principal) -> Response:
    pipeline_id = request.path_params["pipeline_id"]
    raw = await read_definition(request, body_limit(request))
    saved = await run_in_threadpool(
        get_engine(request).update_pipeline, principal.workspace_id, pipeline_id, raw, actor=principal.actor
    )
    row = await run_in_threadpool(pipeline_with_schedules, request, principal.workspace_id, saved.id)
    return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                 "templates": row["templates"], "changed": saved.changed})


@guarded("viewer")
async def list_pipelines(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 100)
    after = request.query_params.get("cursor")
    def load() -> list[dict[str, Any]]:
        rows = get_engine(request).list_pipelines(principal.workspace_id, limit=limit, after_id=after)
        schedules = get_engine(request).list_schedules(principal.workspace_id, [r["id"] for r in rows])
        for r in rows:
            r["schedules"] = [s for s in schedules if s["pipeline_id"] == r["id"]]
        return rows

    rows = await run_in_threadpool(load)
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return JSON({"items": [_pipeline_view(r) for r in rows], "next_cursor": next_cursor})


@guarded("viewer")
async def get_pipeline(request: Request, principal: Principal) -> Response:
    row = await run_in_threadpool(pipeline_with_schedules, request, principal.workspace_id, request.path_params["pipeline_id"])
    return JSON({**_pipeline_view(row), "definition": row["definition"], "source_definition": row["source_definition"],
                 "templates": row["templates"]})


@guarded("admin")
async def delete_pipeline(request: Request, principal: Principal) -> Response:
    pipeline_id = request.path_params["pipeline_id"]
    raw = request.query_params.get("cancel_runs", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidInput(f"cancel_runs must be true or false; got {raw!r}")
    deleted = await run_in_threadpool(lambda: get_engine(request).delete_pipeline(
        principal.workspace_id, pipeline_id, cancel_runs=raw in ("true", "1"), actor=principal.actor))
    return JSON({"deleted": deleted.id, "cancelled_runs": deleted.cancelled_runs})


def pause_or_resume(paused: bool) -> Handler:
    @guarded("operator")
    async def endpoint(request: Request, principal: Principal) -> Response:
        pipeline_id = request.path_params["pipeline_id"]
        await run_in_threadpool(get_engine(request).set_paused, principal.workspace_id, pipeline_id, paused)
        row = await run_in_threadpool(pipeline_with_schedules, request, principal.workspace_id, pipeline_id)
        return JSON(_pipeline_view(row))

    return endpoint


@guarded("operator")
async def trigger(request: Request, principal: Principal) -> Response:
    pipeline_id = request.path_params["pipeline_id"]
    body = validate(TriggerRequest, await read_json(request, body_limit(request), allow_empty=True))
    key = idempotency_key(request)
    if body.include != "none":
        orchestration = await run_in_threadpool(
            lambda: get_engine(request).trigger_orchestration(
                principal.workspace_id, root=pipeline_id, include=body.include, versions=body.versions,
                params=body.params, trigger="manual", triggered_by=principal.actor, idempotency_key=key,
            )
        )
        root = next((r for r in orchestration.runs if r["pipeline_id"] == pipeline_id), None)
        if root is None:  # the key named an orchestration started for other pipelines
            raise Conflict(
                f"the Idempotency-Key was used for orchestration {orchestration.id}, which has no run of "
                f"'{pipeline_id}'; use a new key"
            )
        run = await run_in_threadpool(get_engine(request).run_summary, principal.workspace_id, root["id"])
        return JSON(
            {**run_views.run_view(run), "created": orchestration.created,
             "orchestration": {"id": orchestration.id,
                               "runs": [run_views.run_list_item(r) for r in orchestration.runs]}},
            status_code=201 if orchestration.created else 200,
        )
    result = await run_in_threadpool(
        lambda: get_engine(request).trigger_run(
            principal.workspace_id, pipeline_id, versions=body.versions, params=body.params,
            trigger="manual", triggered_by=principal.actor, idempotency_key=key,
        )
    )
    run = await run_in_threadpool(get_engine(request).run_summary, principal.workspace_id, result.id)
    return JSON(
        {**run_views.run_view(run), "created": result.created},
        status_code=201 if result.created else 200,
    )


@guarded("viewer")
async def validate_pipelines(request: Request, principal: Principal) -> Response:
    raw = await read_definition(request, body_limit(request), "set of pipeline definitions")
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
    report = await run_in_threadpool(get_engine(request).validate_pipelines, principal.workspace_id, raws)
    return JSON(report)


@guarded("operator")
async def backfill(request: Request, principal: Principal) -> Response:
    body = validate(BackfillRequest, await read_json(request, body_limit(request)))
    result = await run_in_threadpool(lambda: get_engine(request).start_backfill(
        principal.workspace_id, request.path_params["pipeline_id"], start=body.start, end=body.end,
        versions=body.versions, max_active_runs=body.max_active_runs, reprocess=body.reprocess,
        dry_run=body.dry_run, actor=principal.actor))
    return JSON(result, status_code=200 if body.dry_run else 201)


routes: list[Route] = [
    Route("/api/pipelines", create_pipeline, methods=["POST"]),
    Route("/api/pipelines/validate", validate_pipelines, methods=["POST"]),
    Route("/api/pipelines", list_pipelines, methods=["GET"]),
    Route("/api/pipelines/{pipeline_id}", get_pipeline, methods=["GET"]),
    Route("/api/pipelines/{pipeline_id}", update_pipeline, methods=["PUT"]),
    Route("/api/pipelines/{pipeline_id}", delete_pipeline, methods=["DELETE"]),
    Route("/api/pipelines/{pipeline_id}/runs", trigger, methods=["POST"]),
    Route("/api/pipelines/{pipeline_id}/pause", pause_or_resume(True), methods=["POST"]),
    Route("/api/pipelines/{pipeline_id}/resume", pause_or_resume(False), methods=["POST"]),
    Route("/api/pipelines/{pipeline_id}/backfill", backfill, methods=["POST"]),
]
