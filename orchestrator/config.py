"""Settings read from the environment, once, into a frozen dataclass.

Every component takes a `Settings` explicitly; nothing else reads `os.environ`, so tests build
their own settings and the Lambda entry builds one per cold start.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
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
    # The longest a tick over HTTP (`POST /api/tick`) runs; under Lambda the invocation's
    # remaining time bounds it too. Under API Gateway's 29-30 s: past that the caller gets a
    # 504 while the tick runs on, and a scheduler retrying would overlap it.
    http_tick_max_s: float = 25.0
    # Consecutive dispatches that never reached a worker before the task is dead-lettered.
    max_dispatch_failures: int = 5
    # Backpressure (docs/reliability.md). A throttled dispatch spends nothing; the task waits
    # `throttle_retry_delay_s`, doubling per throttled dispatch in a row, at most
    # `throttle_retry_max_delay_s`. A throttling target takes at most its capacity per
    # `throttle_window_s`, rests after each throttle for a window doubling up to
    # `throttle_rest_max_s`, and is healthy again once its capacity regrows to
    # `throttle_capacity_ceiling`.
    throttle_retry_delay_s: float = 5.0
    throttle_retry_max_delay_s: float = 300.0
    throttle_window_s: float = 10.0
    throttle_rest_max_s: float = 300.0
    throttle_capacity_ceiling: int = 200
    # A task no worker started (its lease lapsed while `dispatched`) is dispatched again after
    # `not_started_retry_delay_s`, doubling per such delivery, at most `not_started_retry_max_delay_s`;
    # it fails with code `not_started` (dead-lettered) once its first unstarted delivery is
    # `not_started_give_up_s` old.
    not_started_give_up_s: int = 3600
    not_started_retry_delay_s: float = 30.0
    not_started_retry_max_delay_s: float = 600.0
    # The worker function's EventInvokeConfig MaximumEventAgeInSeconds: the lease of a task the
    # `lambda` transport handed over covers it (Lambda may hold the event that long while throttled).
    lambda_max_event_age_s: int = 900
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


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not 0 < value <= 900:  # also refuses nan and inf; 900 s is Lambda's longest run
        raise ValueError(f"{name} must be a number of seconds, more than 0 and at most 900; got {raw!r}")
    return value


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
    if env.get("TICKWEAVE_HTTP_TICK_MAX_S"):
        changes["http_tick_max_s"] = _seconds("TICKWEAVE_HTTP_TICK_MAX_S", env["TICKWEAVE_HTTP_TICK_MAX_S"])
    if env.get("TICKWEAVE_MAX_DISPATCH_FAILURES"):
        changes["max_dispatch_failures"] = int(env["TICKWEAVE_MAX_DISPATCH_FAILURES"])
    if env.get("TICKWEAVE_NOT_STARTED_GIVE_UP_S"):
        changes["not_started_give_up_s"] = _whole_number(
            "TICKWEAVE_NOT_STARTED_GIVE_UP_S", env["TICKWEAVE_NOT_STARTED_GIVE_UP_S"], minimum=60)
    if env.get("TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S"):
        # Lambda's own bounds for MaximumEventAgeInSeconds.
        age = _whole_number("TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S", env["TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S"], minimum=60)
        if age > 21_600:
            raise ValueError(f"TICKWEAVE_LAMBDA_MAX_EVENT_AGE_S must be at most 21600 (Lambda's limit); got {age}")
        changes["lambda_max_event_age_s"] = age
    if env.get("TICKWEAVE_THROTTLE_WINDOW_S"):
        changes["throttle_window_s"] = float(_whole_number("TICKWEAVE_THROTTLE_WINDOW_S",
                                                           env["TICKWEAVE_THROTTLE_WINDOW_S"], minimum=1))
    if env.get("TICKWEAVE_THROTTLE_CAPACITY_CEILING"):
        changes["throttle_capacity_ceiling"] = _whole_number(
            "TICKWEAVE_THROTTLE_CAPACITY_CEILING", env["TICKWEAVE_THROTTLE_CAPACITY_CEILING"], minimum=2)
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
# All references are read together on the first event (`fetch_references`); DATABASE_URL is
# read again when the database refuses its password (`database_url_reader`).

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


# One AWS session per process. A botocore session caches what its clients are built from (the
# endpoint rules, the partitions, each service's model); every new session parses all of it
# again, tens of milliseconds per client on a cold start. The references are read with botocore
# alone (importing boto3 on top costs another 20-40 ms of the first event); `aws_session()`, the
# boto3 session for the code that wants one, wraps the same botocore session, so its clients
# share those caches. The session is made again only when the credentials, profile or region in
# the environment change: a Lambda environment never changes them, tests and `make dev` do.
_SESSION_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                        "AWS_REGION", "AWS_DEFAULT_REGION")
_session_lock = threading.RLock()
_botocore_session: Any = None
_session: Any = None
_session_key: tuple[str | None, ...] = ()


def _shared_botocore_session() -> Any:
    global _botocore_session, _session, _session_key
    key = tuple(os.environ.get(name) for name in _SESSION_ENVIRONMENT)
    with _session_lock:
        if _botocore_session is None or key != _session_key:
            import botocore.session

            _botocore_session, _session, _session_key = botocore.session.get_session(), None, key
        return _botocore_session


def aws_session() -> Any:
    """This process's boto3 session (a `boto3.session.Session`), made on first use.

    boto3 is imported here, not at module level, so that importing the configuration stays cheap."""
    global _session
    with _session_lock:
        core = _shared_botocore_session()
        if _session is None:
            import boto3

            _session = boto3.session.Session(botocore_session=core)
        return _session


def aws_client(service: str, region: str | None = None, **options: Any) -> Any:
    """A new botocore client of the shared session (boto3's `session.client` returns the same
    thing, plus S3's transfer methods); endpoints follow the standard AWS settings
    (`AWS_ENDPOINT_URL_SECRETS_MANAGER`, ...). Made under a lock: a session is not safe to make
    clients from in several threads at once (the clients themselves are)."""
    with _session_lock:
        core = _shared_botocore_session()
        return core.create_client(service, region_name=region or core.get_config_variable("region") or "us-east-1",
                                  **options)


def _in_parallel(calls: Sequence[Callable[[], dict[str, str]]]) -> dict[str, str]:
    """Run the calls on threads of their own (inline when there is one); their results merged,
    or the first call's exception (in the order given) raised."""
    if len(calls) == 1:
        return calls[0]()
    outcomes: list[dict[str, str] | BaseException] = [{} for _ in calls]

    def run(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except BaseException as exc:  # raised in the caller's thread below
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged: dict[str, str] = {}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        merged.update(outcome)
    return merged


def _secret_text(reference: str, response: Mapping[str, Any]) -> str:
    if "SecretString" not in response:
        raise SecretReferenceError(f"{reference}: binary secrets are not supported; store text")
    return str(response["SecretString"])


def _read_secrets(client: Any, items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{reference: text} for (reference, SecretId) pairs of one region: GetSecretValue for one,
    one BatchGetSecretValue for several (at most 20, far more than there are variables)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if len(items) == 1:
        reference, identifier = items[0]
        try:
            return {reference: _secret_text(reference, client.get_secret_value(SecretId=identifier))}
        except (BotoCoreError, ClientError) as exc:
            raise SecretReferenceError(f"{reference}: {exc}") from exc
    try:
        response = client.batch_get_secret_value(SecretIdList=[identifier for _, identifier in items])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "AccessDeniedException":
            raise SecretReferenceError(f"{', '.join(ref for ref, _ in items)}: {exc}") from exc
        # A role allowed GetSecretValue on each secret but not BatchGetSecretValue (a policy
        # written before the reads were batched): one call per secret, in parallel.
        return _in_parallel([partial(_read_secrets, client, [item]) for item in items])
    except BotoCoreError as exc:
        raise SecretReferenceError(f"{', '.join(ref for ref, _ in items)}: {exc}") from exc
    values: list[Mapping[str, Any]] = response.get("SecretValues", [])
    errors = {str(error.get("SecretId")): error for error in response.get("Errors", [])}
    found: dict[str, str] = {}
    for reference, identifier in items:
        # A SecretId may be the ARN, the name, or the ARN without its random suffix.
        value = next((v for v in values if identifier in (v.get("ARN"), v.get("Name"))
                      or str(v.get("ARN", "")).startswith(identifier + "-")), None)
        if value is not None:
            found[reference] = _secret_text(reference, value)
            continue
        error = errors.get(identifier, {})
        raise SecretReferenceError(f"{reference}: {error.get('ErrorCode', 'not returned')}: {error.get('Message', '')}")
    return found


def _read_parameters(client: Any, items: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{reference: value} for (reference, name or ARN) pairs of one region: GetParameter for one,
    one GetParameters for several (at most 10 names per call)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if len(items) == 1:  # one parameter: the call a role granted ssm:GetParameter only allows
            reference, identifier = items[0]
            return {reference: str(client.get_parameter(Name=identifier, WithDecryption=True)["Parameter"]["Value"])}
        response = client.get_parameters(Names=[identifier for _, identifier in items], WithDecryption=True)
    except ClientError as exc:
        if len(items) == 1 or exc.response.get("Error", {}).get("Code") != "AccessDeniedException":
            raise SecretReferenceError(f"{', '.join(ref for ref, _ in items)}: {exc}") from exc
        # A role allowed ssm:GetParameter but not ssm:GetParameters: one call per parameter.
        return _in_parallel([partial(_read_parameters, client, [item]) for item in items])
    except BotoCoreError as exc:
        raise SecretReferenceError(f"{', '.join(ref for ref, _ in items)}: {exc}") from exc
    by_identifier: dict[str, str] = {}
    for parameter in response.get("Parameters", []):
        for key in (parameter.get("Name"), parameter.get("ARN")):
            if key:
                by_identifier[str(key)] = str(parameter["Value"])
    found: dict[str, str] = {}
    for reference, identifier in items:
        if identifier not in by_identifier:
            raise SecretReferenceError(f"{reference}: ParameterNotFound: no such parameter, or not readable")
        found[reference] = by_identifier[identifier]
    return found


def fetch_references(references: Sequence[str]) -> dict[str, str]:
    """Read secrets and parameters with the ambient AWS credentials (the function's role):
    {reference: text}. Per region, the secrets in one BatchGetSecretValue (GetSecretValue when
    there is one) and the parameters in one GetParameters; the calls to different services or
    regions run in parallel. The clients come from the process's one session (`aws_session`)."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    default_region: str | None = None
    for reference in dict.fromkeys(references):
        service, identifier, region = parse_reference(reference)
        if region is None:  # a name: the function's own region, the same group as its ARNs
            default_region = default_region or _shared_botocore_session().get_config_variable("region") or "us-east-1"
            region = default_region
        groups.setdefault((service, region), []).append((reference, identifier))
    calls: list[Callable[[], dict[str, str]]] = []
    for (service, region), items in groups.items():
        client = aws_client(service, region)  # made here, in one thread
        if service == "secretsmanager":
            calls.append(partial(_read_secrets, client, items))
        else:
            for start in range(0, len(items), 10):
                calls.append(partial(_read_parameters, client, items[start:start + 10]))
    return _in_parallel(calls) if calls else {}


def fetch_reference(reference: str) -> str:
    """Read one secret or parameter (`fetch_references` of one)."""
    return fetch_references([reference])[reference]


def database_url_from_parts(parts: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """A `postgresql://` URL from an RDS-style secret (`username`, `password`, `host`, `port`,
    `dbname`, as RDS and RDS Proxy secrets hold them). TICKWEAVE_DB_HOST (an RDS Proxy endpoint),
    TICKWEAVE_DB_PORT and TICKWEAVE_DB_NAME override the secret's fields; TICKWEAVE_DB_SSLMODE
    defaults to `require` (RDS and RDS Proxy speak TLS; `verify-full` also checks the server's
    certificate and name) and TICKWEAVE_DB_SSLROOTCERT names the CA bundle to check it with (the
    RDS bundle's path in the artifact, or `system`)."""
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
    query = f"sslmode={quote(sslmode)}"
    if rootcert := env.get("TICKWEAVE_DB_SSLROOTCERT"):
        query += f"&sslrootcert={quote(rootcert, safe='/')}"
    return f"postgresql://{user}:{password}@{netloc_host}:{port}/{quote(dbname, safe='')}?{query}"


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


def resolve_references(env: Mapping[str, str] | None = None, fetch: Fetch | None = None, *,
                       names: Sequence[str] = REFERABLE_VARIABLES) -> dict[str, str]:
    """Fetch every `NAME_FROM` reference (of `names`) whose NAME is not set directly; returns
    {NAME: value}. Nothing is cached: each call reads the current values.

    Each distinct secret is read once, however many variables point into it, and all of them
    together (`fetch_references`); `fetch`, when given, reads them one by one instead."""
    env = os.environ if env is None else env
    wanted: dict[str, tuple[str, str]] = {}
    for name in names:
        reference = env.get(name + REFERENCE_SUFFIX, "").strip()
        if not reference or env.get(name):
            continue
        base, _, selected = reference.partition("#")
        wanted[name] = (base, selected)
    if not wanted:
        return {}
    bases = list(dict.fromkeys(base for base, _ in wanted.values()))
    try:
        fetched = {base: fetch(base) for base in bases} if fetch is not None else fetch_references(bases)
    except SecretReferenceError:
        raise
    except Exception as exc:
        which = ", ".join(f"{name}{REFERENCE_SUFFIX}={base}" for name, (base, _) in wanted.items())
        raise SecretReferenceError(f"{which}: {type(exc).__name__}: {exc}") from exc
    return {name: _interpret(name, fetched[base], selected, env) for name, (base, selected) in wanted.items()}


def database_url_reader(env: Mapping[str, str] | None = None) -> Callable[[], str] | None:
    """A function that reads DATABASE_URL again from its reference, fresh from the service (no
    cache), for the connection pool to call when the database refuses the password it has (the
    secret was rotated); None when DATABASE_URL is set directly or has no reference."""
    snapshot = dict(os.environ if env is None else env)
    if snapshot.get("DATABASE_URL") or not snapshot.get("DATABASE_URL" + REFERENCE_SUFFIX, "").strip():
        return None

    def read() -> str:
        return resolve_references(snapshot, names=("DATABASE_URL",))["DATABASE_URL"]

    return read


def load_resolved_settings(env: Mapping[str, str] | None = None, fetch: Fetch | None = None) -> Settings:
    """`load_settings` after resolving `NAME_FROM` references (a no-op when there are none)."""
    env = os.environ if env is None else env
    resolved = resolve_references(env, fetch)
    return load_settings({**env, **resolved} if resolved else env)
