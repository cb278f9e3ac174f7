"""S3 and STS access: orchestrator-side clients, buckets, and per-task storage grants.

Orchestrator-side clients use the ambient credentials (the Lambda role, or the fake keys of the
local moto server). Workers never get those: a grant carries either presigned URLs per object
(the default: one PUT for the attempt's output key, one for its log, a GET per input; GETs of
the items under a read prefix are presigned on demand by the API, `presign_get_urls`), or, for
a node with `storage: credentials`, STS credentials narrowed by a session policy to the run.

No STS call per task (issue 15): URLs are signed locally (with a session of the storage role
this process keeps, when one is configured), and credential sessions are cached per scope
(orchestrator.storage.sessions): one per run for its `storage: credentials` nodes.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from orchestrator.storage.presign import AddressingStyle, QueryPresigner
from orchestrator.storage.sessions import CachedSession, SessionCache, partition_of
from orchestrator.storage.tokens import StorageGrant, check_read_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

    from orchestrator.config import Settings

__all__ = [
    "CLIENT_POOL_CONNECTIONS",
    "LOG_CONTENT_TYPE",
    "MAX_SESSION_POLICY_CHARS",
    "encode_json",
    "ensure_bucket",
    "issue_storage_grant",
    "orchestrator_s3",
    "orchestrator_sts",
    "presign_get_urls",
    "put_json_object",
    "read_json_object",
    "role_session_name",
    "run_session_policy",
    "s3_client",
    "session_policy",
]

JSON_CONTENT_TYPE = "application/json"
# A task attempt's log (UTF-8 text); its presigned PUT is signed for exactly this Content-Type.
LOG_CONTENT_TYPE = "text/plain; charset=utf-8"
# AWS rejects inline session policies whose plaintext exceeds 2048 characters.
MAX_SESSION_POLICY_CHARS = 2048
# STS AssumeRole refuses durations under 15 minutes.
_MIN_ROLE_DURATION_S = 900
_SESSION_NAME_PREFIX = "tickweave-"
# Connections each S3/STS client keeps (botocore's default is 10): at least the dispatcher's
# threads (engine.dispatcher.DISPATCH_THREADS, 16) and a batch's output checks
# (engine.worker_protocol.OUTPUT_CHECKS_AT_ONCE, 16), which share the orchestrator's clients, so
# a full dispatch round or batch neither waits for a connection nor opens and drops extra ones
# ("Connection pool is full, discarding connection").
CLIENT_POOL_CONNECTIONS = 32
# A cached session is reused while it has at least this share of its duration left, or the
# task's own need when that is shorter (see `issue_storage_grant`).
_REUSE_SHARE = 0.75
_SESSION_NAME_INVALID = re.compile(r"[^\w+=,.@-]")

log = logging.getLogger(__name__)


class StorageSettings(Protocol):
    """The part of `Settings` this module reads; lets callers pass a lighter object."""

    @property
    def s3_endpoint_url(self) -> str | None: ...
    @property
    def aws_region(self) -> str: ...
    @property
    def bucket(self) -> str: ...


def _addressing_style(endpoint_url: str | None) -> AddressingStyle:
    # Path-style addressing when an endpoint is given: virtual-hosted style would need DNS for
    # `bucket.127.0.0.1`, which a local moto/MinIO server does not have.
    return "path" if endpoint_url else "auto"


def _client_config(endpoint_url: str | None) -> Config:
    # SigV4 explicitly, since presigned URLs must be V4 for any region other than the oldest ones.
    # The presigner (`_fast_presigner`) reproduces what this config signs: keep them together.
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": _addressing_style(endpoint_url)},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=CLIENT_POOL_CONNECTIONS,
    )


def s3_client(
    endpoint_url: str | None, region: str, credentials: Mapping[str, str] | None = None
) -> S3Client:
    """A new S3 client; explicit `credentials` (STS shape) or else the ambient ones."""
    # One shared session, whose loader caches the parsed service model and endpoint rules: a
    # fresh Session per client re-reads and re-parses them, ~0.3 s of CPU per task in a worker
    # that gets new scoped credentials for every task. Building clients from one session is not
    # thread-safe, hence the lock (held only while the client is built, not while it is used).
    with _SESSION_LOCK:
        return _shared_session(region).client(
            "s3", endpoint_url=endpoint_url, config=_client_config(endpoint_url), region_name=region,
            aws_access_key_id=credentials["AccessKeyId"] if credentials else None,
            aws_secret_access_key=credentials["SecretAccessKey"] if credentials else None,
            aws_session_token=credentials.get("SessionToken") if credentials else None,
        )


_SESSION_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _shared_session(region: str) -> boto3.session.Session:
    return boto3.session.Session(region_name=region)


def sts_client(endpoint_url: str | None, region: str) -> STSClient:
    session = boto3.session.Session(region_name=region)
    return session.client(
        "sts",
        endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=CLIENT_POOL_CONNECTIONS),
    )


@functools.lru_cache(maxsize=16)
def _cached_s3(endpoint_url: str | None, region: str) -> S3Client:
    return s3_client(endpoint_url, region)


@functools.lru_cache(maxsize=16)
def _cached_sts(endpoint_url: str | None, region: str) -> STSClient:
    return sts_client(endpoint_url, region)


def orchestrator_s3(settings: StorageSettings) -> S3Client:
    """The orchestrator's own S3 client, cached so a warm Lambda does not rebuild it per task."""
    return _cached_s3(settings.s3_endpoint_url, settings.aws_region)


