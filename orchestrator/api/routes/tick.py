"""`POST /api/tick`: one scheduling pass, authenticated by the tick secret, bounded by a deadline."""

from __future__ import annotations

import hmac

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import api_key, app_settings, get_engine
from orchestrator.api.responses import JSON, error
from orchestrator.engine.tick import remaining_time


async def tick(request: Request) -> Response:
    supplied = request.headers.get("x-tick-secret") or api_key(request) or ""
    if not hmac.compare_digest(supplied.encode(), app_settings(request).tick_secret.encode()):
        return error(401, "unauthorized", "the tick needs the tick secret ('Authorization: Bearer' or 'x-tick-secret')")
    # A deadline, so that a backlog never outlives the caller: the Lambda's remaining time when
    # Mangum passed the invocation's context, capped by the configured maximum (API Gateway
    # gives up at 30 s). The work left over waits for the next tick; none is lost.
    remaining = remaining_time(context=request.scope.get("aws.context"), max_s=app_settings(request).http_tick_max_s)
    summary = await run_in_threadpool(get_engine(request).tick, remaining)
    return JSON(summary.to_dict())


routes: list[Route] = [
    Route("/api/tick", tick, methods=["POST"]),
]
