"""`POST /api/tick`: one scheduling pass, authenticated by the tick secret."""

from __future__ import annotations

import hmac

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import api_key, app_settings, get_engine
from orchestrator.api.responses import JSON, error


async def tick(request: Request) -> Response:
    supplied = request.headers.get("x-tick-secret") or api_key(request) or ""
    if not hmac.compare_digest(supplied.encode(), app_settings(request).tick_secret.encode()):
        return error(401, "unauthorized", "the tick needs the tick secret ('Authorization: Bearer' or 'x-tick-secret')")
    summary = await run_in_threadpool(get_engine(request).tick)
    return JSON(summary.to_dict())


routes: list[Route] = [
    Route("/api/tick", tick, methods=["POST"]),
]