def orchestrator_sts(settings: StorageSettings) -> STSClient:
    # The local stand-in (moto) serves STS on the same endpoint as S3; on AWS both are None.
    return _cached_sts(settings.s3_endpoint_url, settings.aws_region)


def ensure_bucket(settings: StorageSettings) -> None:
    """Create the outputs bucket if it does not exist; safe to call any number of times."""
    client = orchestrator_s3(settings)
    try:
        client.head_bucket(Bucket=settings.bucket)
        return
    except ClientError as exc:
        if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    try:
        if settings.aws_region == "us-east-1":
            # us-east-1 is the default location and rejects an explicit LocationConstraint.
            client.create_bucket(Bucket=settings.bucket)
        else:
            client.create_bucket(
                Bucket=settings.bucket,
                # The stubs type the region as a closed Literal; any configured region is passed on.
                CreateBucketConfiguration={"LocationConstraint": settings.aws_region},  # type: ignore[typeddict-item]
            )
    except ClientError as exc:
        # Another process created it between the HEAD and the CREATE.
        if _error_code(exc) != "BucketAlreadyOwnedByYou":
            raise


def session_policy(
    bucket: str, output_key: str, read_keys: Iterable[str], *, write_prefix: str | None = None,
    read_prefixes: Iterable[str] = (), log_key: str | None = None, partition: str = "aws",
) -> dict[str, Any]:
    """Inline session policy: read exactly the input keys; write the output key (and `log_key`),
    or, given `write_prefix` (the attempt's prefix, which holds the output key and the log),
    anything under it; and read anything under each of `read_prefixes` (a mapped node's items
    prefix: its children's outputs, which a reducer reads by the manifest and which are too
    many to name). `partition`: the role's (`partition_of(role_arn)`), so that a policy for a
    China or GovCloud role names that partition's bucket (`arn:aws-cn:s3:::...`)."""
    prefixes = [check_read_prefix(prefix) for prefix in dict.fromkeys(read_prefixes)]
    arn = f"arn:{partition}:s3:::{bucket}/"
    if write_prefix is not None:
        _check_write_prefix(output_key, write_prefix, log_key)
        writes = [f"{arn}{write_prefix}*"]
    else:
        writes = [f"{arn}{key}" for key in (output_key, log_key) if key is not None]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "WriteOutput",
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": writes,
        }
    ]
    reads = list(dict.fromkeys(read_keys))  # dedupe, keep order
    if reads:
        statements.append(
            {
                "Sid": "ReadInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"{arn}{key}" for key in reads],
            }
        )
    if prefixes:
        statements.append(
            {
                "Sid": "ReadMappedItems",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"{arn}{prefix}*" for prefix in prefixes],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def _check_write_prefix(output_key: str, write_prefix: str, log_key: str | None = None) -> None:
    # A prefix without its trailing "/" would also match a sibling: attempts/1* covers
    # attempts/10/..., which is another attempt's.
    if not write_prefix.endswith("/") or not output_key.startswith(write_prefix):
        raise ValueError(f"write prefix {write_prefix!r} must end in '/' and hold the output key")
    # The log is written with the same credentials: outside the prefix, the policy would not
    # cover it and every upload would be refused.
    if log_key is not None and not log_key.startswith(write_prefix):
        raise ValueError(f"write prefix {write_prefix!r} must hold the log key {log_key!r}")


def role_session_name(task_id: str) -> str:
    """`tickweave-<task id>`, limited to what STS accepts (<= 64 chars of [\\w+=,.@-])."""
    cleaned = _SESSION_NAME_INVALID.sub("-", task_id) or "task"
    return (_SESSION_NAME_PREFIX + cleaned)[:64]


# Sessions this process assumed, by scope (see orchestrator.storage.sessions): the signer of
# presigned URLs, and the credentials of nodes that ask for them, per run and node.
_SESSIONS = SessionCache()
# What STS answers when the packed (compressed) session policy and tags exceed its limit, which
# is not the plaintext length: a policy under MAX_SESSION_POLICY_CHARS can still be refused.
_PACKED_POLICY_TOO_LARGE = "PackedPolicyTooLarge"
_REFUSED_POLICIES: set[str] = set()
_REFUSED_LOCK = threading.Lock()


def issue_storage_grant(
    settings: Settings,
    *,
    output_key: str,
    read_keys: Sequence[str],
    task_id: str,
    write_prefix: str | None = None,
    read_prefixes: Sequence[str] = (),
    log_key: str | None = None,
    access: Literal["urls", "credentials"] = "credentials",
    scope_prefix: str | None = None,
    run_prefix: str | None = None,
    run_writes: Sequence[str] = (),
    lifetime_s: int | None = None,
) -> StorageGrant:
    """Storage access for one task attempt: presigned URLs, or scoped STS credentials.

    `access="urls"` (what the dispatcher gives a node by default): one presigned PUT for the
    output key, one for the log (signed for LOG_CONTENT_TYPE), one GET per input key. No STS call
    per task: with a storage role the URLs are signed locally with a session of that role this
    process assumed once and reuses (the signer, never handed out); without one, with the
    orchestrator's own credentials.

    `access="credentials"` (a node with `storage: credentials`, or any grant without a storage
    role's help: without `storage_role_arn` there are only URLs): STS credentials narrowed by a
    session policy to writes under `scope_prefix` (default `write_prefix`, the attempt's own
    prefix; the dispatcher passes the node's prefix in its run, so one session serves every
    attempt and map item of that node in that run) and reads of exactly the input keys and
    under `read_prefixes`. Sessions are cached by their exact policy: a task gets a session only
    when the policy it needs is the very one the session was assumed with.

    `run_writes` (with `run_prefix`): the write patterns of every `storage: credentials` node of
    the run (`{run_prefix}*/nodes/{node}/*`, `.../items/*` for a map node: never its manifest).
    Given them, the first choice is one session for the whole run (`run_session_policy`): writes
    under those nodes' prefixes, reads under the run's prefix, and presigned GETs for inputs from
    outside the run, so that every such task of the run gets the very same policy: one
    AssumeRole per run. Too large for STS, it falls back to the node's own scope below.

    `write_prefix` is the attempt's own prefix (see layout.node_attempt_prefix); it must hold the
    output key and the log key. `read_prefixes` (each ending in "/": layout.map_items_prefix of a
    mapped upstream) let the task read anything under them; with URLs nothing is presigned for
    them (the keys are in the manifest): the worker asks `POST /api/worker/read-urls`.

    `lifetime_s`: how long the task may need its grant (its timeout and some slack; default the
    configured TTL). A cached session is reused while it has that long left, or 3/4 of its
    duration when that is shorter (an assumed role's session lasts at most an hour when the
    caller is itself a role), and URLs signed with it expire with it (X-Amz-Expires says so).

    When STS refuses a policy as too large (`PackedPolicyTooLarge`, measured after compression,
    so not predictable from the text), the grant falls back, each step still scoped to the run:
    inputs as presigned GETs instead of named in the policy; then reads of the whole run's
    prefix instead of each input and items prefix; then URLs only.
    """
    reads = tuple(dict.fromkeys(read_keys))
    prefixes = tuple(check_read_prefix(prefix) for prefix in dict.fromkeys(read_prefixes))
    if write_prefix is not None:
        _check_write_prefix(output_key, write_prefix, log_key)
    scope = scope_prefix or write_prefix
    if scope is not None and scope != write_prefix:
        _check_write_prefix(output_key, scope, log_key)
        if write_prefix is not None and not write_prefix.startswith(scope):
            raise ValueError(f"scope prefix {scope!r} must hold the write prefix {write_prefix!r}")
    if run_prefix is not None and scope is not None and not scope.startswith(check_read_prefix(run_prefix)):
        raise ValueError(f"scope prefix {scope!r} must be under the run prefix {run_prefix!r}")
    ttl = int(settings.storage_credentials_ttl_s)
    duration = max(_MIN_ROLE_DURATION_S, ttl)
    need = min(ttl if lifetime_s is None else max(1, int(lifetime_s)), ttl)
    reuse_floor = min(float(need), duration * _REUSE_SHARE)

    def grant(
        credentials: Mapping[str, str] | None, put_url: str | None, get_urls: dict[str, str],
        log_put_url: str | None = None,
    ) -> StorageGrant:
        return StorageGrant(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.aws_region,
            bucket=settings.bucket,
            output_key=output_key,
            read_keys=reads,
            credentials=dict(credentials) if credentials is not None else None,
            presigned_put=put_url,
            presigned_get=get_urls,
            read_prefixes=prefixes,
            log_key=log_key,
            presigned_log_put=log_put_url,
        )

    role_arn = settings.storage_role_arn
    if role_arn and access == "credentials":
        partition = partition_of(role_arn)

        def policy_of(named_reads: Sequence[str], read_under: Sequence[str]) -> dict[str, Any]:
            return session_policy(settings.bucket, output_key, named_reads, write_prefix=scope,
                                  read_prefixes=read_under, log_key=log_key, partition=partition)

        # (policy, the input keys it leaves to presigned GETs, session name), in order of choice.
        own_name = role_session_name(task_id if scope == write_prefix else _scope_name(scope or output_key))
        candidates: list[tuple[dict[str, Any], tuple[str, ...], str]] = []
        if run_prefix is not None and run_writes and all(p.startswith(run_prefix) for p in prefixes) and all(
            any(_iam_match(pattern, key) for pattern in run_writes) for key in (output_key, log_key) if key is not None
        ):
            candidates.append((run_session_policy(settings.bucket, run_prefix, run_writes, partition=partition),
                               tuple(k for k in reads if not k.startswith(run_prefix)),
                               role_session_name("run-" + run_prefix.strip("/").split("/")[-1])))
        candidates += [(policy_of(reads, prefixes), (), own_name), (policy_of((), prefixes), reads, own_name)]
        if run_prefix is not None and all(p.startswith(run_prefix) for p in prefixes):
            # Still one run: the run's prefix for reads, presigned GETs for inputs from elsewhere
            # (an upstream pipeline's outputs).
            candidates.append((policy_of((), (run_prefix,)), tuple(k for k in reads if not k.startswith(run_prefix)),
                               own_name))
        for policy, presigned_reads, session_name in candidates:
            text = _compact_json(policy)
            if len(text) > MAX_SESSION_POLICY_CHARS or text in _REFUSED_POLICIES:
                continue
            try:
                session = _SESSIONS.get(
                    ("credentials", settings.s3_endpoint_url, role_arn, text), reuse_floor,
                    lambda text=text, name=session_name: _assume(settings, role_arn, name, duration, text),  # type: ignore[misc]
                )
            except ClientError as exc:
                if _error_code(exc) != _PACKED_POLICY_TOO_LARGE:
                    raise
                with _REFUSED_LOCK:
                    # Remembered, so that the run's next tasks do not each ask STS again.
                    if len(_REFUSED_POLICIES) >= 1024:
                        _REFUSED_POLICIES.clear()
                    _REFUSED_POLICIES.add(text)
                log.warning("STS refused a session policy of %d characters as too large when packed; "
                            "falling back to a broader one, still within the run", len(text))
                continue
            expires_in = _url_lifetime(ttl, session)
            return grant(session.credentials, None, _presign_gets(settings, presigned_reads, expires_in))
        log.warning("no session policy for task %s fits STS's limits: its grant is presigned URLs", task_id)
    signer = _signer(settings, reuse_floor, duration) if role_arn else None
    expires_in = ttl if signer is None else _url_lifetime(ttl, signer)
    creds = None if signer is None else signer.credentials
    put_url = _presign_put(settings, output_key, expires_in, JSON_CONTENT_TYPE, creds)
    log_put_url = (_presign_put(settings, log_key, expires_in, LOG_CONTENT_TYPE, creds)
                   if log_key is not None else None)
    return grant(None, put_url, _presign_gets(settings, reads, expires_in, credentials=creds), log_put_url)


def run_session_policy(
    bucket: str, run_prefix: str, writes: Sequence[str], *, partition: str = "aws",
) -> dict[str, Any]:
    """The session policy one run's `storage: credentials` tasks share: PutObject on `writes`
    (patterns under `run_prefix`, one per such node) and GetObject under `run_prefix`. Never
    another run's or workspace's keys (every pattern starts with this run's prefix, which ends in
    "/"), nor pipeline outputs (outputs/), nor a node that did not ask for credentials."""
    check_read_prefix(run_prefix)
    for pattern in writes:
        if not pattern.startswith(run_prefix) or not pattern.endswith("*"):
            raise ValueError(f"write pattern {pattern!r} must be under the run prefix {run_prefix!r} and end in '*'")
    arn = f"arn:{partition}:s3:::{bucket}/"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "WriteNodes", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": [arn + pattern for pattern in dict.fromkeys(writes)]},
        {"Sid": "ReadRun", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"{arn}{run_prefix}*"]},
    ]}


