"""`GET /api/metrics`: the workspace's metrics as JSON or Prometheus text."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.common import get_engine, guarded
from orchestrator.api.responses import JSON
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.keys import Principal


@guarded("viewer")
async def metrics(request: Request, principal: Principal) -> Response:
    from orchestrator.engine import metrics as engine_metrics

    fmt = (request.query_params.get("format") or "").lower()
    if fmt not in ("", "json", "prometheus"):
        raise InvalidInput(f"format must be 'json' or 'prometheus'; got {fmt!r}")
    accept = request.headers.get("accept", "")
    prometheus = fmt == "prometheus" or (not fmt and "text/plain" in accept and "application/json" not in accept)
    window_s = engine_metrics.parse_window(request.query_params.get("window"))
    pipeline = request.query_params.get("pipeline") or None
    data = await run_in_threadpool(
        lambda: get_engine(request).metrics(principal.workspace_id, window_s=window_s, pipeline_id=pipeline))
    if prometheus:
        return Response(engine_metrics.to_prometheus(data), media_type=engine_metrics.PROMETHEUS_CONTENT_TYPE)
    return JSON(data)


routes: list[Route] = [
    Route("/api/metrics", metrics, methods=["GET"]),
]
