"""API keys: create, list, revoke (admin only)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import body_limit, get_engine, guarded, parse_uuid
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import KeyRequest
from orchestrator.engine.keys import Principal


@guarded("admin")
async def create_key(request: Request, principal: Principal) -> Response:
    body = validate(KeyRequest, await read_json(request, body_limit(request)))
    raw, key_id = await run_in_threadpool(
        lambda: get_engine(request).create_api_key(principal.workspace_id, body.role, name=body.name))
    # The key itself is in this answer and nowhere else: it is stored only as a digest.
    return JSON({"id": key_id, "key": raw, "workspace": principal.workspace_id, "role": body.role,
                 "name": body.name}, status_code=201)


@guarded("admin")
async def list_keys(request: Request, principal: Principal) -> Response:
    rows = await run_in_threadpool(get_engine(request).list_api_keys, principal.workspace_id)
    return JSON({"items": rows})


@guarded("admin")
async def revoke_key(request: Request, principal: Principal) -> Response:
    key_id = parse_uuid(request.path_params["key_id"], "key")
    await run_in_threadpool(get_engine(request).revoke_api_key, principal, key_id)
    return JSON({"id": key_id, "revoked": True})


routes: list[Route] = [
    Route("/api/keys", create_key, methods=["POST"]),
    Route("/api/keys", list_keys, methods=["GET"]),
    Route("/api/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