def _iam_match(pattern: str, key: str) -> bool:
    # IAM's wildcards: `*` any run of characters ("/" included), `?` any one character.
    return fnmatch.fnmatchcase(key, pattern.replace("[", "[[]"))


def _scope_name(prefix: str) -> str:
    # A session serves many tasks: named after its run and node (the prefix's segments after
    # `runs/<workspace>/<pipeline>/`), which CloudTrail then shows; STS caps the name at 64.
    parts = prefix.strip("/").split("/")
    return "-".join(parts[3:4] + parts[-1:]) if len(parts) > 4 else "-".join(parts)


def _assume(settings: Settings, role_arn: str, name: str, duration: int, policy: str | None) -> Mapping[str, Any]:
    kwargs: dict[str, Any] = {"RoleArn": role_arn, "RoleSessionName": name, "DurationSeconds": duration}
    if policy is not None:
        kwargs["Policy"] = policy
    response = orchestrator_sts(settings).assume_role(**kwargs)
    return response["Credentials"]


def _signer(settings: Settings, reuse_floor: float, duration: int) -> CachedSession:
    """The session of the storage role this process signs presigned URLs with. No session policy:
    it never leaves the process, and each URL it signs names one key (S3 refuses the signature
    for any other); its reach is the role's own (PutObject under runs/, GetObject under runs/
    and outputs/ in the template), so a URL can never grant what the role could not."""
    role_arn = settings.storage_role_arn
    assert role_arn is not None
    return _SESSIONS.get(
        ("signer", settings.s3_endpoint_url, role_arn), reuse_floor,
        lambda: _assume(settings, role_arn, _SESSION_NAME_PREFIX + "signer", duration, None),
    )


