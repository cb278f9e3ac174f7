"""Orchestrations: several pipelines' runs started together."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api import run_views
from orchestrator.api.common import body_limit, get_engine, guarded, idempotency_key, parse_uuid
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import OrchestrationRequest
from orchestrator.engine.keys import Principal


@guarded("operator")
async def create_orchestration(request: Request, principal: Principal) -> Response:
    body = validate(OrchestrationRequest, await read_json(request, body_limit(request)))
    key = idempotency_key(request)
    result = await run_in_threadpool(
        lambda: get_engine(request).trigger_orchestration(
            principal.workspace_id, pipeline_ids=body.pipelines, versions=body.versions, params=body.params,
            trigger="api", triggered_by=principal.actor, idempotency_key=key,
        )
    )
    row, runs = await run_in_threadpool(get_engine(request).get_orchestration, principal.workspace_id, result.id)
    return JSON({**row, "runs": [run_views.run_list_item(r) for r in runs], "created": result.created},
                status_code=201 if result.created else 200)


@guarded("viewer")
async def get_orchestration(request: Request, principal: Principal) -> Response:
    orchestration_id = parse_uuid(request.path_params["orchestration_id"], "orchestration")
    row, runs = await run_in_threadpool(get_engine(request).get_orchestration, principal.workspace_id, orchestration_id)
    return JSON({**row, "runs": [run_views.run_list_item(r) for r in runs]})


routes: list[Route] = [
    Route("/api/orchestrations", create_orchestration, methods=["POST"]),
    Route("/api/orchestrations/{orchestration_id}", get_orchestration, methods=["GET"]),
]
