"""Presigned reads for workers: URLs for keys under the read prefixes of a task's grant.

A reducer of a mapped node reads its children's outputs, whose keys it learns from the
manifest. Without a storage role its grant holds no credentials, and nothing could be
presigned when it was dispatched (the keys were not known to the grant, and 100,000 URLs would
not fit in a token anyway), so the worker asks for URLs a batch at a time, proving with its
token which prefixes it may read. The token is the whole authorisation: whoever holds it could
read these keys with the grant's credentials in the other mode too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from orchestrator.config import Settings
from orchestrator.engine.errors import Forbidden, InvalidInput
from orchestrator.engine.worker_protocol import read_token
from orchestrator.storage.tokens import TokenKeyring, is_plain_key

__all__ = ["MAX_KEY_BYTES", "MAX_READ_KEYS", "presign_reads"]

# Keys per request: a worker asks 100 ahead; the bound keeps one request's signing work and
# answer (~1 KB of URL per key) small, well under the Lambda answer limit.
MAX_READ_KEYS = 500
# S3's own limit on a key's length, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


def presign_reads(settings: Settings, keyring: TokenKeyring, token: str, keys: Sequence[Any]) -> dict[str, str]:
    """Presigned GET URLs, by key, for keys under the read prefixes of the token's grant.

    Raises Unauthorized for a token that is not valid (another key ring, expired, tampered),
    InvalidInput for a request that is not a list of at most MAX_READ_KEYS well-formed keys,
    Forbidden for a key the grant does not cover. The URLs live as long as the grant's
    credentials would, and never past the token's own expiry.
    """
    claims = read_token(keyring, token)
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise InvalidInput("keys must be a list of object keys")
    if len(keys) > MAX_READ_KEYS:
        raise InvalidInput(f"at most {MAX_READ_KEYS} keys per request; got {len(keys)}",
                           details={"max_keys": MAX_READ_KEYS})
    grant = claims.storage
    if grant is None:
        raise Forbidden("the worker token carries no storage grant")
    wanted: list[str] = []
    for position, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"keys[{position}] must be a non-empty string",
                               details={"path": f"keys.{position}"})
        # S3 takes keys literally, but a URL's path is resolved by clients: `items/../x` would
        # be signed as a key under the prefix and fetch `x`. The layout never writes such a
        # segment (nor "." or an empty one, "//"), so they are refused outright.
        if not is_plain_key(key):
            raise InvalidInput(f"keys[{position}] must not contain '..' or '.' segments or '//'",
                               details={"path": f"keys.{position}"})
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: no S3 key, and botocore would raise on it
            raise InvalidInput(f"keys[{position}] is not valid Unicode",
                               details={"path": f"keys.{position}"}) from None
        if size > MAX_KEY_BYTES:
            raise InvalidInput(f"keys[{position}] is longer than {MAX_KEY_BYTES} bytes",
                               details={"path": f"keys.{position}"})
        # Only the prefixes: the exact input keys already came presigned in the grant (or are
        # readable with its credentials), and this endpoint exists for what could not be.
        if not grant.under_read_prefix(key):
            raise Forbidden(f"keys[{position}] is not under a read prefix of this task's grant",
                            details={"path": f"keys.{position}", "key": key})
        wanted.append(key)
    if not wanted:
        return {}
    # Never longer than configured for grants, never past the token: a URL must not outlive the
    # authority of the request that obtained it. `read_token` refused an expired token, so the
    # difference is at least one second.
    ttl = max(1, min(int(settings.storage_credentials_ttl_s), claims.expires_at - int(time.time())))
    from orchestrator.storage.s3 import presign_get_urls  # boto3 on use: a cold API start skips it

    return presign_get_urls(settings, dict.fromkeys(wanted), ttl, bucket=grant.bucket)
