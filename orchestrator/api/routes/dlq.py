"""The dead-letter queue: list, get an entry, retry an entry, purge old entries."""

from __future__ import annotations

import uuid

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import (
    body_limit,
    decode_cursor,
    encode_cursor,
    get_engine,
    guarded,
    page_limit,
    parse_uuid,
)
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import PurgeRequest
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def list_dlq(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 50)
    cursor = request.query_params.get("cursor")
    before = decode_cursor(cursor) if cursor else None
    include_retried = request.query_params.get("include_retried", "false").lower() in ("1", "true", "yes")
    rows = await run_in_threadpool(lambda: get_engine(request).list_dead_letters(
        principal.workspace_id, pipeline_id=request.query_params.get("pipeline"),
        include_retried=include_retried, limit=limit, before=before))
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
    return JSON({"items": rows, "next_cursor": next_cursor})


@guarded("viewer")
async def get_dlq(request: Request, principal: Principal) -> Response:
    raw = request.path_params["entry_id"]
    try:
        entry_id = uuid.UUID(raw)
    except ValueError:
        raise InvalidInput(f"'{raw[:100]}' is not a dead letter id (a UUID, as GET /api/dlq lists them)") from None
    return JSON(await run_in_threadpool(get_engine(request).get_dead_letter, principal.workspace_id, entry_id))


@guarded("operator")
async def retry_dlq(request: Request, principal: Principal) -> Response:
    entry_id = parse_uuid(request.path_params["entry_id"], "dead letter")
    entry = await run_in_threadpool(get_engine(request).retry_dead_letter, principal.workspace_id, entry_id)
    run = await run_in_threadpool(
        lambda: get_engine(request).run_summary(principal.workspace_id, entry["run_id"], tasks_limit=0))
    return JSON({"dead_letter": entry, "run_id": run["id"], "run_status": run["status"]})


@guarded("operator")
async def purge_dlq(request: Request, principal: Principal) -> Response:
    body = validate(PurgeRequest, await read_json(request, body_limit(request)))
    purged = await run_in_threadpool(get_engine(request).purge_dead_letters, principal.workspace_id, body.older_than_days)
    return JSON({"purged": purged})


routes: list[Route] = [
    Route("/api/dlq", list_dlq, methods=["GET"]),
    Route("/api/dlq/purge", purge_dlq, methods=["POST"]),
    Route("/api/dlq/{entry_id}", get_dlq, methods=["GET"]),
    Route("/api/dlq/{entry_id}/retry", retry_dlq, methods=["POST"]),
]
