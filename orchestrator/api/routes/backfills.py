"""Backfills: get one (with its runs), cancel it. Starting one is in pipelines."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import get_engine, guarded, parse_uuid
from orchestrator.api.responses import JSON
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def get_backfill(request: Request, principal: Principal) -> Response:
    backfill_id = parse_uuid(request.path_params["backfill_id"], "backfill")
    row, runs = await run_in_threadpool(get_engine(request).get_backfill, principal.workspace_id, backfill_id)
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run["status"]] = by_status.get(run["status"], 0) + 1
    return JSON({**row, "runs_by_status": by_status, "runs": runs})


@guarded("operator")
async def cancel_backfill(request: Request, principal: Principal) -> Response:
    backfill_id = parse_uuid(request.path_params["backfill_id"], "backfill")
    cancelled = await run_in_threadpool(
        lambda: get_engine(request).cancel_backfill(principal.workspace_id, backfill_id, actor=principal.actor))
    return JSON({"id": backfill_id, "status": "cancelled", "cancelled_runs": cancelled})


routes: list[Route] = [
    Route("/api/backfills/{backfill_id}", get_backfill, methods=["GET"]),
    Route("/api/backfills/{backfill_id}/cancel", cancel_backfill, methods=["POST"]),
]
