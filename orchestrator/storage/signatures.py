"""Signed dispatches to registered worker endpoints.

A worker service a tenant registers (`POST /api/workers/register`) is not platform
infrastructure, so it never gets a platform-wide secret. Each registration has its own secret
instead, derived from a server key and (workspace, service, endpoint): every API replica
computes the same one without storing it, and the registration answer hands it to the worker.
Each dispatch to the endpoint carries an HMAC-SHA256 over a timestamp and the exact body; the
worker SDK checks it (and the timestamp's age, which bounds replay) before reading the body.

Both sides import this module: the orchestrator to sign, the SDK to verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from orchestrator.storage.tokens import token_key_bytes

if TYPE_CHECKING:
    from orchestrator.config import Settings

__all__ = [
    "MAX_SIGNATURE_AGE_S",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureProblem",
    "endpoint_secret",
    "sign_dispatch",
    "signing_root_key",
    "verify_dispatch",
]

SIGNATURE_HEADER = "X-Tickweave-Signature"
TIMESTAMP_HEADER = "X-Tickweave-Timestamp"
# How far a dispatch's timestamp may be from the worker's clock, either way: long enough for
# clock skew and a slow network, short enough that a captured request soon stops working.
MAX_SIGNATURE_AGE_S = 300
_VERSION = "v1"
_SECRET_PREFIX = "twsig_"

SignatureProblem = Literal["signature_missing", "signature_invalid", "signature_expired"]


def signing_root_key(settings: Settings) -> bytes:
    """The server key the endpoint secrets derive from: TICKWEAVE_WORKER_SIGNING_KEY when set
    (so token keys can rotate without changing them), else derived from the active token key
    (domain-separated, so neither key reveals anything about the other's uses)."""
    if settings.worker_signing_key:
        return hashlib.sha256(b"tickweave worker signing key\x00" + settings.worker_signing_key.encode()).digest()
    kid, material = settings.token_keys[0]
    return hmac.new(token_key_bytes(kid, material), b"tickweave worker signing key v1", hashlib.sha256).digest()


def endpoint_secret(root_key: bytes, workspace: str, service: str, endpoint: str) -> str:
    """The secret of one registration; the same inputs give the same secret on every replica."""
    # JSON, not concatenation: ("a", "b:c") and ("a:b", "c") must not collide.
    message = json.dumps(["worker-endpoint", workspace, service, endpoint], separators=(",", ":")).encode()
    digest = hmac.new(root_key, message, hashlib.sha256).digest()
    return _SECRET_PREFIX + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _mac(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign_dispatch(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The headers that sign `body` (the exact bytes sent) with a registration's secret."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: f"{_VERSION}={_mac(secret, timestamp, body)}"}


def verify_dispatch(
    secrets: Iterable[str], headers: Mapping[str, str], body: bytes, *, now: float | None = None,
    max_age_s: float = MAX_SIGNATURE_AGE_S,
) -> SignatureProblem | None:
    """None when `body` was signed by one of `secrets` within `max_age_s`; otherwise why not.

    `headers` is looked up case-insensitively when it is a Starlette/httpx header mapping; a
    plain dict must use the canonical names above or their lowercase forms.
    """
    signature = headers.get(SIGNATURE_HEADER) or headers.get(SIGNATURE_HEADER.lower())
    timestamp = headers.get(TIMESTAMP_HEADER) or headers.get(TIMESTAMP_HEADER.lower())
    if not signature or not timestamp:
        return "signature_missing"
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return "signature_invalid"
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > max_age_s:
        return "signature_expired"
    offered = [part.strip().removeprefix(f"{_VERSION}=") for part in signature.split(",")
               if part.strip().startswith(f"{_VERSION}=")]
    for secret in secrets:
        expected = _mac(secret, timestamp, body)
        # Constant time: a comparison must not tell how much of a forged signature was right.
        if any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in offered):
            return None
    return "signature_invalid"
