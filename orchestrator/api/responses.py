"""JSON responses and the one error shape: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

from starlette.responses import JSONResponse


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, separators=(",", ":"))


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def error(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> JSON:
    return JSON({"error": {"code": code, "message": message, "details": details}}, status_code=status, headers=headers)
