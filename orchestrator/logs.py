"""Structured logs: one JSON object per line, fit for CloudWatch Logs Insights.

Every line carries `ts`, `level`, `logger`, `message`, and, when known, `event` (a dotted name
such as `task.dispatched`) and the ids of what it is about: `workspace_id`, `pipeline_id`,
`run_id`, `task_id`, `attempt`. Ids come from two places, merged (the call's own win):

- `log_context(run_id=..., task_id=...)`: a context manager binding ids for everything logged
  inside it (a contextvar: per thread and per asyncio task);
- `extra={...}` on the logging call, or `log_event(logger, "task.dispatched", task_id=...)`.

Secrets never reach a line: fields whose name looks like a credential (token, secret,
password, authorization, api key, credentials) are replaced by "[redacted]", whatever their
value. Messages are the caller's responsibility: never format a secret into one.

Only the standard library is used: the worker SDK's Lambda entry calls `configure_logging` too.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

DEFAULT_LEVEL = "INFO"
REDACTED = "[redacted]"
# The ids a line names first, in this order.
ID_FIELDS = ("workspace_id", "pipeline_id", "run_id", "task_id", "attempt")
_SECRET_NAME = re.compile(r"token|secret|password|passwd|authorization|api_?key|credential|private_?key", re.I)
# Attributes every LogRecord has: whatever else a record carries came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# TRACE and FATAL are Lambda's names (its ApplicationLogLevel), FATAL as Python's CRITICAL.
_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL,
           "FATAL": logging.CRITICAL}
# Where the level comes from when none is given: ours, and the function's ApplicationLogLevel,
# which the Lambda runtime sets here (LoggingConfig with JSON logs).
LEVEL_VARIABLES = ("LOG_LEVEL", "AWS_LAMBDA_LOG_LEVEL")
# Marks the handler configure_logging installed, so a second call finds it instead of adding one.
_HANDLER_MARK = "_tickweave_json"

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("tickweave_log_context", default=None)


def current_context() -> dict[str, Any]:
    """The ids bound by the enclosing `log_context` blocks."""
    return dict(_context.get() or {})


@contextmanager
def log_context(**ids: Any) -> Iterator[dict[str, Any]]:
    """Bind ids (None values are ignored) to every line logged inside the block; blocks nest."""
    merged = {**(_context.get() or {}), **{k: v for k, v in ids.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield dict(merged)
    finally:
        _context.reset(token)


def log_event(
    logger: logging.Logger, event: str, message: str | None = None, *, level: int = logging.INFO,
    exc_info: bool = False, **fields: Any,
) -> None:
    """One structured line: `event` names what happened, `fields` say about what (ids, status...).

    The bound ids are copied onto the record now, so any handler (pytest's caplog, a queue
    handler formatting later in another thread) sees them as record attributes."""
    if logger.isEnabledFor(level):
        # A field named like a LogRecord attribute (`name`, `args`...) would make logging raise.
        fields = {(f"{k}_" if k in _RECORD_ATTRIBUTES else k): v for k, v in fields.items() if v is not None}
        logger.log(level, message or event.replace(".", " "), exc_info=exc_info,
                   extra={**current_context(), "event": event, **fields})


def _redact(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redact(str(k), v) for k, v in value.items()}
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # uuid.UUID, Decimal, dates, paths: their text


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (newlines inside values are escaped by JSON itself)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}
        fields = {**current_context(), **extra}
        if "event" in fields:
            line["event"] = fields.pop("event")
        for name in ID_FIELDS:
            if fields.get(name) is not None:
                line[name] = fields.pop(name)
        for name, value in fields.items():
            if name not in line:
                line[name] = _redact(name, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def parse_level(level: str | int | None) -> int:
    """A level name (any case) or number; None reads LOG_LEVEL and AWS_LAMBDA_LOG_LEVEL and takes
    the stricter of those set (Lambda drops lines below its ApplicationLogLevel anyway, so
    producing them would only cost time), default INFO."""
    if isinstance(level, int):
        return level
    if level is None:
        configured = [os.environ[name] for name in LEVEL_VARIABLES if os.environ.get(name, "").strip()]
        return max((parse_level(value) for value in configured), default=_LEVELS[DEFAULT_LEVEL])
    raw = level.strip()
    if raw.isdigit():
        return int(raw)
    if raw.upper() not in _LEVELS:
        raise ValueError(f"unknown log level {raw!r}; one of {', '.join(sorted(_LEVELS))}")
    return _LEVELS[raw.upper()]


def configure_logging(level: str | None = None, *, stream: IO[str] | None = None) -> logging.Handler:
    """Send every record of the process as a JSON line to stderr (or `stream`), at `level`
    (default: the stricter of LOG_LEVEL and Lambda's AWS_LAMBDA_LOG_LEVEL, else INFO).
    Idempotent: a second call adjusts the level (and stream) of the handler the first
    installed. On AWS Lambda the runtime's own handler on the root
    logger (the one CloudWatch receives) is given the JSON formatter instead of adding a second
    handler, which would print every line twice. A bad LOG_LEVEL falls back to INFO, said once.
    """
    try:
        numeric = parse_level(level)
        problem = None
    except ValueError as exc:
        numeric, problem = logging.INFO, str(exc)
    root = logging.getLogger()
    root.setLevel(numeric)
    ours = next((h for h in root.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if ours is None and os.environ.get("AWS_LAMBDA_RUNTIME_API"):
        runtime = [h for h in root.handlers if type(h).__name__.startswith("LambdaLoggerHandler")]
        for handler in runtime:
            handler.setFormatter(JsonFormatter())
            setattr(handler, _HANDLER_MARK, True)
        ours = runtime[0] if runtime else None
    if ours is None:
        ours = logging.StreamHandler(stream or sys.stderr)
        ours.setFormatter(JsonFormatter())
        setattr(ours, _HANDLER_MARK, True)
        root.addHandler(ours)
    elif stream is not None and isinstance(ours, logging.StreamHandler):
        ours.setStream(stream)
    ours.setLevel(logging.NOTSET)
    # Libraries that log every request at INFO (and may log signed URLs at DEBUG).
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    if problem:
        logging.getLogger(__name__).warning("LOG_LEVEL ignored: %s; using INFO", problem)
    return ours
