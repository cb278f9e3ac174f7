"""SigV4 query-string presigning of S3 GET and PUT URLs, without botocore on the hot path.

botocore spends ~0.35 ms of CPU per `generate_presigned_url` (parameter validation, endpoint
rules, event hooks, request objects); a dispatch presigns one PUT and a GET per input. This module
builds the same URLs, byte for byte, from a few string joins, one SHA-256 and one HMAC per URL
(the derived signing key is cached per secret, day, region and service).

It reproduces exactly what the orchestrator's own botocore client (`storage.s3._client_config`:
SigV4, path-style addressing with an endpoint URL, "auto" without one) gives, and nothing else:
`QueryPresigner.handles` is the rule for what it reproduces, and the caller falls back to botocore
for the rest (see `handles` for why each case is left out). tests/unit/test_presign.py holds both
sides to identical URLs under a frozen clock.

No boto3/botocore import here: credentials come in as any object with `get_frozen_credentials()`
(botocore's `Credentials`, from the same session the client signs with).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, Protocol
from urllib.parse import quote, urlsplit

__all__ = [
    "AddressingStyle",
    "CredentialSource",
    "FrozenCredentials",
    "QueryPresigner",
    "signing_hmac",
    "signing_key",
    "utc_now",
]

AddressingStyle = Literal["auto", "path", "virtual"]

_ALGORITHM = "AWS4-HMAC-SHA256"
_SERVICE = "s3"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# botocore's SigV4QueryAuth drops a Content-Type of exactly this value before signing (it is the
# one its serializers set on their own for form bodies); a PUT with it is signed for `host` alone.
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
# Regions of the `aws` partition, a strict subset of that partition's own pattern in botocore's
# endpoint data (`^(us|eu|ap|sa|ca|me|af|il|mx)\-\w+\-\d+$`): cn-*, us-gov-*, the iso partitions
# and eusc-* never match, nor do pseudo-regions such as aws-global or fips-*.
_AWS_PARTITION_REGION = re.compile(r"(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-[0-9]+")
# A bucket that botocore addresses virtual-hosted on the global endpoint: one DNS label, 3 to 63 of
# [a-z0-9-], starting and ending alphanumeric (botocore's check_dns_name and the S3 rules'
# isVirtualHostableS3Bucket both accept it).
_VIRTUAL_HOST_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
# A bucket that path-style addressing puts in the path as is (its URI encoding is itself).
_PATH_STYLE_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# What quote(..., safe="/~") leaves unchanged: unreserved characters (RFC 3986) and "/".
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~/-]*")


class FrozenCredentials(Protocol):
    """One consistent snapshot of credentials (botocore's `ReadOnlyCredentials`)."""

    @property
    def access_key(self) -> str | None: ...
    @property
    def secret_key(self) -> str | None: ...
    @property
    def token(self) -> str | None: ...


class CredentialSource(Protocol):
    """Where credentials come from (botocore's `Credentials`/`RefreshableCredentials`); asked
    once per signature, so refreshable credentials keep refreshing as they do for botocore."""

    def get_frozen_credentials(self) -> FrozenCredentials: ...


def utc_now() -> datetime:
    """The signing clock (module-level so that tests can freeze it)."""
    return datetime.now(UTC)


@functools.lru_cache(maxsize=64)
def signing_key(secret_key: str, datestamp: str, region: str, service: str) -> bytes:
    """The SigV4 signing key: one per secret, UTC day, region and service, so cached."""
    k_date = hmac.digest(f"AWS4{secret_key}".encode(), datestamp.encode(), "sha256")
    k_region = hmac.digest(k_date, region.encode(), "sha256")
    k_service = hmac.digest(k_region, service.encode(), "sha256")
    return hmac.digest(k_service, b"aws4_request", "sha256")


@functools.lru_cache(maxsize=64)
def signing_hmac(secret_key: str, datestamp: str, region: str, service: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with `signing_key(...)`, to be copied for each signature (never
    updated itself): OpenSSL 3 sets up a keyed HMAC in ~3 us, copies one in ~1. Cached like the
    key, so the key is derived once per secret, day, region and service."""
    return hmac.new(signing_key(secret_key, datestamp, region, service), digestmod="sha256")


def _uri_encode(value: str) -> str:
    # botocore.utils.percent_encode: UTF-8, then everything but A-Za-z0-9 and -._~ escaped.
    return quote(value, safe="-_.~")


@functools.lru_cache(maxsize=16)
def _credential_query(access_key: str, datestamp: str, region: str) -> str:
    # The X-Amz-Credential value, URI-encoded: the same for every URL of a day and key.
    return f"{_uri_encode(access_key)}%2F{datestamp}%2F{_uri_encode(region)}%2F{_SERVICE}%2Faws4_request"


def _encoded_path(key: str) -> str:
    # quote(key, safe="/~") leaves a key of only unreserved characters and "/" as it is: the
    # layout's keys are such keys, so the common case skips quote's per-character work.
    return key if _PLAIN_KEY.fullmatch(key) else quote(key, safe="/~")


@functools.lru_cache(maxsize=8)
def _encoded_token(token: str) -> str:
    # Session tokens are ~1 KB and change only on refresh; encode each one once.
    return _uri_encode(token)


class QueryPresigner:
    """Presigned S3 GET/PUT URLs (SigV4, query string), identical to botocore's for the client
    `storage.s3.s3_client(endpoint_url, region)` builds, for the buckets `handles` accepts."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None,
        addressing_style: AddressingStyle,
        credentials: CredentialSource,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.addressing_style = addressing_style
        self._credentials = credentials
        self._clock = clock
        # For a custom endpoint: "scheme://netloc" as given (botocore keeps it verbatim in the
        # URL) and the Host header it signs (lowercase, without a default port).
        self._endpoint_prefix: str | None = None
        self._endpoint_host: str | None = None
        self._mode = self._resolve_mode()

    def _resolve_mode(self) -> Literal["global-virtual", "endpoint-path"] | None:
        if self.endpoint_url is None:
            # botocore presigns for the `aws` partition with "auto" addressing on the legacy
            # global endpoint, https://{bucket}.s3.amazonaws.com, in every region (signers.py
            # `_should_use_global_endpoint`; the credential scope keeps the client's region).
            # Checked against botocore 1.44: eu-west-1 gives {bucket}.s3.amazonaws.com too, not
            # {bucket}.s3.eu-west-1.amazonaws.com.
            if self.addressing_style == "auto" and _AWS_PARTITION_REGION.fullmatch(self.region):
                return "global-virtual"
            return None
        if self.addressing_style != "path":
            return None
        try:
            parts = urlsplit(self.endpoint_url)
            port = parts.port  # ValueError on a malformed port
        except ValueError:
            return None
        # Only "scheme://host[:port]" with an optional "/": an endpoint with a path, a query, a
        # fragment, user info or an IPv6 literal is joined and signed by rules this module does
        # not reproduce (and no deployment of ours uses one).
        if (
            parts.scheme not in _DEFAULT_PORTS
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or "[" in parts.netloc
            or not parts.hostname
        ):
            return None
        host = parts.hostname  # lowercase, as botocore's _host_from_url signs it
        if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{port}"
        self._endpoint_prefix = f"{parts.scheme}://{parts.netloc}"
        self._endpoint_host = host
        return "endpoint-path"

    def handles(self, bucket: str) -> bool:
        """Whether this presigner reproduces botocore's URL for `bucket`; when False, presign with
        botocore instead. Left to botocore, because its URL differs from the simple shapes here:
        - any region outside the `aws` partition (cn-*, us-gov-*, iso...) without an endpoint:
          regional hosts of other domains, no global endpoint;
        - a bucket that is not one plain DNS label without an endpoint: botocore addresses it
          path-style instead (dots: a wildcard TLS certificate covers one label only; upper case
          or "_": not a host name), e.g. https://s3.amazonaws.com/my.bucket/... in us-east-1
          and https://s3.eu-west-1.amazonaws.com/My_Bucket/... in eu-west-1;
        - with an endpoint, a bucket outside S3's naming rules (its URI encoding is not itself);
        - any "--" in the name: S3 Express directory buckets (`--x-s3`) sign with session
          credentials of their own, and the other reserved suffixes (`--ol-s3`, ...) are
          routed by rules of their own;
        - an endpoint with a path, query, user info or IPv6 host, or an addressing style other
          than the client's (path with an endpoint, auto without).
        """
        if self._mode is None or "--" in bucket:
            return False
        if self._mode == "global-virtual":
            return _VIRTUAL_HOST_BUCKET.fullmatch(bucket) is not None
        return _PATH_STYLE_BUCKET.fullmatch(bucket) is not None

    def presign_get(self, bucket: str, key: str, expires_in: int, *, at: datetime | None = None) -> str:
        """A presigned GetObject URL, as `generate_presigned_url("get_object", ...)` gives.
        `at` is the signing instant (default: the clock; a naive datetime is UTC)."""
        return self._presign("GET", bucket, key, expires_in, None, at)

    def presign_put(
        self, bucket: str, key: str, expires_in: int, *, content_type: str | None = None,
        at: datetime | None = None,
    ) -> str:
        """A presigned PutObject URL (the uploader must send the same Content-Type), as
        `generate_presigned_url("put_object", Params={..., "ContentType": ...})` gives."""
        return self._presign("PUT", bucket, key, expires_in, content_type, at)

    def _presign(
        self, method: str, bucket: str, key: str, expires_in: int, content_type: str | None,
        at: datetime | None,
    ) -> str:
        if not self.handles(bucket):
            raise ValueError(f"bucket {bucket!r} is not presigned here for {self.endpoint_url!r} "
                             f"in {self.region!r}; presign it with botocore")
        if not isinstance(key, str) or not key:
            raise ValueError("an S3 key is a non-empty string")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise ValueError(f"expires_in is a whole number of seconds, not {expires_in!r}")

        if self._mode == "global-virtual":
            host = f"{bucket}.s3.amazonaws.com"
            prefix = f"https://{host}"
            path = "/" + _encoded_path(key)
        else:
            assert self._endpoint_prefix is not None and self._endpoint_host is not None
            host = self._endpoint_host
            prefix = self._endpoint_prefix
            path = f"/{bucket}/" + _encoded_path(key)

        now = at if at is not None else (self._clock or utc_now)()
        if now.tzinfo is not None:
            now = now.astimezone(UTC)
        # now.strftime("%Y%m%dT%H%M%SZ"), written out: a third of its cost (years 1000-9999)
        timestamp = (f"{now.year:04d}{now.month:02d}{now.day:02d}"
                     f"T{now.hour:02d}{now.minute:02d}{now.second:02d}Z")
        datestamp = timestamp[:8]

        frozen = self._credentials.get_frozen_credentials()
        access_key, secret_key, token = frozen.access_key, frozen.secret_key, frozen.token
        if not access_key or secret_key is None:
            raise ValueError("credentials without an access key or a secret key")
        scope = f"{datestamp}/{self.region}/{_SERVICE}/aws4_request"

        if content_type is not None and content_type != _FORM_CONTENT_TYPE:
            # SigV4 canonical header value: trimmed, runs of whitespace made one space.
            headers = f"content-type:{' '.join(content_type.split())}\nhost:{host}\n"
            signed_headers = "content-type;host"
            signed_headers_q = "content-type%3Bhost"
        else:
            headers = f"host:{host}\n"
            signed_headers = signed_headers_q = "host"

        credential_q = _credential_query(access_key, datestamp, self.region)
        head = (
            f"X-Amz-Algorithm={_ALGORITHM}&X-Amz-Credential={credential_q}"
            f"&X-Amz-Date={timestamp}&X-Amz-Expires={expires_in}"
        )
        token_q = None if token is None else _encoded_token(token)
        # The canonical query string is sorted (Security-Token < SignedHeaders); the URL keeps
        # botocore's order (SignedHeaders, then the token).
        if token_q is None:
            canonical_query = query = f"{head}&X-Amz-SignedHeaders={signed_headers_q}"
        else:
            canonical_query = f"{head}&X-Amz-Security-Token={token_q}&X-Amz-SignedHeaders={signed_headers_q}"
            query = f"{head}&X-Amz-SignedHeaders={signed_headers_q}&X-Amz-Security-Token={token_q}"

        canonical_request = (
            f"{method}\n{path}\n{canonical_query}\n{headers}\n{signed_headers}\n{_UNSIGNED_PAYLOAD}"
        )
        string_to_sign = (
            f"{_ALGORITHM}\n{timestamp}\n{scope}\n"
            + hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
        )
        mac = signing_hmac(secret_key, datestamp, self.region, _SERVICE).copy()
        mac.update(string_to_sign.encode("utf-8"))
        signature = mac.hexdigest()
        return f"{prefix}{path}?{query}&X-Amz-Signature={signature}"
