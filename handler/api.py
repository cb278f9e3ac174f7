"""Lambda entry for the API function: API Gateway HTTP events through Mangum; EventBridge
(Scheduler or rule) events run one tick directly. Nothing heavy happens at import: the
engine (database connection, boto3 clients) is built by the first event that needs it."""

from __future__ import annotations

import json
import logging
from typing import Any

from mangum import Mangum

from orchestrator.api.app import create_app
from orchestrator.config import load_settings

log = logging.getLogger(__name__)

settings = load_settings()
app = create_app(settings.with_overrides(mode="lambda") if settings.mode == "local" else settings)
_http = Mangum(app, lifespan="off")


def is_scheduled_tick(event: Any) -> bool:
    """An EventBridge rule event (`source: aws.events`, `detail-type: Scheduled Event`), or an
    EventBridge Scheduler target input `{"tickweave": "tick"}` (Scheduler passes the input as is)."""
    if not isinstance(event, dict):
        return False
    if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
        return True
    return event.get("tickweave") == "tick"


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if is_scheduled_tick(event):
        # IAM guards who may invoke this function, so the scheduled tick carries no secret.
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        summary = app.state.get_engine().tick(
            remaining_s=(lambda: remaining() / 1000.0) if callable(remaining) else None
        )
        result: dict[str, Any] = summary.to_dict()
        log.info(json.dumps({"event": "tick", **result}))
        return result
    response: dict[str, Any] = _http(event, context)
    return response
