"""The Starlette application: routes of the HTTP contract in DESIGN.md, thin over the engine.

The handlers live in orchestrator/api/routes/, one module per resource, each ending with its
`routes` list; this module builds the app's state, mounts those lists and maps the errors no
handler answered. Adding a route: write the handler in its resource's module (shared pieces in
orchestrator/api/common.py), add it to that module's `routes`; a new module also gets one line
in `all_routes` below (and one import).
"""

from __future__ import annotations

import logging

import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.api.responses import error
from orchestrator.api.routes import (
    backfills,
    dlq,
    events,
    keys,
    logs,
    meta,
    metrics,
    notifications,
    orchestrations,
    outputs,
    pipelines,
    runs,
    schedules,
    tasks,
    templates,
    tick,
    worker_protocol,
    workers,
)
from orchestrator.config import Settings
from orchestrator.engine.service import Engine

log = logging.getLogger(__name__)

def all_routes() -> list[Route]:
    """Every route, one resource module per line. A request takes the first route that matches it,
    so keep a fixed path ahead of a parameter that would also match it (`/api/pipelines/validate`
    before `/api/pipelines/{pipeline_id}`) and a `{...:path}` parameter last within its prefix."""
    return [
        *meta.routes,
        *tick.routes,
        *pipelines.routes,
        *schedules.routes,
        *runs.routes,
        *orchestrations.routes,
        *outputs.routes,
        *events.routes,
        *tasks.routes,
        *logs.routes,
        *dlq.routes,
        *notifications.routes,
        *templates.routes,
        *backfills.routes,
        *workers.routes,
        *keys.routes,
        *worker_protocol.routes,
        *metrics.routes,
    ]


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    settings.check_mode()  # lambda mode: no app on the development token key or tick secret
    engine_ref: dict[str, Engine] = {}

    def get_engine() -> Engine:
        # Built on first use, not at import or app creation: a cold Lambda pays only for what
        # the first request needs.
        if "engine" not in engine_ref:
            engine_ref["engine"] = engine or Engine(settings)
        return engine_ref["engine"]

    if engine is not None:
        engine_ref["engine"] = engine

    app = Starlette(
        routes=all_routes(),
        exception_handlers={HTTPException: not_found, psycopg.DataError: data_error, Exception: internal_error},
    )
    app.state.settings = settings
    app.state.get_engine = get_engine
    return app


async def not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
    return error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error",
                 f"no route for {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail))


async def data_error(request: Request, exc: Exception) -> Response:
    # A value the database cannot hold (a NUL character in text or JSON, a number out of
    # range) came in with the request: the caller's mistake, and its transaction rolled back.
    log.info("value refused by the database on %s %s: %s", request.method, request.url.path, exc)
    return error(422, "invalid", "the request holds a value that cannot be stored "
                 "(a NUL character, or a number out of range)")


async def internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, psycopg.OperationalError):
        # The database is unreachable (restart, failover): nothing was half-written, and the
        # same request can be sent again; workers and EventBridge retry on 503.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error(503, "unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "1"})
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, "internal", "internal error; the server log has the details")
