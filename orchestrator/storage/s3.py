"""S3 and STS access: orchestrator-side clients, buckets, and per-task storage grants.

Orchestrator-side clients use the ambient credentials (the Lambda role, or the fake keys of the
local moto server). Workers never get those: a grant carries either STS credentials narrowed by a
session policy to writes under the attempt's own prefix and reads of exactly its input keys (and,
for a reducer of a mapped node, of what is under that node's items prefix), or presigned URLs per
object (one PUT for the attempt's output key, one for its log; GETs of the items under a read
prefix are presigned on demand by the API, `presign_get_urls`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from orchestrator.storage.presign import AddressingStyle, QueryPresigner
from orchestrator.storage.tokens import StorageGrant, check_read_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sts import STSClient

    from orchestrator.config import Settings

__all__ = [
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
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
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
    read_prefixes: Iterable[str] = (), log_key: str | None = None,
) -> dict[str, Any]:
    """Inline session policy: read exactly the input keys; write the output key (and `log_key`),
    or, given `write_prefix` (the attempt's prefix, which holds the output key and the log),
    anything under it; and read anything under each of `read_prefixes` (a mapped node's items
    prefix: its children's outputs, which a reducer reads by the manifest and which are too
    many to name)."""
    prefixes = [check_read_prefix(prefix) for prefix in dict.fromkeys(read_prefixes)]
    if write_prefix is not None:
        _check_write_prefix(output_key, write_prefix, log_key)
        writes = [f"arn:aws:s3:::{bucket}/{write_prefix}*"]
    else:
        writes = [f"arn:aws:s3:::{bucket}/{key}" for key in (output_key, log_key) if key is not None]
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
                "Resource": [f"arn:aws:s3:::{bucket}/{key}" for key in reads],
            }
        )
    if prefixes:
        statements.append(
            {
                "Sid": "ReadMappedItems",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*" for prefix in prefixes],
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


def issue_storage_grant(
    settings: Settings,
    *,
    output_key: str,
    read_keys: Sequence[str],
    task_id: str,
    write_prefix: str | None = None,
    read_prefixes: Sequence[str] = (),
    log_key: str | None = None,
) -> StorageGrant:
    """Storage access for one task attempt: STS credentials if a role is configured, else URLs.

    `write_prefix` is the attempt's own prefix (see layout.node_attempt_prefix): the session
    policy lets the credentials write under it (the output, and the log beside it) and nowhere
    else; a presigned PUT is for the output key alone. Without it, exactly the output key.

    `read_prefixes` (each ending in "/": layout.map_items_prefix of a mapped upstream) let the
    task read anything under them. With a role the session policy says so; without one nothing
    is presigned for them (the keys are in the manifest, not known here): the grant carries
    them and the worker asks `POST /api/worker/read-urls`, which checks each key against them.

    `log_key` (layout.attempt_log_key, beside the output) is where the attempt stores its log:
    the session policy covers it (it is under `write_prefix`, or named beside the output key);
    without a role, the grant carries a second presigned PUT, for it alone, signed for
    LOG_CONTENT_TYPE.
    """
    reads = tuple(dict.fromkeys(read_keys))
    prefixes = tuple(check_read_prefix(prefix) for prefix in dict.fromkeys(read_prefixes))
    if write_prefix is not None:
        _check_write_prefix(output_key, write_prefix, log_key)
    ttl = int(settings.storage_credentials_ttl_s)

    def grant(
        credentials: dict[str, str] | None, put_url: str | None, get_urls: dict[str, str],
        log_put_url: str | None = None,
    ) -> StorageGrant:
        return StorageGrant(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.aws_region,
            bucket=settings.bucket,
            output_key=output_key,
            read_keys=reads,
            credentials=credentials,
            presigned_put=put_url,
            presigned_get=get_urls,
            read_prefixes=prefixes,
            log_key=log_key,
            presigned_log_put=log_put_url,
        )

    if settings.storage_role_arn:
        policy = session_policy(settings.bucket, output_key, reads, write_prefix=write_prefix,
                                read_prefixes=prefixes, log_key=log_key)
        presigned_get: dict[str, str] = {}
        if len(_compact_json(policy)) > MAX_SESSION_POLICY_CHARS:
            # Too many inputs to name in a session policy: keep the credentials for the write
            # (still scoped to the attempt) and hand out presigned URLs for the reads, rather than
            # widening the policy to a prefix the task has no business reading. The read
            # prefixes stay in the policy: what is under them cannot be presigned here.
            policy = session_policy(settings.bucket, output_key, (), write_prefix=write_prefix,
                                    read_prefixes=prefixes, log_key=log_key)
            if len(_compact_json(policy)) > MAX_SESSION_POLICY_CHARS:
                # Only a reducer of dozens of mapped nodes at once gets here; failing the
                # dispatch with the reason beats credentials that cannot read its inputs.
                raise ValueError(
                    f"a session policy for {len(prefixes)} read prefixes is over the "
                    f"{MAX_SESSION_POLICY_CHARS}-character limit of STS; a task can read the items "
                    "of that many mapped nodes only without a storage role (presigned URLs)"
                )
            presigned_get = _presign_gets(settings, reads, ttl)
        response = orchestrator_sts(settings).assume_role(
            RoleArn=settings.storage_role_arn,
            RoleSessionName=role_session_name(task_id),
            Policy=_compact_json(policy),
            DurationSeconds=max(_MIN_ROLE_DURATION_S, ttl),
        )
        creds = response["Credentials"]
        credentials = {
            "AccessKeyId": creds["AccessKeyId"],
            "SecretAccessKey": creds["SecretAccessKey"],
            "SessionToken": creds["SessionToken"],
            "Expiration": creds["Expiration"].isoformat(),
        }
        return grant(credentials, None, presigned_get)
    put_url = _presign_put(settings, output_key, ttl, JSON_CONTENT_TYPE)
    log_put_url = _presign_put(settings, log_key, ttl, LOG_CONTENT_TYPE) if log_key is not None else None
    return grant(None, put_url, _presign_gets(settings, reads, ttl), log_put_url)


def _presign_put(settings: StorageSettings, key: str, ttl: int, content_type: str) -> str:
    fast = _fast_presigner(settings.s3_endpoint_url, settings.aws_region, settings.bucket)
    if fast is not None:
        return fast.presign_put(settings.bucket, key, ttl, content_type=content_type)
    url: str = orchestrator_s3(settings).generate_presigned_url(
        "put_object", Params={"Bucket": settings.bucket, "Key": key, "ContentType": content_type}, ExpiresIn=ttl,
    )
    return url


def _presign_gets(
    settings: StorageSettings, keys: Iterable[str], ttl: int, *, bucket: str | None = None
) -> dict[str, str]:
    bucket = bucket or settings.bucket
    fast = _fast_presigner(settings.s3_endpoint_url, settings.aws_region, bucket)
    if fast is not None:
        return {key: fast.presign_get(bucket, key, ttl) for key in keys}
    client = orchestrator_s3(settings)
    return {
        key: client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl)
        for key in keys
    }


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
