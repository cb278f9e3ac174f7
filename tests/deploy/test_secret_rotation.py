"""A rotated database password under a running API function: the pool reads DATABASE_URL_FROM
again, once, when the database refuses the password it has, and carries on without a restart.

The embedded Postgres trusts every local login, so each test makes a role of its own that must
log in with a password (a `pg_hba.conf` line for that role alone, placed first), and rotates
it as Secrets Manager's rotation does: the database's password changes (ALTER ROLE) and the
secret gets the new value; the environment's open connections then end (a restart, a failover,
RDS Proxy's idle timeout) so the next event needs a new login."""

from __future__ import annotations

import importlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import boto3
import psycopg
import pytest
from psycopg import sql

from infra.s3 import MotoServer
from orchestrator.config import aws_session
from orchestrator.db.connection import Database, is_authentication_failure

from .conftest import FakeContext, generated_token_key, load_event, wait_until


@dataclass
class PasswordRole:
    """A login role of the test server that must give its password."""

    admin_url: str
    name: str
    database: str
    socket_dir: str

    def url(self, password: str) -> str:
        """The URL as a DATABASE_URL secret holds it (a postgresql:// URL; the unix socket as `host`)."""
        return (f"postgresql://{self.name}:{quote(password, safe='')}@/{self.database}"
                f"?host={quote(self.socket_dir, safe='/')}")

    def set_password(self, password: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(self.name), sql.Literal(password)))

    def end_sessions(self) -> int:
        """pg_terminate_backend for every session of the role; returns how many there were."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            pids = [pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s", (self.name,)).fetchall()]
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                            (self.name,)).fetchone() == (0,), 10, "sessions did not end")
        return len(pids)


@pytest.fixture
def password_role(database_url: str, pg_admin_url: str) -> Iterator[PasswordRole]:
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
        if not str(info.get("host", "")).startswith("/") or not hba.exists():
            pytest.skip("needs the embedded Postgres (a local pg_hba.conf and a unix socket)")
        name = f"tw_rotation_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD 'first'").format(sql.Identifier(name)))
        original = hba.read_text()
        hba.write_text(f"local all {name} scram-sha-256\nhost all {name} all scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
    role = PasswordRole(pg_admin_url, name, str(info["dbname"]), str(info["host"]))
    # The line is in force: a wrong password is refused.
    wait_until(lambda: _refused(role.url("wrong")), 10, "pg_hba.conf was not reloaded")
    try:
        yield role
    finally:
        role.end_sessions()
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _refused(url: str) -> bool:
    try:
        psycopg.connect(url).close()
    except psycopg.OperationalError as exc:
        return is_authentication_failure(exc)
    return False


class SecretReads:
    """Secrets Manager calls made through the process's session (a botocore event hook)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._session = aws_session()
        self._session.events.register("before-call.secrets-manager", self._count, unique_id="test-secret-reads")

    def _count(self, event_name: str, **_: Any) -> None:
        self.counts[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        self._session.events.unregister("before-call.secrets-manager", unique_id="test-secret-reads")


@dataclass
class RotatingApi:
    api: ModuleType
    role: PasswordRole
    secrets: Any
    secret_arn: str
    reads: SecretReads

    def call(self, event: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.lambda_handler(event, FakeContext())
        return result

    def rotate(self, password: str) -> None:
        """As a rotation does it: the database's password, then the secret's value."""
        self.role.set_password(password)
        self.secrets.put_secret_value(SecretId=self.secret_arn, SecretString=self.role.url(password))


@pytest.fixture
def rotating_api(password_role: PasswordRole, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
                 restore_environ: None) -> Iterator[RotatingApi]:
    """handler.api configured as the template configures it, its database URL in a Secrets
    Manager secret (the other settings set directly, so that only the database secret is read)."""
    secrets = boto3.client("secretsmanager", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    arn: str = secrets.create_secret(Name=f"tickweave/rotation/{uuid.uuid4().hex}",
                                     SecretString=password_role.url("first"))["ARN"]
    for name in [name for name in os.environ if name.startswith("TICKWEAVE_") or name == "DATABASE_URL"]:
        monkeypatch.delenv(name)
    for name, value in {
        "TICKWEAVE_MODE": "lambda", "TICKWEAVE_LOCAL_WORKER": "", "TICKWEAVE_TRANSPORTS": "*=lambda",
        "TICKWEAVE_WORKER_FUNCTION": "tickweave-worker", "DATABASE_URL_FROM": arn,
        "TICKWEAVE_TOKEN_KEYS": "k1:" + generated_token_key(), "TICKWEAVE_TICK_SECRET": "rotation-tick-secret",
        "TICKWEAVE_PUBLIC_URL": "http://127.0.0.1:9", "TICKWEAVE_DB_CHECK_IDLE_S": "0",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_server.endpoint_url,
    }.items():
        monkeypatch.setenv(name, value)
    import handler.api

    api = importlib.reload(handler.api)
    reads = SecretReads()
    try:
        yield RotatingApi(api, password_role, secrets, arn, reads)
    finally:
        reads.close()
        if api._runtime is not None:
            api.get_runtime().engine.close()


def test_a_rotated_password_is_read_again_once_and_the_function_carries_on(rotating_api: RotatingApi) -> None:
    key = rotating_api.call({"tickweave": "create-key", "workspace": "rotation", "role": "viewer"})["key"]
    list_runs = {**load_event("apigw_v2_get_health.json")}
    list_runs["rawPath"] = list_runs["requestContext"]["http"]["path"] = "/api/runs"
    list_runs["headers"] = {**list_runs["headers"], "authorization": f"Bearer {key}"}
    for _ in range(3):
        assert rotating_api.call(list_runs)["statusCode"] == 200
    assert rotating_api.reads.total == 1  # once per cold start
    db: Database = rotating_api.api.get_runtime().engine.db

    rotating_api.rotate("second")
    assert rotating_api.role.end_sessions() == 1  # the environment's one pooled connection

    response = rotating_api.call(list_runs)  # no restart: the next event just works
    assert response["statusCode"] == 200, response
    assert rotating_api.reads.counts == {"GetSecretValue": 2}  # the cold start's, and one more
    assert ":second@" in db.url and db.opened == 1
    assert rotating_api.call(load_event("scheduler_tick.json"))["claimed"] == 0

    # Connections that end without a rotation reconnect with the password they have: no read.
    rotating_api.role.end_sessions()
    assert rotating_api.call(list_runs)["statusCode"] == 200
    assert rotating_api.reads.total == 2


def test_a_migration_invoke_reads_a_rotated_password_again(rotating_api: RotatingApi) -> None:
    assert rotating_api.call({"tickweave": "migrate"})["applied"] == []
    rotating_api.rotate("second")
    assert rotating_api.call({"tickweave": "migrate"})["applied"] == []
    assert rotating_api.reads.counts == {"GetSecretValue": 2}


def test_a_password_refused_again_after_reading_it_is_raised(password_role: PasswordRole) -> None:
    """The secret read again holds a password the database refuses too (the rotation is half
    done): the second refusal is raised, at once (not replayed for reconnect_within_s), after
    one read."""
    reads: list[str] = []

    def reread() -> str:
        reads.append("read")
        return password_role.url("also-wrong")

    db = Database(password_role.url("first"), reread_url=reread)
    try:
        with db.connection() as conn:
            assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        password_role.set_password("second")
        password_role.end_sessions()
        with pytest.raises(psycopg.OperationalError) as raised:
            db.run_statement(lambda conn: conn.execute("SELECT 1").fetchone(), reconnect_within_s=60)
        assert is_authentication_failure(raised.value)
        assert reads == ["read"] and db.opened == 0
        # Without a reader, a refusal is raised without one.
        bare = Database(password_role.url("first"))
        with pytest.raises(psycopg.OperationalError), bare.connection():
            pass
    finally:
        db.close()


def test_a_secret_that_still_holds_the_refused_password_is_not_tried_again(password_role: PasswordRole) -> None:
    reads: list[str] = []

    def reread() -> str:
        reads.append("read")
        return password_role.url("first")  # not rotated yet in the secret

    password_role.set_password("second")
    db = Database(password_role.url("first"), reread_url=reread)
    with pytest.raises(psycopg.OperationalError), db.connection():
        pass
    assert reads == ["read"] and db.url == password_role.url("first")


def test_refused_logins_racing_read_the_secret_once(password_role: PasswordRole) -> None:
    """Eight threads open a connection each at the same moment after a rotation: all are refused,
    one reads the secret, all log in with what it read."""
    reads: list[str] = []
    read_lock = threading.Lock()

    def reread() -> str:
        with read_lock:
            reads.append("read")
        return password_role.url("second")

    threads_n = 8
    db = Database(password_role.url("first"), max_size=threads_n, reread_url=reread)
    password_role.set_password("second")
    barrier = threading.Barrier(threads_n)
    pids: list[int] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            barrier.wait(10)
            with db.connection() as conn:
                pids.append(conn.info.backend_pid)
                barrier.wait(10)  # hold it until every thread has its own
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=open_one) for _ in range(threads_n)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert errors == []
        assert reads == ["read"]
        assert len(set(pids)) == threads_n and db.opened == threads_n
    finally:
        db.close()
