"""`GET /api/schedules`: the schedules of the workspace's pipelines."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import get_engine, guarded, schedule_view
from orchestrator.api.responses import JSON
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def list_schedules(request: Request, principal: Principal) -> Response:
    pipeline = request.query_params.get("pipeline")
    rows = await run_in_threadpool(
        get_engine(request).list_schedules, principal.workspace_id, [pipeline] if pipeline else None
    )
    return JSON({"items": [schedule_view(r) for r in rows]})


routes: list[Route] = [
    Route("/api/schedules", list_schedules, methods=["GET"]),
]
