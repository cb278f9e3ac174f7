"""Structured logs: one JSON line per record, with the bound ids, secrets redacted, LOG_LEVEL."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.logs import (
    REDACTED,
    JsonFormatter,
    configure_logging,
    current_context,
    log_context,
    log_event,
    parse_level,
)


def record(message: str = "hello", level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("tickweave.test")
    rec = logger.makeRecord(logger.name, level, __file__, 1, message, (), None, extra=extra or None)
    return rec


def formatted(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_a_record_is_one_json_line_with_the_bound_ids() -> None:
    with log_context(workspace_id="acme", pipeline_id="etl", run_id="r1"), log_context(task_id="t1", attempt=2):
        line = formatted(record("task finished\nwith a second line", event="task.finished", status="succeeded"))
    assert line["message"] == "task finished\nwith a second line"
    assert (line["level"], line["logger"], line["event"]) == ("INFO", "tickweave.test", "task.finished")
    assert {k: line[k] for k in ("workspace_id", "pipeline_id", "run_id", "task_id", "attempt")} == {
        "workspace_id": "acme", "pipeline_id": "etl", "run_id": "r1", "task_id": "t1", "attempt": 2}
    assert line["status"] == "succeeded"
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert list(line)[:5] == ["ts", "level", "logger", "message", "event"]


def test_the_context_ends_with_its_block_and_extra_wins() -> None:
    with log_context(run_id="outer", task_id=None):
        assert current_context() == {"run_id": "outer"}
        line = formatted(record(run_id="from-extra"))
        assert line["run_id"] == "from-extra"
    assert current_context() == {}
    assert "run_id" not in formatted(record())


def test_context_is_per_thread() -> None:
    seen: list[dict[str, Any]] = []
    with log_context(run_id="main"):
        thread = threading.Thread(target=lambda: seen.append(current_context()))
        thread.start()
        thread.join()
    assert seen == [{}]


def test_secret_fields_are_redacted() -> None:
    line = formatted(record(token="eyJhbGciOi.secret", tick_secret="s3cr3t", api_key="tw_abc",
                            headers={"Authorization": "Bearer tw_abc", "accept": "json"}, claims={"password": "p"}))
    assert line["token"] == line["tick_secret"] == line["api_key"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "accept": "json"}
    assert line["claims"] == {"password": REDACTED}
    text = json.dumps(line)
    assert "tw_abc" not in text and "s3cr3t" not in text and "eyJhbGciOi" not in text


def test_values_of_any_type_and_exceptions_stay_on_one_line() -> None:
    import datetime as dt
    import uuid

    task_id = uuid.uuid4()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        rec = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info(),
                                                extra={"task_id": task_id, "at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
    line = formatted(rec)
    assert line["task_id"] == str(task_id) and line["at"] == "2026-01-01T00:00:00Z"
    assert "ValueError: bad" in line["exception"] and line["level"] == "ERROR"


def test_log_event_copies_the_bound_ids_onto_the_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tickweave.test")
    with log_context(run_id="r9"):
        log_event(logging.getLogger("tickweave.test"), "run.finished", status="failed", name="clash", skipped=None)
    (rec,) = caplog.records
    assert (rec.__dict__["run_id"], rec.__dict__["event"], rec.__dict__["status"]) == ("r9", "run.finished", "failed")
    assert rec.getMessage() == "run finished" and rec.__dict__["name_"] == "clash"
    assert "skipped" not in rec.__dict__


@pytest.fixture
def clean_root() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_level_is_honoured_and_configuration_is_idempotent(
    clean_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "warning")
    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    assert configure_logging(stream=stream) is handler  # a second call adds nothing
    assert sum(1 for h in clean_root.handlers if h is handler) == 1
    logger = logging.getLogger("tickweave.level")
    logger.info("quiet")
    logger.warning("loud", extra={"event": "x.y", "run_id": "r"})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["message"], line["level"], line["run_id"]) for line in lines] == [("loud", "WARNING", "r")]

    configure_logging("DEBUG", stream=stream)  # the argument wins over LOG_LEVEL
    logger.debug("now visible")
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "now visible"
    assert logging.getLogger("botocore").level == logging.WARNING


def test_a_bad_log_level_falls_back_to_info(clean_root: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    stream = io.StringIO()
    configure_logging(stream=stream)
    assert clean_root.level == logging.INFO
    assert "LOG_LEVEL ignored" in stream.getvalue()
    with pytest.raises(ValueError, match="unknown log level"):
        parse_level("LOUD")
    assert parse_level("10") == logging.DEBUG
    monkeypatch.delenv("LOG_LEVEL")
    assert parse_level(None) == logging.INFO
