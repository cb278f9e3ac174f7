"""`NAME_FROM` references: settings read from Secrets Manager and SSM Parameter Store (moto), in
every shape the template and docs/deploy.md allow."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest

from infra.s3 import MotoServer
from orchestrator.config import (
    SecretReferenceError,
    aws_client,
    aws_session,
    database_url_reader,
    fetch_references,
    load_resolved_settings,
    parse_reference,
    resolve_references,
)
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, params_digest

from .conftest import generated_token_key


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", moto_server.endpoint_url)
    yield (boto3.client("secretsmanager", endpoint_url=moto_server.endpoint_url, region_name="us-east-1"),
           boto3.client("ssm", endpoint_url=moto_server.endpoint_url, region_name="us-east-1"))


def secret(client: Any, value: str) -> str:
    arn: str = client.create_secret(Name=f"t/{uuid.uuid4().hex}", SecretString=value)["ARN"]
    return arn


def parameter(client: Any, value: str, kind: str = "SecureString") -> str:
    name = f"/t/{uuid.uuid4().hex}"
    client.put_parameter(Name=name, Value=value, Type=kind)
    arn: str = client.get_parameter(Name=name)["Parameter"]["ARN"]
    return arn


def test_the_template_shapes_resolve(aws: tuple[Any, Any]) -> None:
    sm, ssm = aws
    key = generated_token_key()
    env = {
        "DATABASE_URL_FROM": secret(sm, "postgresql://app:pw@db.example:5432/tickweave"),
        "TICKWEAVE_TOKEN_KEYS_FROM": secret(sm, json.dumps({"kid": "k1", "key": key})),
        "TICKWEAVE_TICK_SECRET_FROM": secret(sm, "tick-secret-value"),
        "TICKWEAVE_PUBLIC_URL_FROM": parameter(ssm, "https://abc123.execute-api.us-east-1.amazonaws.com", "String"),
    }
    settings = load_resolved_settings(env)
    assert settings.database_url == "postgresql://app:pw@db.example:5432/tickweave"
    assert settings.token_keys == (("k1", key),)
    assert settings.tick_secret == "tick-secret-value"
    assert settings.public_url == "https://abc123.execute-api.us-east-1.amazonaws.com"


def test_a_generated_token_key_is_a_working_256_bit_key() -> None:
    """GenerateSecretString gives 43 characters of [A-Za-z0-9]: valid base64url for 32 bytes."""
    for _ in range(20):
        keyring = TokenKeyring([("k1", generated_token_key())], issuer="i", audience="a")
        claims = TaskClaims(task_id="t", attempt=1, claim_token="c", workspace="w", task_name="echo",
                            params_sha256=params_digest({}), expires_at=2_000_000_000)
        assert keyring.read(keyring.issue(claims), now=1_000_000_000).task_id == "t"


def test_an_rds_secret_becomes_a_url_with_the_proxy_host(aws: tuple[Any, Any]) -> None:
    sm, _ = aws
    rds = {"engine": "postgres", "username": "tick weave", "password": "p@ss/word:%", "host": "db-1.internal",
           "port": 5432, "dbname": "orders"}
    env = {"DATABASE_URL_FROM": secret(sm, json.dumps(rds)),
           "TICKWEAVE_DB_HOST": "proxy.proxy-abc.us-east-1.rds.amazonaws.com"}
    url = resolve_references(env)["DATABASE_URL"]
    parts = urlsplit(url)
    assert (unquote(parts.username or ""), unquote(parts.password or "")) == ("tick weave", "p@ss/word:%")
    assert (parts.hostname, parts.port, parts.path, parts.query) == (
        "proxy.proxy-abc.us-east-1.rds.amazonaws.com", 5432, "/orders", "sslmode=require")


def test_an_rds_managed_master_secret_needs_the_host(aws: tuple[Any, Any]) -> None:
    sm, _ = aws
    env = {"DATABASE_URL_FROM": secret(sm, json.dumps({"username": "postgres", "password": "x"}))}
    with pytest.raises(SecretReferenceError, match="TICKWEAVE_DB_HOST"):
        resolve_references(env)
    env.update(TICKWEAVE_DB_HOST="db.internal", TICKWEAVE_DB_NAME="tickweave", TICKWEAVE_DB_SSLMODE="verify-full")
    assert resolve_references(env)["DATABASE_URL"] == (
        "postgresql://postgres:x@db.internal:5432/tickweave?sslmode=verify-full")


def test_ssm_securestring_and_json_fields(aws: tuple[Any, Any]) -> None:
    sm, ssm = aws
    shared = secret(sm, json.dumps({"DATABASE_URL": "postgresql://a@h/d", "tick": "from-a-field"}))
    env = {"DATABASE_URL_FROM": shared, "TICKWEAVE_TICK_SECRET_FROM": f"{shared}#tick",
           "TICKWEAVE_TOKEN_KEYS_FROM": parameter(ssm, "k2:" + generated_token_key() + ",k1:" + generated_token_key())}
    resolved = resolve_references(env)
    assert resolved["DATABASE_URL"] == "postgresql://a@h/d" and resolved["TICKWEAVE_TICK_SECRET"] == "from-a-field"
    assert [kid for kid, _ in load_resolved_settings(env).token_keys] == ["k2", "k1"]


def test_short_forms_by_name(aws: tuple[Any, Any]) -> None:
    sm, ssm = aws
    sm.create_secret(Name="tickweave/short", SecretString="s3cret")
    ssm.put_parameter(Name="/tickweave/short-url", Value="https://x.example", Type="String")
    resolved = resolve_references({"TICKWEAVE_TICK_SECRET_FROM": "secretsmanager:tickweave/short",
                                   "TICKWEAVE_PUBLIC_URL_FROM": "ssm:/tickweave/short-url"})
    assert resolved == {"TICKWEAVE_TICK_SECRET": "s3cret", "TICKWEAVE_PUBLIC_URL": "https://x.example"}


def test_each_secret_is_read_once_and_a_set_value_wins() -> None:
    reads: list[str] = []

    def fetch(reference: str) -> str:
        reads.append(reference)
        return json.dumps({"DATABASE_URL": "postgresql://x@h/d", "TICKWEAVE_TICK_SECRET": "t"})

    ref = "arn:aws:secretsmanager:us-east-1:123456789012:secret:app-AbCdEf"
    env = {"DATABASE_URL_FROM": ref, "TICKWEAVE_TICK_SECRET_FROM": ref, "TICKWEAVE_TOKEN_KEYS_FROM": ref,
           "TICKWEAVE_TOKEN_KEYS": "dev:" + generated_token_key()}
    resolved = resolve_references(env, fetch)
    assert reads == [ref]
    assert resolved == {"DATABASE_URL": "postgresql://x@h/d", "TICKWEAVE_TICK_SECRET": "t"}


def test_errors_name_the_variable_and_reference_but_never_a_value(aws: tuple[Any, Any]) -> None:
    sm, _ = aws
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf"
    with pytest.raises(SecretReferenceError, match="ResourceNotFoundException") as raised:
        resolve_references({"TICKWEAVE_TICK_SECRET_FROM": missing})
    assert missing in str(raised.value)
    wrong_shape = secret(sm, json.dumps({"password": "hunter2-do-not-print"}))
    with pytest.raises(SecretReferenceError, match="TICKWEAVE_TICK_SECRET") as raised:
        resolve_references({"TICKWEAVE_TICK_SECRET_FROM": wrong_shape})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("reference", [
    "arn:aws:s3:::bucket/key", "arn:aws:ssm:us-east-1:123456789012:document/x", "vault:secret/x", "plain-text",
])
def test_what_is_not_a_reference(reference: str) -> None:
    with pytest.raises(SecretReferenceError):
        parse_reference(reference)


def test_arns_carry_their_region() -> None:
    assert parse_reference("arn:aws:secretsmanager:eu-west-1:123456789012:secret:x-AbCdEf") == (
        "secretsmanager", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:x-AbCdEf", "eu-west-1")
    assert parse_reference("arn:aws-us-gov:ssm:us-gov-west-1:123456789012:parameter/tw/db")[2] == "us-gov-west-1"
    assert parse_reference("ssm:/tw/db") == ("ssm", "/tw/db", None)


class ApiCalls:
    """The AWS API calls made through the process's session, counted by a botocore event hook
    (`before-call.<service>.<Operation>`), e.g. {"secrets-manager.BatchGetSecretValue": 1}."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._session = aws_session()
        self._session.events.register("before-call", self._count, unique_id="test-api-calls")

    def _count(self, event_name: str, **_: Any) -> None:
        self.counts[event_name.removeprefix("before-call.")] += 1

    def close(self) -> None:
        self._session.events.unregister("before-call", unique_id="test-api-calls")


