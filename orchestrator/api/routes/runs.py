"""Runs: list, get, their tasks and nodes, cancel, retry."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api import run_views
from orchestrator.api.common import decode_cursor, encode_cursor, get_engine, guarded, page_limit, parse_uuid
from orchestrator.api.responses import JSON
from orchestrator.engine import runs as run_reads
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.keys import Principal

_RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


@guarded("viewer")
async def list_runs(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 50)
    status = request.query_params.get("status")
    if status is not None and status not in _RUN_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(_RUN_STATUSES)}")
    cursor = request.query_params.get("cursor")
    before = decode_cursor(cursor) if cursor else None
    rows = await run_in_threadpool(
        lambda: get_engine(request).list_runs(
            principal.workspace_id, pipeline_id=request.query_params.get("pipeline"), status=status,
            limit=limit, before=before,
        )
    )
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
    return JSON({"items": [run_views.run_list_item(r) for r in rows], "next_cursor": next_cursor})


@guarded("viewer")
async def get_run(request: Request, principal: Principal) -> Response:
    run_id = parse_uuid(request.path_params["run_id"], "run")
    limit = run_views.query_limit(request, run_reads.FIRST_TASK_PAGE, run_reads.MAX_TASK_PAGE, minimum=0)
    attempts = run_views.include_attempts(request)
    items = run_views.include_items(request)
    run = await run_in_threadpool(lambda: get_engine(request).run_summary(
        principal.workspace_id, run_id, tasks_limit=limit, include_attempts=attempts, items=items))
    return JSON(run_views.run_view(run))


@guarded("viewer")
async def run_tasks(request: Request, principal: Principal) -> Response:
    run_id = parse_uuid(request.path_params["run_id"], "run")
    status, node = run_views.task_filters(request)
    limit = run_views.query_limit(request, run_reads.FIRST_TASK_PAGE, run_reads.MAX_TASK_PAGE)
    after = run_views.decode_task_cursor(request.query_params.get("cursor"))
    attempts = run_views.include_attempts(request)
    items = run_views.include_items(request)
    page = await run_in_threadpool(lambda: get_engine(request).list_run_tasks(
        principal.workspace_id, run_id, status=status, node=node, after=after, limit=limit,
        include_attempts=attempts, items=items))
    return JSON({"items": [run_views.task_view(t) for t in page.items],
                 "next_cursor": run_views.encode_task_cursor(page.next_after)})


@guarded("viewer")
async def run_nodes(request: Request, principal: Principal) -> Response:
    run_id = parse_uuid(request.path_params["run_id"], "run")
    limit = run_views.query_limit(request, run_reads.FIRST_NODE_PAGE, run_reads.MAX_NODE_PAGE)
    after = run_views.decode_node_cursor(request.query_params.get("cursor"))
    page = await run_in_threadpool(lambda: get_engine(request).list_run_nodes(
        principal.workspace_id, run_id, after=after, limit=limit))
    return JSON({"items": page.items, "next_cursor": run_views.encode_node_cursor(page.next_after)})


@guarded("operator")
async def cancel_run(request: Request, principal: Principal) -> Response:
    run_id = parse_uuid(request.path_params["run_id"], "run")
    await run_in_threadpool(lambda: get_engine(request).cancel_run(principal.workspace_id, run_id, actor=principal.actor))
    run = await run_in_threadpool(get_engine(request).run_summary, principal.workspace_id, run_id)
    return JSON(run_views.run_view(run))


@guarded("operator")
async def retry_run(request: Request, principal: Principal) -> Response:
    run_id = parse_uuid(request.path_params["run_id"], "run")
    count = await run_in_threadpool(get_engine(request).redrive_run, principal.workspace_id, run_id)
    run = await run_in_threadpool(get_engine(request).run_summary, principal.workspace_id, run_id)
    return JSON({**run_views.run_view(run), "retried_tasks": count})


routes: list[Route] = [
    Route("/api/runs", list_runs, methods=["GET"]),
    Route("/api/runs/{run_id}", get_run, methods=["GET"]),
    Route("/api/runs/{run_id}/tasks", run_tasks, methods=["GET"]),
    Route("/api/runs/{run_id}/nodes", run_nodes, methods=["GET"]),
    Route("/api/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    Route("/api/runs/{run_id}/retry", retry_run, methods=["POST"]),
]
