"""Connections fit for Lambda and RDS Proxy: one connection reused across invocations, replaced
when the server closed it while the environment was frozen, no prepared statements, no session
state. A connection is "broken between invocations" here the way a database restart, a failover
or RDS Proxy's idle timeout breaks it: the server ends the backend (pg_terminate_backend)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from orchestrator.db.connection import Database

from .conftest import AwsStack, load_event, wait_until


def backend_pid(db: Database) -> int:
    with db.connection() as conn:
        return conn.info.backend_pid


def terminate(admin_url: str, pid: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        # until the backend is gone, so the client finds a closed socket
        wait_until(lambda: conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is None,
                   10, f"backend {pid} did not exit")


@pytest.fixture
def checked_db(database_url: str) -> Iterator[Database]:
    db = Database(database_url, check_idle_s=0.0)  # check every reused connection
    yield db
    db.close()


@pytest.fixture
def unchecked_db(database_url: str) -> Iterator[Database]:
    db = Database(database_url, check_idle_s=None)
    yield db
    db.close()


def test_a_connection_killed_while_idle_is_replaced_before_use(checked_db: Database, pg_admin_url: str) -> None:
    first = backend_pid(checked_db)
    assert backend_pid(checked_db) == first  # reused while alive
    terminate(pg_admin_url, first)

    with checked_db.connection() as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        assert conn.info.backend_pid != first
    assert checked_db.opened == 1


def test_a_transaction_on_a_connection_killed_while_idle_begins_again(unchecked_db: Database,
                                                                      pg_admin_url: str) -> None:
    terminate(pg_admin_url, backend_pid(unchecked_db))

    with unchecked_db.transaction() as conn:  # BEGIN fails on the dead one; nothing ran, so retried
        assert conn.execute("SELECT count(*) AS n FROM pipelines").fetchone() == {"n": 0}
    assert unchecked_db.opened == 1


def test_without_the_check_a_statement_on_a_dead_connection_fails_once(unchecked_db: Database,
                                                                       pg_admin_url: str) -> None:
    """Why reused connections are checked: outside a transaction the first statement is the
    caller's, which cannot be replayed blindly. The failure drops the connection; the next
    checkout opens a new one."""
    terminate(pg_admin_url, backend_pid(unchecked_db))
    with pytest.raises(psycopg.OperationalError), unchecked_db.connection() as conn:
        conn.execute("SELECT 1")
    assert unchecked_db.opened == 0
    with unchecked_db.connection() as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    assert unchecked_db.opened == 1


def test_connections_are_rds_proxy_safe(checked_db: Database) -> None:
    """No server-side prepared statements (they pin an RDS Proxy session), a connect timeout."""
    with checked_db.connection() as conn:
        for _ in range(10):  # psycopg would prepare from the 5th execution by default
            conn.execute("SELECT id FROM pipelines WHERE workspace_id = %s", ("w",))
        assert conn.prepare_threshold is None
        assert conn.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone() == {"n": 0}
        assert conn.info.get_parameters().get("connect_timeout") == "10"


def test_the_api_function_heals_a_connection_broken_between_invocations(aws_stack: AwsStack,
                                                                       pg_admin_url: str) -> None:
    key = aws_stack.call({"tickweave": "create-key", "workspace": "deploy", "role": "viewer"})["key"]
    list_runs = aws_stack.http_event("GET", "/api/runs", key=key)
    db = aws_stack.api.get_runtime().engine.db

    for _ in range(3):
        assert aws_stack.call(list_runs)["statusCode"] == 200
    assert db.opened == 1  # one connection across invocations
    first = backend_pid(db)

    terminate(pg_admin_url, first)  # e.g. RDS Proxy's idle client timeout while frozen
    response = aws_stack.call(list_runs)
    assert response["statusCode"] == 200, response
    assert json.loads(response["body"])["items"] == []

    second = backend_pid(db)
    assert second != first and db.opened == 1
    terminate(pg_admin_url, second)  # and the tick, which starts with a transaction
    assert aws_stack.call(load_event("scheduler_tick.json"))["claimed"] == 0
    assert db.opened == 1
