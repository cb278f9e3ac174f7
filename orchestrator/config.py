"""Settings read from the environment, once, into a frozen dataclass.

Every component takes a `Settings` explicitly; nothing else reads `os.environ`, so tests build
their own settings and the Lambda entry builds one per cold start.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

# A development key ring: derived from a fixed phrase so `make dev` works with no setup.
# Deployments set TICKWEAVE_TOKEN_KEYS; `Settings.is_dev_keyring` lets /api/info warn.
_DEV_TOKEN_KEY = base64.urlsafe_b64encode(hashlib.sha256(b"tickweave-dev-token-key").digest()).decode()


@dataclass(frozen=True)
class Settings:
    database_url: str = ""
    # S3 / STS
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    bucket: str = "tickweave-outputs"
    # When set, workers get STS AssumeRole credentials scoped by a session policy;
    # otherwise presigned URLs per object.
    storage_role_arn: str | None = None
    storage_credentials_ttl_s: int = 3600
    # Worker tokens: ordered (kid, base64url 32-byte key); the first one signs new tokens.
    token_keys: tuple[tuple[str, str], ...] = (("dev", _DEV_TOKEN_KEY),)
    token_issuer: str = "tickweave"
    token_audience: str = "tickweave-worker"
    tick_secret: str = "dev-tick-secret"
    # Base URL workers call back to (`{public_url}/api/callback/{task_id}`).
    public_url: str = "http://127.0.0.1:8000"
    # Task name -> transport name; "*" is the default.
    transports: Mapping[str, str] = field(default_factory=lambda: {"*": "local"})
    # `module:attribute` of the Worker the local transport runs in-process.
    local_worker: str | None = "examples.tasks:worker"
    local_worker_threads: int = 8
    tick_batch_size: int = 100
    # Consecutive dispatches that never reached a worker before the task is dead-lettered.
    max_dispatch_failures: int = 5
    # How long an Idempotency-Key keeps returning the run it created.
    idempotency_ttl_s: int = 86_400
    max_body_bytes: int = 1_048_576
    mode: str = "local"  # local | lambda

    @property
    def is_dev_keyring(self) -> bool:
        return any(key == _DEV_TOKEN_KEY for _, key in self.token_keys)

    def transport_for(self, task_name: str) -> str:
        return self.transports.get(task_name) or self.transports.get("*", "local")

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def _parse_token_keys(raw: str) -> tuple[tuple[str, str], ...]:
    """`kid1:key1,kid2:key2` -> ((kid1, key1), (kid2, key2)); the first key is active."""
    keys: list[tuple[str, str]] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, key = part.partition(":")
        if not sep or not kid or not key:
            raise ValueError("TICKWEAVE_TOKEN_KEYS must look like 'kid:base64url-32-byte-key,...'")
        keys.append((kid, key))
    if not keys:
        raise ValueError("TICKWEAVE_TOKEN_KEYS is empty")
    return tuple(keys)


def _parse_transports(raw: str) -> dict[str, str]:
    """`*=local,render=http` -> {"*": "local", "render": "http"}."""
    result: dict[str, str] = {"*": "local"}
    for part in raw.split(","):
        part = part.strip()
        if part:
            name, _, transport = part.partition("=")
            result[name.strip()] = transport.strip()
    return result


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    settings = Settings()
    changes: dict[str, object] = {}
    if "DATABASE_URL" in env:
        changes["database_url"] = env["DATABASE_URL"]
    if env.get("S3_ENDPOINT_URL"):
        changes["s3_endpoint_url"] = env["S3_ENDPOINT_URL"]
    if env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        changes["aws_region"] = env.get("AWS_REGION") or env["AWS_DEFAULT_REGION"]
    if env.get("TICKWEAVE_BUCKET"):
        changes["bucket"] = env["TICKWEAVE_BUCKET"]
    if env.get("TICKWEAVE_STORAGE_ROLE_ARN"):
        changes["storage_role_arn"] = env["TICKWEAVE_STORAGE_ROLE_ARN"]
    if env.get("TICKWEAVE_TOKEN_KEYS"):
        changes["token_keys"] = _parse_token_keys(env["TICKWEAVE_TOKEN_KEYS"])
    if env.get("TICKWEAVE_TICK_SECRET"):
        changes["tick_secret"] = env["TICKWEAVE_TICK_SECRET"]
    if env.get("TICKWEAVE_PUBLIC_URL"):
        changes["public_url"] = env["TICKWEAVE_PUBLIC_URL"].rstrip("/")
    if env.get("TICKWEAVE_TRANSPORTS"):
        changes["transports"] = _parse_transports(env["TICKWEAVE_TRANSPORTS"])
    if "TICKWEAVE_LOCAL_WORKER" in env:
        changes["local_worker"] = env["TICKWEAVE_LOCAL_WORKER"] or None
    if env.get("TICKWEAVE_TICK_BATCH_SIZE"):
        changes["tick_batch_size"] = int(env["TICKWEAVE_TICK_BATCH_SIZE"])
    if env.get("TICKWEAVE_MAX_DISPATCH_FAILURES"):
        changes["max_dispatch_failures"] = int(env["TICKWEAVE_MAX_DISPATCH_FAILURES"])
    if env.get("TICKWEAVE_IDEMPOTENCY_TTL_S"):
        changes["idempotency_ttl_s"] = int(env["TICKWEAVE_IDEMPOTENCY_TTL_S"])
    if env.get("TICKWEAVE_MAX_BODY_BYTES"):
        changes["max_body_bytes"] = int(env["TICKWEAVE_MAX_BODY_BYTES"])
    if env.get("TICKWEAVE_MODE"):
        changes["mode"] = env["TICKWEAVE_MODE"]
    return replace(settings, **changes)  # type: ignore[arg-type]
