"""Outputs: the metadata and content of what runs wrote."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import decode_cursor, encode_cursor, get_engine, guarded, page_limit, parse_uuid
from orchestrator.api.responses import JSON
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def list_outputs(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 50)
    cursor = request.query_params.get("cursor")
    before = decode_cursor(cursor) if cursor else None
    rows = await run_in_threadpool(
        lambda: get_engine(request).list_outputs(
            principal.workspace_id, pipeline_id=request.query_params.get("pipeline"),
            version=request.query_params.get("version"), output=request.query_params.get("output"),
            limit=limit, before=before,
        )
    )
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
    return JSON({"items": rows, "next_cursor": next_cursor})


@guarded("viewer")
async def get_output(request: Request, principal: Principal) -> Response:
    output_id = parse_uuid(request.path_params["output_id"], "output")
    row = await run_in_threadpool(get_engine(request).get_output, principal.workspace_id, output_id)
    row.pop("key", None)
    return JSON(row)


@guarded("viewer")
async def output_content(request: Request, principal: Principal) -> Response:
    output_id = parse_uuid(request.path_params["output_id"], "output")
    body = await run_in_threadpool(get_engine(request).output_content, principal.workspace_id, output_id)
    return Response(body, media_type="application/json")


routes: list[Route] = [
    Route("/api/outputs", list_outputs, methods=["GET"]),
    Route("/api/outputs/{output_id}", get_output, methods=["GET"]),
    Route("/api/outputs/{output_id}/content", output_content, methods=["GET"]),
]
