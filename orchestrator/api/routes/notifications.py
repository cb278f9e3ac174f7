"""Notifications: deliveries (visibility, one more attempt for a failed one), the workspace
default targets and the webhook signing secret (docs/notifications.md)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import (
    app_settings,
    body_limit,
    decode_cursor,
    encode_cursor,
    get_engine,
    guarded,
    page_limit,
    parse_uuid,
)
from orchestrator.api.request import read_json
from orchestrator.api.responses import JSON
from orchestrator.engine import notifications
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def list_deliveries(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 50)
    cursor = request.query_params.get("cursor")
    before = decode_cursor(cursor) if cursor else None
    db = get_engine(request).db
    items = await run_in_threadpool(lambda: notifications.list_deliveries(
        db, principal.workspace_id, status=request.query_params.get("status"), limit=limit, before=before))
    next_cursor = encode_cursor(items[-1]["created_at"], items[-1]["id"]) if len(items) == limit else None
    return JSON({"items": items, "next_cursor": next_cursor})


@guarded("viewer")
async def get_delivery(request: Request, principal: Principal) -> Response:
    delivery_id = parse_uuid(request.path_params["delivery_id"], "notification delivery")
    return JSON(await run_in_threadpool(
        notifications.get_delivery, get_engine(request).db, principal.workspace_id, delivery_id))


@guarded("operator")
async def retry_delivery(request: Request, principal: Principal) -> Response:
    delivery_id = parse_uuid(request.path_params["delivery_id"], "notification delivery")
    return JSON(await run_in_threadpool(
        notifications.retry_delivery, get_engine(request).db, principal.workspace_id, delivery_id))


# Defaults and the secret are admin's: a default webhook URL may carry a secret of its own
# (Slack's do), and the signing secret is what receivers trust.
@guarded("admin")
async def get_defaults(request: Request, principal: Principal) -> Response:
    return JSON(await run_in_threadpool(notifications.get_defaults, get_engine(request).db, principal.workspace_id))


@guarded("admin")
async def put_defaults(request: Request, principal: Principal) -> Response:
    raw = await read_json(request, body_limit(request))
    return JSON(await run_in_threadpool(
        notifications.set_defaults, get_engine(request).db, app_settings(request), principal.workspace_id, raw))


@guarded("admin")
async def get_secret(request: Request, principal: Principal) -> Response:
    return JSON(await run_in_threadpool(notifications.read_secret, get_engine(request).db, principal.workspace_id))


@guarded("admin")
async def rotate_secret(request: Request, principal: Principal) -> Response:
    return JSON(await run_in_threadpool(
        notifications.rotate_secret, get_engine(request).db, app_settings(request), principal.workspace_id))


routes: list[Route] = [
    Route("/api/notifications", list_deliveries, methods=["GET"]),
    Route("/api/notifications/defaults", get_defaults, methods=["GET"]),
    Route("/api/notifications/defaults", put_defaults, methods=["PUT"]),
    Route("/api/notifications/secret", get_secret, methods=["GET"]),
    Route("/api/notifications/secret", rotate_secret, methods=["POST"]),
    Route("/api/notifications/{delivery_id}", get_delivery, methods=["GET"]),
    Route("/api/notifications/{delivery_id}/retry", retry_delivery, methods=["POST"]),
]