def _url_lifetime(ttl: int, session: CachedSession) -> int:
    # A URL signed with temporary credentials stops working when they expire, whatever its
    # X-Amz-Expires says: say the truth.
    return max(1, min(ttl, int(session.remaining_s())))


def _presign_put(
    settings: StorageSettings, key: str, ttl: int, content_type: str,
    credentials: Mapping[str, str] | None = None,
) -> str:
    fast = _fast_presigner(settings.s3_endpoint_url, settings.aws_region, settings.bucket)
    if fast is not None:
        if credentials is not None:
            fast = _session_presigner(fast, credentials)
        return fast.presign_put(settings.bucket, key, ttl, content_type=content_type)
    client = orchestrator_s3(settings) if credentials is None else _session_s3(settings, credentials)
    url: str = client.generate_presigned_url(
        "put_object", Params={"Bucket": settings.bucket, "Key": key, "ContentType": content_type}, ExpiresIn=ttl,
    )
    return url


def _presign_gets(
    settings: StorageSettings, keys: Iterable[str], ttl: int, *, bucket: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> dict[str, str]:
    bucket = bucket or settings.bucket
    keys = list(keys)
    if not keys:
        return {}
    fast = _fast_presigner(settings.s3_endpoint_url, settings.aws_region, bucket)
    if fast is not None:
        if credentials is not None:
            fast = _session_presigner(fast, credentials)
        return {key: fast.presign_get(bucket, key, ttl) for key in keys}
    client = orchestrator_s3(settings) if credentials is None else _session_s3(settings, credentials)
    return {
        key: client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl)
        for key in keys
    }


