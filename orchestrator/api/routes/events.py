"""Events: record one (starting the runs it triggers), list them, get one."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import body_limit, get_engine, guarded, page_limit
from orchestrator.api.request import read_json, validate
from orchestrator.api.responses import JSON
from orchestrator.api.schemas import EventRequest
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.keys import Principal


def _encode_event_cursor(received_at: datetime, event_id: str) -> str:
    raw = json.dumps([received_at.isoformat(), event_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_event_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        received, event_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(event_id, str):
            raise TypeError(event_id)
        return datetime.fromisoformat(received), event_id
    except (ValueError, TypeError, binascii.Error, RecursionError):  # RecursionError: "[[[[..." encoded
        raise InvalidInput("cursor is not one this API returned; pass next_cursor from the previous page") from None


def _event_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "name": row["name"], "payload": row["payload"], "received_by": row["received_by"],
        "received_at": row["received_at"], "runs": row["runs"],
    }


@guarded("operator")
async def post_event(request: Request, principal: Principal) -> Response:
    body = validate(EventRequest, await read_json(request, body_limit(request)))
    result = await run_in_threadpool(
        lambda: get_engine(request).record_event(
            principal.workspace_id, body.name, body.id, body.payload, actor=principal.actor
        )
    )
    event = await run_in_threadpool(get_engine(request).get_event, principal.workspace_id, result.id)
    return JSON({**_event_view(event), "created": result.created}, status_code=201 if result.created else 200)


@guarded("viewer")
async def list_events(request: Request, principal: Principal) -> Response:
    limit = page_limit(request, 50)
    cursor = request.query_params.get("cursor")
    before = _decode_event_cursor(cursor) if cursor else None
    rows = await run_in_threadpool(
        lambda: get_engine(request).list_events(
            principal.workspace_id, name=request.query_params.get("name"), limit=limit, before=before
        )
    )
    next_cursor = _encode_event_cursor(rows[-1]["received_at"], rows[-1]["id"]) if len(rows) == limit else None
    return JSON({"items": [_event_view(r) for r in rows], "next_cursor": next_cursor})


@guarded("viewer")
async def get_event(request: Request, principal: Principal) -> Response:
    event = await run_in_threadpool(get_engine(request).get_event, principal.workspace_id, request.path_params["event_id"])
    return JSON(_event_view(event))


routes: list[Route] = [
    Route("/api/events", post_event, methods=["POST"]),
    Route("/api/events", list_events, methods=["GET"]),
    Route("/api/events/{event_id:path}", get_event, methods=["GET"]),  # ids may hold "/"
]
