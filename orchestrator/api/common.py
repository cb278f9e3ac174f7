"""What every route module shares: the auth decorator, the engine-error mapping and the request
helpers (ids, page limits, cursors, Idempotency-Key).

Route modules (orchestrator/api/routes/) import from here; this module imports no route module
and not orchestrator.api.app. The engine and settings come from `request.app.state`, which
`create_app` fills (`get_engine`, built on first use, and `settings`).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from orchestrator.api.request import PayloadTooLarge
from orchestrator.api.responses import error
from orchestrator.engine.errors import (
    Conflict,
    EngineError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
)

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.engine.service import Engine

MAX_PAGE_SIZE = 500
STATUS_BY_ERROR: dict[type[EngineError], int] = {
    NotFound: 404, Conflict: 409, InvalidInput: 422, Unauthorized: 401, Forbidden: 403, PayloadTooLarge: 413,
    TooLarge: 413, IdempotencyKeyReused: 422,
}

Handler = Callable[[Request], Awaitable[Response]]


def get_engine(request: Request) -> Engine:
    """The app's engine (built on first use by create_app's `get_engine`)."""
    engine: Engine = request.app.state.get_engine()
    return engine


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def body_limit(request: Request) -> int:
    """The largest request body the app reads, in bytes."""
    return app_settings(request).max_body_bytes


def error_response(exc: EngineError) -> Response:
    """An engine error in the one error shape, with its HTTP status."""
    status = STATUS_BY_ERROR.get(type(exc), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error(status, exc.code, exc.message, exc.details, headers)


def guarded(role: str | None) -> Callable[[Callable[..., Awaitable[Response]]], Handler]:
    """Wrap a handler: authenticate (when `role` is set), check the role, map engine errors.

    With a role the handler is called as `handler(request, principal)`; with None (the worker
    protocol, authenticated by the task token in the body) as `handler(request)`."""

    def wrap(handler: Callable[..., Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                if role is None:
                    return await handler(request)
                principal = await run_in_threadpool(get_engine(request).authenticate, api_key(request))
                if not principal.allows(role):
                    raise Forbidden(f"this action needs the '{role}' role; the key has '{principal.role}'")
                return await handler(request, principal)
            except EngineError as exc:
                return error_response(exc)

        return endpoint

    return wrap


def api_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"{what} '{value}' not found") from None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except (ValueError, TypeError, binascii.Error, RecursionError):  # RecursionError: "[[[[..." encoded
        raise InvalidInput("cursor is not one this API returned; pass next_cursor from the previous page") from None


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise InvalidInput("Idempotency-Key must be 1 to 255 characters")
    return key


def page_limit(request: Request, default: int) -> int:
    """The `limit` query parameter (1 to MAX_PAGE_SIZE), `default` when absent."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    # "²".isdigit(); and int() of 5,000 digits raises (the int-string limit)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
    return int(raw)


def schedule_view(row: dict[str, Any]) -> dict[str, Any]:
    """A schedule as the API shows it (in schedule lists and inside pipelines)."""
    return {
        "id": row["id"], "pipeline": row["pipeline_id"], "position": row["position"], "cron": row["cron"],
        "timezone": row["timezone"], "state": row["state"], "catchup": row["catchup"],
        "max_catchup_runs": row["max_catchup_runs"], "overlap": row["overlap"], "jitter_s": row["jitter_s"],
        "start_at": row["start_at"], "end_at": row["end_at"], "next_fire_at": row["next_fire_at"],
        "next_fire_times": row["next_fire_times"], "last_fired_slot": row["last_fired_slot"],
        "last_fired_at": row["last_fired_at"], "skipped_slots": row["skipped_slots"],
    }