class _SessionCredentials:
    """A session's credentials as presign.CredentialSource (botocore's frozen shape)."""

    def __init__(self, credentials: Mapping[str, str]) -> None:
        from botocore.credentials import ReadOnlyCredentials

        self._frozen = ReadOnlyCredentials(
            credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials.get("SessionToken"),
        )

    def get_frozen_credentials(self) -> Any:
        return self._frozen


def _session_presigner(ambient: QueryPresigner, credentials: Mapping[str, str]) -> QueryPresigner:
    """The ambient presigner's URL shape (checked against botocore's once per bucket by
    `_fast_presigner`: credentials do not change a URL's shape) with a session's credentials."""
    return _cached_session_presigner(ambient.region, ambient.endpoint_url, ambient.addressing_style,
                                     tuple(sorted(credentials.items())))


@functools.lru_cache(maxsize=8)
def _cached_session_presigner(
    region: str, endpoint_url: str | None, addressing_style: AddressingStyle, credentials: tuple[tuple[str, str], ...],
) -> QueryPresigner:
    return QueryPresigner(region=region, endpoint_url=endpoint_url, addressing_style=addressing_style,
                          credentials=_SessionCredentials(dict(credentials)))


def _session_s3(settings: StorageSettings, credentials: Mapping[str, str]) -> S3Client:
    return _cached_session_s3(settings.s3_endpoint_url, settings.aws_region, tuple(sorted(credentials.items())))