@pytest.fixture
def api_calls(aws: tuple[Any, Any]) -> Iterator[ApiCalls]:
    calls = ApiCalls()
    yield calls
    calls.close()


def test_the_secrets_are_read_in_one_call_and_the_parameters_in_another(aws: tuple[Any, Any],
                                                                         api_calls: ApiCalls) -> None:
    sm, ssm = aws
    key = generated_token_key()
    sm.create_secret(Name="tickweave/batch-by-name", SecretString="by-name")
    partial_arn = secret(sm, "postgresql://app:pw@db.example:5432/tickweave").rsplit("-", 1)[0]
    env = {
        "DATABASE_URL_FROM": partial_arn,  # an ARN without its random suffix
        "TICKWEAVE_TOKEN_KEYS_FROM": secret(sm, json.dumps({"kid": "k1", "key": key})),
        "TICKWEAVE_TICK_SECRET_FROM": "secretsmanager:tickweave/batch-by-name",
        "TICKWEAVE_PUBLIC_URL_FROM": parameter(ssm, "https://api.example", "String"),
    }
    assert resolve_references(env) == {
        "DATABASE_URL": "postgresql://app:pw@db.example:5432/tickweave", "TICKWEAVE_TOKEN_KEYS": f"k1:{key}",
        "TICKWEAVE_TICK_SECRET": "by-name", "TICKWEAVE_PUBLIC_URL": "https://api.example",
    }
    assert api_calls.counts == {"secrets-manager.BatchGetSecretValue": 1, "ssm.GetParameter": 1}

    api_calls.counts.clear()
    several = {reference: value for reference, value in
               ((parameter(ssm, f"value-{n}"), f"value-{n}") for n in range(3))}
    assert fetch_references(list(several)) == several
    assert api_calls.counts == {"ssm.GetParameters": 1}


