"""Settings the Lambda runtime and the template hand the code: the log level Lambda filters by
(ApplicationLogLevel, as AWS_LAMBDA_LOG_LEVEL) and the database's TLS verification."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.config import database_url_from_parts
from orchestrator.logs import configure_logging, parse_level


@pytest.fixture
def clean_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    monkeypatch.delenv("AWS_LAMBDA_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_lambdas_application_log_level_is_honoured(clean_root: logging.Logger,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "WARN")  # what Lambda sets for ApplicationLogLevel: WARN
    stream = io.StringIO()
    configure_logging(stream=stream)
    logger = logging.getLogger("tickweave.lambda-level")
    logger.info("dropped")
    logger.warning("kept")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["kept"]


def test_the_stricter_of_log_level_and_lambdas_wins(clean_root: logging.Logger,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Lambda drops lines below its level: producing them would only cost time
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "INFO")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    assert parse_level(None) == logging.INFO
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    assert parse_level(None) == logging.ERROR
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "FATAL")
    assert parse_level(None) == logging.CRITICAL
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "TRACE")  # Lambda's lowest is Python's DEBUG
    monkeypatch.delenv("LOG_LEVEL")
    assert parse_level(None) == logging.DEBUG


def test_verify_full_names_the_ca_bundle() -> None:
    parts = {"username": "app", "password": "pw", "host": "db.cluster-abc.eu-west-1.rds.amazonaws.com"}
    env = {"TICKWEAVE_DB_SSLMODE": "verify-full", "TICKWEAVE_DB_SSLROOTCERT": "/var/task/global-bundle.pem"}
    query = parse_qs(urlsplit(database_url_from_parts(parts, env)).query)
    assert query == {"sslmode": ["verify-full"], "sslrootcert": ["/var/task/global-bundle.pem"]}
    # the template passes the parameters' defaults: require, and no bundle
    query = parse_qs(urlsplit(database_url_from_parts(parts, {"TICKWEAVE_DB_SSLMODE": "require",
                                                               "TICKWEAVE_DB_SSLROOTCERT": ""})).query)
    assert query == {"sslmode": ["require"]}
