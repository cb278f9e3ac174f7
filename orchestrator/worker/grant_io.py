"""Reading inputs and writing the output of one task with the storage grant from its token."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from orchestrator.storage.s3 import JSON_CONTENT_TYPE, LOG_CONTENT_TYPE, s3_client, sha256_b64
from orchestrator.storage.tokens import StorageGrant
from orchestrator.worker.http import StorageHTTPError, get_bytes, put_bytes

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["GrantStorage", "ObjectUnavailable", "StorageAccessDenied"]

# What the store answers for an object that is not there: NoSuchKey (404) to a client allowed
# to list the bucket, AccessDenied (403) to one that is not, as a task's scoped grant is not.
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden"})


class StorageAccessDenied(PermissionError):
    """The grant does not cover this key (checked locally so the error names the key)."""


class ObjectUnavailable(LookupError):
    """The store would not return the object: `missing` (NoSuchKey) or `denied` (AccessDenied,
    which is also how S3 answers a missing key to credentials that may not list the bucket)."""

    def __init__(self, key: str, reason: str, detail: str) -> None:
        super().__init__(f"{key!r}: {detail}")
        self.key = key
        self.reason = reason
        self.detail = detail


class GrantStorage:
    """Object access limited to what one grant allows: STS credentials or presigned URLs."""

    def __init__(self, grant: StorageGrant) -> None:
        self.grant = grant
        self._lock = threading.Lock()
        self._client: S3Client | None = None

    @property
    def output_key(self) -> str:
        return self.grant.output_key

    @property
    def log_key(self) -> str | None:
        """Where this attempt's log goes, if the grant lets it store one."""
        if self.grant.log_key is None:
            return None
        if self.grant.credentials is None and self.grant.presigned_log_put is None:
            return None
        return self.grant.log_key

    def _s3(self) -> S3Client:
        # Built on first use only: a task that reads nothing over credentials never pays for it.
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.grant.endpoint_url, self.grant.region, self.grant.credentials)
            return self._client

    def may_read(self, key: str) -> bool:
        """Whether the grant covers `key`: an input key, or a key under a read prefix."""
        return self.grant.may_read(key)

    def needs_read_url(self, key: str) -> bool:
        """Whether reading `key` needs a URL from the orchestrator first: a key under a read
        prefix, in a grant without credentials (nothing under a prefix is presigned ahead)."""
        return (self.grant.credentials is None and key not in self.grant.presigned_get
                and self.grant.under_read_prefix(key))

    def read_bytes(self, key: str, *, url: str | None = None) -> bytes:
        """The object's bytes, by the grant's presigned URL for it, the `url` given (one the
        orchestrator presigned on request, for a key under a read prefix) or its credentials."""
        url = url or self.grant.presigned_get.get(key)
        if url is not None:
            if not self.grant.may_read(key):
                raise StorageAccessDenied(f"the storage grant does not allow reading {key!r}")
            try:
                return get_bytes(url)
            except StorageHTTPError as exc:
                if exc.status in (403, 404):
                    reason = "missing" if exc.status == 404 else "denied"
                    raise ObjectUnavailable(key, reason, f"HTTP {exc.status} from a presigned GET") from None
                raise
        # The session policy enforces this on AWS; checking here too gives a clear error and
        # keeps local runs (where moto does not enforce policies) honest.
        if self.grant.credentials is None or not self.grant.may_read(key):
            raise StorageAccessDenied(f"the storage grant does not allow reading {key!r}")
        try:
            response = self._s3().get_object(Bucket=self.grant.bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES or code in _DENIED_CODES:
                reason = "missing" if code in _MISSING_CODES else "denied"
                raise ObjectUnavailable(key, reason, f"{code} from GetObject") from None
            raise
        return response["Body"].read()

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_output(self, body: bytes, *, content_type: str = JSON_CONTENT_TYPE) -> None:
        """Write the task's output object (the only key the grant lets it write).

        With credentials, the PUT carries the body's SHA-256 as S3's own checksum: S3 refuses a
        body that does not match it (BadDigest) and keeps it, so the orchestrator checks the
        callback's sha256 with one HEAD. A presigned PUT cannot carry it: the URL is signed at
        dispatch, before the output exists, and S3 refuses x-amz-* headers a presigned request
        did not sign; the callback's sha256 is then the worker's word, and its size is checked.
        """
        if self.grant.credentials is not None:
            self._s3().put_object(
                Bucket=self.grant.bucket, Key=self.grant.output_key, Body=body, ContentType=content_type,
                ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256_b64(body),
            )
        elif self.grant.presigned_put is not None:
            put_bytes(self.grant.presigned_put, body, content_type=content_type)
        else:
            raise StorageAccessDenied("the storage grant allows no write")

    def write_log(self, body: bytes) -> None:
        """Replace the attempt's log object with `body` (S3 has no append: the whole log, capped
        by the SDK, each time), with the credentials or the log's own presigned PUT."""
        key = self.log_key
        if key is None:
            raise StorageAccessDenied("the storage grant allows no log")
        if self.grant.credentials is not None:
            self._s3().put_object(Bucket=self.grant.bucket, Key=key, Body=body, ContentType=LOG_CONTENT_TYPE)
        else:
            assert self.grant.presigned_log_put is not None
            put_bytes(self.grant.presigned_log_put, body, content_type=LOG_CONTENT_TYPE)
