"""Tasks: get one, complete a manual task, decide an approval."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api import run_views
from orchestrator.api.common import body_limit, get_engine, guarded, parse_uuid
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import ApprovalRequest, CompleteRequest
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def get_task(request: Request, principal: Principal) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    task, attempts = await run_in_threadpool(get_engine(request).get_task, principal.workspace_id, task_id)
    return JSON(run_views.task_detail(task, attempts))


@guarded("viewer")
async def task_output(request: Request, principal: Principal) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    body = await run_in_threadpool(get_engine(request).task_output_content, principal.workspace_id, task_id)
    return Response(body, media_type="application/json")


def decision_payload(result: Any) -> dict[str, Any]:
    return {"task_status": result.task_status, "run_id": result.run_id, "run_status": result.run_status,
            "newly_ready": result.newly_ready}


@guarded("operator")
async def complete_task(request: Request, principal: Principal) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    body = validate(CompleteRequest, await read_json(request, body_limit(request)))
    result = await run_in_threadpool(lambda: get_engine(request).decide(
        principal.workspace_id, task_id, kind="manual", succeeded=body.success, actor=principal.actor,
        comment=body.comment))
    return JSON(decision_payload(result))


@guarded("operator")
async def approve(request: Request, principal: Principal) -> Response:
    task_id = parse_uuid(request.path_params["task_id"], "task")
    body = validate(ApprovalRequest, await read_json(request, body_limit(request)))
    result = await run_in_threadpool(lambda: get_engine(request).decide(
        principal.workspace_id, task_id, kind="approval", succeeded=body.decision == "approve",
        actor=principal.actor, comment=body.comment))
    return JSON(decision_payload(result))


routes: list[Route] = [
    Route("/api/tasks/{task_id}", get_task, methods=["GET"]),
    Route("/api/tasks/{task_id}/output", task_output, methods=["GET"]),
    Route("/api/tasks/{task_id}/complete", complete_task, methods=["POST"]),
    Route("/api/approvals/{task_id}", approve, methods=["POST"]),
]
