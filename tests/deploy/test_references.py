"""`NAME_FROM` references: settings read from Secrets Manager and SSM Parameter Store (moto), in
every shape the template and docs/deploy.md allow."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest

from infra.s3 import MotoServer
from orchestrator.config import (
    SecretReferenceError,
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
