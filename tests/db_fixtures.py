"""Database fixtures: one Postgres per test session (embedded, or DATABASE_URL's server), a
migrated template database, and a fresh database per test cloned from it (isolation by
construction; CREATE DATABASE ... TEMPLATE is a file copy, tens of milliseconds)."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.postgres import (
    create_database,
    drop_database,
    server_url,
    start_embedded_postgres,
    stop_embedded_postgres,
    with_database,
)
from orchestrator.db.migrate import migrate
from orchestrator.store.invariants import find_violations

TEMPLATE_DB = "tickweave_test_template"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    data_dir = Path(tempfile.mkdtemp(prefix="tickweave-test-pg-")) / "pgdata"
    handle = start_embedded_postgres(data_dir)
    yield server_url(handle)
    stop_embedded_postgres(handle)


@pytest.fixture(scope="session")
def template_db_url(pg_admin_url: str) -> str:
    create_database(pg_admin_url, TEMPLATE_DB, exist_ok=False)
    url = with_database(pg_admin_url, TEMPLATE_DB)
    migrate(url)
    return url


@pytest.fixture
def database_url(request: pytest.FixtureRequest, pg_admin_url: str, template_db_url: str) -> Iterator[str]:
    """A fresh database for one test. When the test is done (and every fixture built on this
    one is torn down: servers stopped, workers joined), the DAG's books are checked: any
    violation of the invariants fails the test (`@pytest.mark.books_unchecked` opts out a test
    that corrupts them on purpose)."""
    name = f"tickweave_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_url, name, template=TEMPLATE_DB)
    url = with_database(pg_admin_url, name)
    yield url
    try:
        if request.node.get_closest_marker("books_unchecked") is None:
            violations = find_violations(url)
            if violations:
                pytest.fail(
                    f"the DAG's books are broken after {request.node.nodeid}:\n"
                    + "\n".join(f"  [{v.check}] run {v.run_id} task {v.task_id}: {v.message}" for v in violations[:30]),
                    pytrace=False,
                )
    finally:
        drop_database(pg_admin_url, name)