@functools.lru_cache(maxsize=8)
def _cached_session_s3(endpoint_url: str | None, region: str, credentials: tuple[tuple[str, str], ...]) -> S3Client:
    return s3_client(endpoint_url, region, dict(credentials))


# A key with what URI encoding has to get right, for the check in `_fast_presigner`.
_PROBE_KEY = "tickweave/presign-check/ é+~%2F=&?#//x"


@functools.lru_cache(maxsize=16)
def _query_presigner(endpoint_url: str | None, region: str) -> QueryPresigner | None:
    """The presigner for the client `_cached_s3(endpoint_url, region)`, with that client's
    credentials: the shared session's (botocore's client took the same object from it). None
    when there are none (botocore then fails the presign as it always did)."""
    with _SESSION_LOCK:
        credentials = _shared_session(region).get_credentials()
    if credentials is None:
        return None
    return QueryPresigner(
        region=region, endpoint_url=endpoint_url, addressing_style=_addressing_style(endpoint_url),
        credentials=credentials,
    )


@functools.lru_cache(maxsize=16)
def _fast_presigner(endpoint_url: str | None, region: str, bucket: str) -> QueryPresigner | None:
    """The presigner to use for `bucket`, or None to presign with botocore.

    The rule: our presigner only when `QueryPresigner.handles(bucket)` (the URL shapes it
    reproduces; see there for what is left to botocore and why) AND, once per process and
    bucket, a GET and a PUT it signs equal botocore's byte for byte at botocore's own timestamp.
    That second half catches what the static rule cannot see: configuration botocore merges into
    the client from the environment or ~/.aws/config (AWS_ENDPOINT_URL_S3, FIPS or dual-stack
    endpoints, the regional us-east-1 endpoint, ...), which changes botocore's URLs."""
    presigner = _query_presigner(endpoint_url, region)
    if presigner is None or not presigner.handles(bucket):
        return None
    client = _cached_s3(endpoint_url, region)
    references = {
        "GET": client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=3600
        ),
        "PUT": client.generate_presigned_url(
            "put_object",
            Params={"Bucket": bucket, "Key": _PROBE_KEY, "ContentType": JSON_CONTENT_TYPE},
            ExpiresIn=3600,
        ),
    }
    for method, reference in references.items():
        try:
            at = datetime.strptime(parse_qs(urlsplit(reference).query)["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
            if method == "GET":
                ours = presigner.presign_get(bucket, _PROBE_KEY, 3600, at=at)
            else:
                ours = presigner.presign_put(bucket, _PROBE_KEY, 3600, content_type=JSON_CONTENT_TYPE, at=at)
        except Exception:
            log.exception("presigning with botocore for bucket %r: the own presigner failed its check", bucket)
            return None
        if ours != reference:
            log.warning(
                "presigning with botocore for bucket %r (endpoint %r, region %r): the own presigner's "
                "%s URL differs from botocore's (%s != %s)",
                bucket, endpoint_url, region, method, _unsigned(ours), _unsigned(reference),
            )
            return None
    return presigner


def _unsigned(url: str) -> str:
    # For the log: the URL without its query (no credential, token or signature in a log line).
    return url.split("?", 1)[0]


def presign_get_urls(
    settings: StorageSettings, keys: Iterable[str], ttl_s: int, *, bucket: str | None = None
) -> dict[str, str]:
    """Presigned GET URLs, by key, valid for `ttl_s` seconds, signed with the orchestrator's own
    credentials (no request is made: SigV4 presigning is local). The caller decides which keys
    a worker may have; this only signs (see orchestrator.engine.worker_reads)."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
        raise ValueError(f"a presigned URL needs a positive lifetime in seconds, not {ttl_s!r}")
    return _presign_gets(settings, keys, ttl_s, bucket=bucket)


def encode_json(value: Any) -> bytes:
    """The one JSON encoding of stored outputs (workers and orchestrator agree on bytes/sha256)."""
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sha256_b64(body: bytes) -> str:
    """The sha256 of `body` as S3 takes and returns it (`ChecksumSHA256`: base64 of the digest)."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


class ObjectMissing(LookupError):
    """The object is not in the bucket (NoSuchKey)."""


@dataclass(frozen=True)
class ObjectFacts:
    """What one HEAD says about a stored object: its size and, when it was written with S3's
    own SHA-256 checksum in one PUT, that checksum as hex (None otherwise: written without one,
    or a multipart object whose checksum is a checksum of part checksums)."""

    size: int
    sha256: str | None


def head_object_facts(settings: StorageSettings, key: str, *, bucket: str | None = None) -> ObjectFacts:
    """Size and stored SHA-256 checksum of an object, from one HeadObject (the object is not
    read); ObjectMissing when absent."""
    try:
        response = orchestrator_s3(settings).head_object(
            Bucket=bucket or settings.bucket, Key=key, ChecksumMode="ENABLED"
        )
    except ClientError as exc:
        if _error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectMissing(key) from exc
        raise
    checksum = response.get("ChecksumSHA256")
    sha256: str | None = None
    if checksum and "-" not in checksum and response.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        try:
            sha256 = base64.b64decode(checksum, validate=True).hex()
        except ValueError:  # binascii.Error included: not a checksum this code can compare
            sha256 = None
    return ObjectFacts(size=int(response.get("ContentLength") or 0), sha256=sha256)


def read_object_bytes(settings: StorageSettings, key: str, *, max_bytes: int | None = None) -> bytes:
    """An object's bytes; ObjectMissing when absent, ValueError when over `max_bytes`."""
    try:
        response = orchestrator_s3(settings).get_object(Bucket=settings.bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectMissing(key) from exc
        raise
    if max_bytes is not None and int(response.get("ContentLength") or 0) > max_bytes:
        response["Body"].close()
        raise ValueError(f"object {key!r} is larger than {max_bytes} bytes")
    body: bytes = response["Body"].read()
    return body


def read_object_from(settings: StorageSettings, key: str, offset: int) -> tuple[bytes, int]:
    """An object's bytes from `offset` on (one ranged GET) and its whole size now; no bytes
    when `offset` is at or past the end. ObjectMissing when absent."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"an offset is an integer >= 0, not {offset!r}")
    client = orchestrator_s3(settings)
    try:
        if offset == 0:
            response = client.get_object(Bucket=settings.bucket, Key=key)
        else:
            response = client.get_object(Bucket=settings.bucket, Key=key, Range=f"bytes={offset}-")
    except ClientError as exc:
        code = _error_code(exc)
        if code in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectMissing(key) from exc
        if code in {"InvalidRange", "416"}:
            # S3 refuses a range that starts at or past the end: nothing new, and the size is
            # what one HEAD says.
            return b"", head_object_facts(settings, key).size
        raise
    body: bytes = response["Body"].read()
    if offset == 0:
        return body, len(body)
    # "bytes 10-99/100": the size is after the "/".
    total = str(response.get("ContentRange") or "").rpartition("/")[2]
    return body, int(total) if total.isdigit() else offset + len(body)


def put_object_bytes(settings: StorageSettings, key: str, body: bytes) -> None:
    orchestrator_s3(settings).put_object(Bucket=settings.bucket, Key=key, Body=body, ContentType=JSON_CONTENT_TYPE)


def read_json_object(settings: StorageSettings, key: str) -> Any:
    response = orchestrator_s3(settings).get_object(Bucket=settings.bucket, Key=key)
    return json.loads(response["Body"].read())


def put_json_object(settings: StorageSettings, key: str, value: Any) -> tuple[int, str]:
    """Store `value` as JSON; returns (size in bytes, sha256 hex) as recorded in the outputs index."""
    body = encode_json(value)
    orchestrator_s3(settings).put_object(
        Bucket=settings.bucket, Key=key, Body=body, ContentType=JSON_CONTENT_TYPE
    )
    return len(body), sha256_hex(body)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