def test_one_secret_is_one_get_secret_value(aws: tuple[Any, Any], api_calls: ApiCalls) -> None:
    sm, _ = aws
    assert resolve_references({"TICKWEAVE_TICK_SECRET_FROM": secret(sm, "alone")}) == {"TICKWEAVE_TICK_SECRET": "alone"}
    assert api_calls.counts == {"secrets-manager.GetSecretValue": 1}


def test_the_lookups_share_one_session(aws: tuple[Any, Any]) -> None:
    sm, ssm = aws
    session = aws_session()
    env = {"TICKWEAVE_TICK_SECRET_FROM": secret(sm, "a"), "TICKWEAVE_PUBLIC_URL_FROM": parameter(ssm, "b")}
    for _ in range(3):
        resolve_references(env)
    assert aws_session() is session
    assert aws_client("sqs")._loader is session._session.get_component("data_loader")


def test_a_missing_secret_or_parameter_in_a_batch_is_named(aws: tuple[Any, Any]) -> None:
    sm, ssm = aws
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf"
    env = {"TICKWEAVE_TICK_SECRET_FROM": secret(sm, "hunter2-do-not-print"), "TICKWEAVE_TOKEN_KEYS_FROM": missing}
    with pytest.raises(SecretReferenceError, match="ResourceNotFoundException") as raised:
        resolve_references(env)
    assert missing in str(raised.value) and "hunter2" not in str(raised.value)

    missing_parameter = "arn:aws:ssm:us-east-1:123456789012:parameter/t/nope"
    with pytest.raises(SecretReferenceError, match="ParameterNotFound") as raised:
        fetch_references([parameter(ssm, "there"), missing_parameter])
    assert missing_parameter in str(raised.value)


def test_the_database_url_is_read_again_fresh(aws: tuple[Any, Any], api_calls: ApiCalls) -> None:
    """What the connection pool calls after a refused login: the current value, not a cached one."""
    sm, _ = aws
    arn = secret(sm, "postgresql://app:old@db.example/tickweave")
    env = {"DATABASE_URL_FROM": arn, "TICKWEAVE_TICK_SECRET": "set-directly"}
    read = database_url_reader(env)
    assert read is not None and read() == "postgresql://app:old@db.example/tickweave"
    sm.put_secret_value(SecretId=arn, SecretString="postgresql://app:new@db.example/tickweave")
    assert read() == "postgresql://app:new@db.example/tickweave"
    assert api_calls.counts == {"secrets-manager.GetSecretValue": 2}
    assert database_url_reader({"DATABASE_URL": "postgresql://x@h/d", "DATABASE_URL_FROM": arn}) is None
    assert database_url_reader({"TICKWEAVE_TICK_SECRET_FROM": arn}) is None
