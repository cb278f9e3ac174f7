"""Reading inputs and writing the output of one task with the storage grant from its token."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from orchestrator.storage.s3 import JSON_CONTENT_TYPE, s3_client
from orchestrator.storage.tokens import StorageGrant
from orchestrator.worker.http import get_bytes, put_bytes

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["GrantStorage", "StorageAccessDenied"]


class StorageAccessDenied(PermissionError):
    """The grant does not cover this key (checked locally so the error names the key)."""


class GrantStorage:
    """Object access limited to what one grant allows: STS credentials or presigned URLs."""

    def __init__(self, grant: StorageGrant) -> None:
        self.grant = grant
        self._lock = threading.Lock()
        self._client: S3Client | None = None

    @property
    def output_key(self) -> str:
        return self.grant.output_key

    def _s3(self) -> S3Client:
        # Built on first use only: a task that reads nothing over credentials never pays for it.
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.grant.endpoint_url, self.grant.region, self.grant.credentials)
            return self._client

    def read_bytes(self, key: str) -> bytes:
        url = self.grant.presigned_get.get(key)
        if url is not None:
            return get_bytes(url)
        # The session policy enforces this on AWS; checking here too gives a clear error and
        # keeps local runs (where moto does not enforce policies) honest.
        if self.grant.credentials is None or key not in self.grant.read_keys:
            raise StorageAccessDenied(f"the storage grant does not allow reading {key!r}")
        response = self._s3().get_object(Bucket=self.grant.bucket, Key=key)
        return response["Body"].read()

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_output(self, body: bytes, *, content_type: str = JSON_CONTENT_TYPE) -> None:
        """Write the task's output object (the only key the grant lets it write)."""
        if self.grant.credentials is not None:
            self._s3().put_object(
                Bucket=self.grant.bucket, Key=self.grant.output_key, Body=body, ContentType=content_type
            )
        elif self.grant.presigned_put is not None:
            put_bytes(self.grant.presigned_put, body, content_type=content_type)
        else:
            raise StorageAccessDenied("the storage grant allows no write")
