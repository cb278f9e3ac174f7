"""Settings read from the environment, once, into a frozen dataclass.

Every component takes a `Settings` explicitly; nothing else reads `os.environ`, so tests build
their own settings and the Lambda entry builds one per cold start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

# A development key ring and tick secret: derived from a fixed phrase / fixed, so `make dev`
# works with no setup. Anyone can compute them, so `lambda` mode refuses to start with either
# (`check_mode`); deployments set TICKWEAVE_TOKEN_KEYS and TICKWEAVE_TICK_SECRET.
_DEV_TOKEN_KEY = base64.urlsafe_b64encode(hashlib.sha256(b"tickweave-dev-token-key").digest()).decode()
_DEV_TICK_SECRET = "dev-tick-secret"
# Callbacks one `POST /api/callbacks` may carry (TICKWEAVE_MAX_CALLBACKS_PER_BATCH).
DEFAULT_MAX_CALLBACKS_PER_BATCH = 100


class ConfigurationError(ValueError):
    """Settings this process must not run with; the message names each setting to fix."""


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
    tick_secret: str = _DEV_TICK_SECRET
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
    # Dead-letter entries older than this many days are purged by the tick, at most
    # `dlq_purge_batch` per tick, oldest first; 0 keeps them forever.
    dlq_retention_days: int = 30
    dlq_purge_batch: int = 500
    # A registered worker not heard from (registration, heartbeat or callback) for this long is
    # shown as "stale". Must be well over WORKER_SEEN_EVERY_S (orchestrator/engine/workers.py).
    worker_stale_after_s: int = 300
    # The most callbacks one `POST /api/callbacks` may carry (more: a 422 naming the limit).
    max_callbacks_per_batch: int = DEFAULT_MAX_CALLBACKS_PER_BATCH
    mode: str = "local"  # local | lambda
    # A pooled connection idle this long is checked (an empty query) before reuse: after a
    # Lambda environment was frozen, the server or RDS Proxy may have closed it.
    db_check_idle_s: float = 5.0
    # Name or ARN of the worker Lambda the `lambda` transport invokes (InvocationType=Event).
    worker_function: str | None = None
    # Dispatch endpoint of an HTTP worker service the `http` transport POSTs to
    # (e.g. http://127.0.0.1:9000/dispatch), and the bearer secret it expects, if any.
    worker_url: str | None = None
    worker_auth_token: str | None = None
    # Worker services registered through the API (tenants' endpoints) never get
    # `worker_auth_token`: each registration has its own signing secret, derived from this key
    # (default: derived from the active token key; set it to rotate token keys without
    # changing the secrets registered workers hold).
    worker_signing_key: str | None = None
    # Registered http endpoints on loopback, link-local, private, unspecified or multicast
    # addresses are refused (at registration and at each dispatch) unless this is on: for
    # `make dev` and tests, never for a shared deployment (it would let a tenant reach the
    # orchestrator's own network).
    allow_private_worker_endpoints: bool = False
    # SQS queue the `sqs` transport sends dispatches to; workers poll it (`Worker.run_sqs`) or
    # an event source mapping feeds it to the worker Lambda.
    worker_queue_url: str | None = None
    # Notifications (docs/notifications.md): deliveries the tick sends at once (each round of a
    # tick takes at most notify_timeout_s), retries with backoff from notify_retry_base_s
    # doubling up to notify_retry_max_s, given up after notify_max_attempts attempts or
    # notify_give_up_after_s after the event; events kept notify_retention_days; after a
    # rotation the previous signing secret signs alongside the new one for notify_secret_grace_s.
    notify_batch_size: int = 16
    notify_timeout_s: float = 10.0
    notify_retry_base_s: float = 30.0
    notify_retry_max_s: float = 21_600.0
    notify_max_attempts: int = 12
    notify_give_up_after_s: float = 86_400.0
    notify_retention_days: int = 30
    notify_secret_grace_s: int = 86_400

    @property
    def is_dev_keyring(self) -> bool:
        return any(key == _DEV_TOKEN_KEY for _, key in self.token_keys)

    def missing_secrets(self) -> list[str]:
        """The secrets still at their public development values, as the settings to set."""
        missing = []
        if self.is_dev_keyring:
            missing.append("TICKWEAVE_TOKEN_KEYS (or TICKWEAVE_TOKEN_KEYS_FROM): the development token key is in use")
        if not self.tick_secret or self.tick_secret == _DEV_TICK_SECRET:
            missing.append("TICKWEAVE_TICK_SECRET (or TICKWEAVE_TICK_SECRET_FROM): the development tick secret is in use")
        return missing

    def check_mode(self) -> None:
        """In `lambda` mode, refuse to run on the development token key or tick secret.

        Fail closed: a deployment that lost a secret reference must not come up accepting
        tokens anyone can forge and ticks anyone can send. Local mode keeps its defaults.
        """
        if self.mode != "lambda":
            return
        missing = self.missing_secrets()
        if missing:
            raise ConfigurationError(
                "refusing to start in lambda mode without its secrets; set " + "; ".join(missing)
            )

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


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _whole_number(name: str, raw: str, *, minimum: int = 0) -> int:
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 9 or int(value) < minimum:
        raise ValueError(f"{name} must be a whole number, {minimum} or more; got {raw!r}")
    return int(value)


def _parse_transports(raw: str) -> dict[str, str]:
    """`*=local,render=http` -> {"*": "local", "render": "http"}."""
    result: dict[str, str] = {"*": "local"}
    for part in raw.split(","):
        part = part.strip()
        if part:
            name, _, transport = part.partition("=")
            result[name.strip()] = transport.strip()
    return result


# Settings.<name> read from TICKWEAVE_<NAME>.
_NOTIFY_SETTINGS: dict[str, Callable[[str], object]] = {
    "notify_batch_size": int, "notify_timeout_s": float, "notify_retry_base_s": float,
    "notify_retry_max_s": float, "notify_max_attempts": int, "notify_give_up_after_s": float,
    "notify_retention_days": int, "notify_secret_grace_s": int,
}


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
    if env.get("TICKWEAVE_DLQ_RETENTION_DAYS"):
        changes["dlq_retention_days"] = _whole_number("TICKWEAVE_DLQ_RETENTION_DAYS", env["TICKWEAVE_DLQ_RETENTION_DAYS"])
    if env.get("TICKWEAVE_WORKER_STALE_AFTER_S"):
        changes["worker_stale_after_s"] = _whole_number(
            "TICKWEAVE_WORKER_STALE_AFTER_S", env["TICKWEAVE_WORKER_STALE_AFTER_S"], minimum=60)
    if env.get("TICKWEAVE_MAX_BODY_BYTES"):
        changes["max_body_bytes"] = int(env["TICKWEAVE_MAX_BODY_BYTES"])
    if env.get("TICKWEAVE_MAX_CALLBACKS_PER_BATCH"):
        changes["max_callbacks_per_batch"] = int(env["TICKWEAVE_MAX_CALLBACKS_PER_BATCH"])
    if env.get("TICKWEAVE_MODE"):
        changes["mode"] = env["TICKWEAVE_MODE"]
    if env.get("TICKWEAVE_DB_CHECK_IDLE_S"):
        changes["db_check_idle_s"] = float(env["TICKWEAVE_DB_CHECK_IDLE_S"])
    if env.get("TICKWEAVE_WORKER_FUNCTION"):
        changes["worker_function"] = env["TICKWEAVE_WORKER_FUNCTION"]
    if env.get("TICKWEAVE_WORKER_URL"):
        changes["worker_url"] = env["TICKWEAVE_WORKER_URL"]
    if env.get("TICKWEAVE_WORKER_AUTH_TOKEN"):
        changes["worker_auth_token"] = env["TICKWEAVE_WORKER_AUTH_TOKEN"]
    if env.get("TICKWEAVE_WORKER_QUEUE_URL"):
        changes["worker_queue_url"] = env["TICKWEAVE_WORKER_QUEUE_URL"]
    if env.get("TICKWEAVE_WORKER_SIGNING_KEY"):
        changes["worker_signing_key"] = env["TICKWEAVE_WORKER_SIGNING_KEY"]
    for name, cast in _NOTIFY_SETTINGS.items():
        if env.get("TICKWEAVE_" + name.upper()):
            changes[name] = cast(env["TICKWEAVE_" + name.upper()])
    if env.get("TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS"):
        changes["allow_private_worker_endpoints"] = _flag("TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS",
                                                          env["TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS"])
    return replace(settings, **changes)  # type: ignore[arg-type]


# --- Values kept in Secrets Manager or SSM Parameter Store -------------------------------------
#
# On AWS the function configuration holds references, not secrets: `NAME_FROM=<reference>` fills
# the variable NAME, once per cold start, on the first event (never at import). A reference is a
# Secrets Manager secret ARN, an SSM parameter ARN, or `secretsmanager:<name>` / `ssm:<name>`,
# optionally followed by `#field` to pick one field of a JSON secret. NAME set directly wins.

REFERENCE_SUFFIX = "_FROM"
REFERABLE_VARIABLES = ("DATABASE_URL", "TICKWEAVE_TOKEN_KEYS", "TICKWEAVE_TICK_SECRET", "TICKWEAVE_PUBLIC_URL")

Fetch = Callable[[str], str]


class SecretReferenceError(Exception):
    """A `NAME_FROM` reference that could not be resolved; the message never holds a secret value."""


def parse_reference(reference: str) -> tuple[str, str, str | None]:
    """`reference` (without `#field`) -> (service, identifier, region or None).

    service is `secretsmanager` or `ssm`; the identifier is what the service's API takes (an ARN
    is passed as is: both GetSecretValue and GetParameter accept one)."""
    if reference.startswith("arn:"):
        parts = reference.split(":", 5)
        if len(parts) == 6 and parts[2] in ("secretsmanager", "ssm") and parts[5]:
            if parts[2] == "ssm" and not parts[5].startswith("parameter/"):
                raise SecretReferenceError(f"{reference!r} is not an SSM parameter ARN")
            return parts[2], reference, parts[3] or None
        raise SecretReferenceError(
            f"{reference!r} is neither a Secrets Manager secret ARN nor an SSM parameter ARN"
        )
    service, sep, name = reference.partition(":")
    if sep and service in ("secretsmanager", "ssm") and name:
        return service, name, None
    raise SecretReferenceError(
        f"{reference!r} is not a reference: use a secret or parameter ARN, 'secretsmanager:NAME' or 'ssm:NAME'"
    )


def fetch_reference(reference: str) -> str:
    """Read one secret or parameter with the ambient AWS credentials (the function's role).

    boto3 is imported here, not at module level, so that importing the configuration stays cheap;
    endpoints follow the standard AWS settings (`AWS_ENDPOINT_URL_SECRETS_MANAGER`, ...)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    service, identifier, region = parse_reference(reference)
    session = boto3.session.Session()
    client: Any = session.client(service, region_name=region or session.region_name or "us-east-1")  # type: ignore[call-overload]
    try:
        if service == "secretsmanager":
            response = client.get_secret_value(SecretId=identifier)
            if "SecretString" not in response:
                raise SecretReferenceError(f"{reference}: binary secrets are not supported; store text")
            return str(response["SecretString"])
        return str(client.get_parameter(Name=identifier, WithDecryption=True)["Parameter"]["Value"])
    except (BotoCoreError, ClientError) as exc:
        raise SecretReferenceError(f"{reference}: {exc}") from exc


def database_url_from_parts(parts: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """A `postgresql://` URL from an RDS-style secret (`username`, `password`, `host`, `port`,
    `dbname`, as RDS and RDS Proxy secrets hold them). TICKWEAVE_DB_HOST (an RDS Proxy endpoint),
    TICKWEAVE_DB_PORT and TICKWEAVE_DB_NAME override the secret's fields; TICKWEAVE_DB_SSLMODE
    defaults to `require` (RDS and RDS Proxy speak TLS)."""
    host = env.get("TICKWEAVE_DB_HOST") or str(parts.get("host") or "")
    if not host:
        raise SecretReferenceError(
            "the database secret has no 'host' (an RDS-managed master secret holds only the user "
            "and password): set TICKWEAVE_DB_HOST (the DatabaseHost parameter of the template)"
        )
    port = env.get("TICKWEAVE_DB_PORT") or str(parts.get("port") or 5432)
    dbname = env.get("TICKWEAVE_DB_NAME") or str(parts.get("dbname") or "postgres")
    sslmode = env.get("TICKWEAVE_DB_SSLMODE") or "require"
    user = quote(str(parts["username"]), safe="")
    password = quote(str(parts["password"]), safe="")
    netloc_host = f"[{host}]" if ":" in host else host
    return f"postgresql://{user}:{password}@{netloc_host}:{port}/{quote(dbname, safe='')}?sslmode={quote(sslmode)}"


def _interpret(name: str, raw: str, selected: str, env: Mapping[str, str]) -> str:
    """The value of variable `name` from a secret's text (plain, or JSON in a known shape)."""
    data: Any = None
    if raw.lstrip().startswith("{"):
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
    if selected:
        if not isinstance(data, dict) or selected not in data:
            raise SecretReferenceError(f"{name}: the secret is not a JSON object with a field {selected!r}")
        value = data[selected]
        if isinstance(value, dict | list):
            raise SecretReferenceError(f"{name}: field {selected!r} of the secret is not a plain value")
        return str(value)
    if isinstance(data, dict):
        if isinstance(data.get(name), str | int | float):
            return str(data[name])
        if name == "DATABASE_URL" and "username" in data and "password" in data:
            return database_url_from_parts(data, env)
        if name == "TICKWEAVE_TOKEN_KEYS" and isinstance(data.get("kid"), str) and isinstance(data.get("key"), str):
            return f"{data['kid']}:{data['key']}"
        raise SecretReferenceError(
            f"{name}: the secret is a JSON object without a field {name!r} or another shape this "
            "variable understands; add '#field' to the reference to pick a field"
        )
    return raw.strip()


def resolve_references(env: Mapping[str, str] | None = None, fetch: Fetch | None = None) -> dict[str, str]:
    """Fetch every `NAME_FROM` reference whose NAME is not set directly; returns {NAME: value}.

    Each distinct secret is read once, however many variables point into it."""
    env = os.environ if env is None else env
    fetch = fetch or fetch_reference
    fetched: dict[str, str] = {}
    resolved: dict[str, str] = {}
    for name in REFERABLE_VARIABLES:
        reference = env.get(name + REFERENCE_SUFFIX, "").strip()
        if not reference or env.get(name):
            continue
        base, _, selected = reference.partition("#")
        if base not in fetched:
            try:
                fetched[base] = fetch(base)
            except SecretReferenceError:
                raise
            except Exception as exc:
                raise SecretReferenceError(f"{name}{REFERENCE_SUFFIX}={base}: {type(exc).__name__}: {exc}") from exc
        resolved[name] = _interpret(name, fetched[base], selected, env)
    return resolved


def load_resolved_settings(env: Mapping[str, str] | None = None, fetch: Fetch | None = None) -> Settings:
    """`load_settings` after resolving `NAME_FROM` references (a no-op when there are none)."""
    env = os.environ if env is None else env
    resolved = resolve_references(env, fetch)
    return load_settings({**env, **resolved} if resolved else env)
