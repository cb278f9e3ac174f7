"""Lambda entry for the API function.

Events:
- API Gateway (HTTP API, payload 2.0) and other HTTP events go through Mangum to the Starlette app;
- an EventBridge Scheduler target input `{"tickweave": "tick"}`, or a classic EventBridge rule
  event (`source: aws.events`, `detail-type: Scheduled Event`), runs one tick;
- `{"tickweave": "migrate"}` applies pending database migrations (advisory-locked);
- `{"tickweave": "create-key", "workspace": W, "role": R, "name": N}` creates an API key and
  returns it, once.
Only principals allowed to invoke the function can send the last three: API Gateway always wraps
a request in its own event shape, so none of them can be forged over HTTP.

Nothing heavy happens at import: this module imports only the standard library and the
configuration. The first event resolves settings (reading `NAME_FROM` references from Secrets
Manager / SSM) and builds what that event needs: a migration needs only psycopg; an HTTP request
or a tick builds the app and the engine. The engine's database connection is opened by the first
query and reused across invocations.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.config import Settings, database_url_reader, load_resolved_settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from orchestrator.dispatch.base import Transport
    from orchestrator.engine.service import Engine

log = logging.getLogger(__name__)

COMMANDS = ("tick", "migrate", "create-key")
_WORKSPACE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    app: Starlette
    http: Callable[[dict[str, Any], Any], dict[str, Any]]


_lock = threading.RLock()
_settings: Settings | None = None
_runtime: Runtime | None = None


def get_settings() -> Settings:
    """Settings of this process, resolved on first use (once per cold start)."""
    global _settings
    with _lock:
        if _settings is None:
            settings = load_resolved_settings()
            _settings = settings.with_overrides(mode="lambda") if settings.mode == "local" else settings
        return _settings


def build_transports(settings: Settings) -> dict[str, Transport]:
    """The engine's transports (`lambda` among them when a worker function is configured)."""
    from orchestrator.engine.service import build_transports as engine_transports

    return engine_transports(settings)


def get_runtime() -> Runtime:
    """The app and engine of this process, built by the first event that needs them."""
    global _runtime
    with _lock:
        if _runtime is None:
            from mangum import Mangum

            from orchestrator.api.app import create_app
            from orchestrator.db.connection import Database
            from orchestrator.engine.service import Engine

            settings = get_settings()
            # No app, engine or tick without the token keys and tick secret: every such event
            # fails, naming what to set, until they are configured (no development fallback).
            # A migration needs neither and still runs.
            settings.check_mode()
            # A rotated database secret: the pool reads DATABASE_URL_FROM again when the
            # database refuses the password it has (orchestrator/db/connection.py).
            db = Database(settings.database_url, check_idle_s=settings.db_check_idle_s,
                          reread_url=database_url_reader())
            engine = Engine(settings, db=db, transports=build_transports(settings))
            app = create_app(settings, engine)
            _runtime = Runtime(settings, engine, app, Mangum(app, lifespan="off"))
        return _runtime


def __getattr__(name: str) -> Any:
    # `handler.api.app` is the Starlette app, built on first access rather than at import.
    if name == "app":
        return get_runtime().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_scheduled_tick(event: Any) -> bool:
    """An EventBridge rule event (`source: aws.events`, `detail-type: Scheduled Event`), or an
    EventBridge Scheduler target input `{"tickweave": "tick"}` (Scheduler passes the input as is)."""
    if not isinstance(event, dict):
        return False
    if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
        return True
    return event.get("tickweave") == "tick"


def tick(context: Any) -> dict[str, Any]:
    # IAM guards who may invoke this function, so the scheduled tick carries no secret.
    # Its deadline is the invocation's remaining time (the HTTP tick's is the same, capped).
    from orchestrator.engine.tick import remaining_time

    summary = get_runtime().engine.tick(remaining_s=remaining_time(context=context))
    result: dict[str, Any] = summary.to_dict()  # the tick logged it (event tick.finished)
    return result


def migrate() -> dict[str, Any]:
    """Apply pending migrations to the configured database; needs neither the app nor boto3
    beyond resolving the database secret."""
    from orchestrator.db.connection import is_authentication_failure
    from orchestrator.db.migrate import applied_versions
    from orchestrator.db.migrate import migrate as apply_migrations

    url = get_settings().database_url
    if not url:
        raise ValueError("no database configured: set DATABASE_URL or DATABASE_URL_FROM")
    try:
        applied = apply_migrations(url)
    except Exception as exc:
        # The password was rotated since this environment read it: read it once more.
        reread = database_url_reader()
        if reread is None or not is_authentication_failure(exc):
            raise
        url = reread()
        applied = apply_migrations(url)
    result = {"applied": applied, "versions": applied_versions(url)}
    from orchestrator.logs import log_event

    log_event(log, "migrate", applied=applied, versions=result["versions"])
    return result


def create_key(event: dict[str, Any]) -> dict[str, Any]:
    workspace = event.get("workspace", "default")
    role = event.get("role", "admin")
    name = event.get("name", "")
    if not isinstance(workspace, str) or not _WORKSPACE_ID.match(workspace):
        raise ValueError("workspace must be a slug: lowercase letters, digits, '-' and '_', at most 63")
    if not isinstance(role, str) or not isinstance(name, str):
        raise ValueError("role and name must be strings")
    from orchestrator.engine.errors import EngineError

    try:
        raw, key_id = get_runtime().engine.create_api_key(workspace, role, name=name)
    except EngineError as exc:
        raise ValueError(exc.message) from exc
    from orchestrator.logs import log_event

    log_event(log, "create-key", key_id=key_id, workspace_id=workspace, role=role)  # never the key itself
    return {"id": key_id, "key": raw, "workspace": workspace, "role": role}


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    from orchestrator.logs import configure_logging  # standard library only; not at import (see above)

    configure_logging()  # JSON lines at LOG_LEVEL / ApplicationLogLevel; idempotent (cheap after the first event)
    if isinstance(event, dict) and "tickweave" in event:
        command = event["tickweave"]
        if command == "tick":
            return tick(context)
        if command == "migrate":
            return migrate()
        if command == "create-key":
            return create_key(event)
        raise ValueError(f"unknown tickweave command {command!r}; one of {', '.join(COMMANDS)}")
    if is_scheduled_tick(event):
        return tick(context)
    response: dict[str, Any] = get_runtime().http(event, context)
    return response
