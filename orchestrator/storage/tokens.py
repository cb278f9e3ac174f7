"""Worker tokens: compact JWE (`dir` + `A256GCM`) carrying a task's claims and storage grant.

The token is encrypted, not just signed, because it carries short-lived storage credentials or
presigned URLs; whoever sees a dispatch message in a queue or a log must not learn them. The
protected header names the key (`kid`) so keys can rotate: the first key of the ring encrypts,
every key of the ring decrypts, and tokens issued under an old key stay valid until they expire.

Tokens are sealed, and tokens in the shape sealed here are opened, by `jwe_direct.DirectGcm`
(the same bytes as joserfc's, at about a third of its CPU); any other token is read by joserfc.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from joserfc import jwe
from joserfc.errors import DecodeError, JoseError
from joserfc.jwk import OctKey

from orchestrator.storage.jwe_direct import DirectGcm, InvalidTag

if TYPE_CHECKING:
    from orchestrator.config import Settings

__all__ = [
    "StorageGrant",
    "TaskClaims",
    "TokenInvalid",
    "TokenKeyring",
    "check_read_prefix",
    "is_plain_key",
    "map_digest",
    "params_digest",
]

TokenInvalidReason = Literal[
    "malformed", "unknown_key", "tampered", "expired", "wrong_audience", "wrong_issuer"
]

_ALG = "dir"
_ENC = "A256GCM"
_KEY_BYTES = 32
# joserfc caps the ciphertext at 64 KiB by default; a grant with presigned URLs for many inputs
# can come near that, and the token is only ever read by holders of the key, so allow more.
_MAX_CIPHERTEXT_BYTES = 1_048_576


@dataclass(frozen=True)
class StorageGrant:
    """What a worker may touch in the bucket for one task attempt, and how.

    Exactly one access mechanism is expected to be in use for writing: a `presigned_put` URL (the
    default; signed by the orchestrator, with a session of the storage role it keeps when one is
    configured, so its query may carry an X-Amz-Security-Token) or STS `credentials` (for a node
    with `storage: credentials`: a session shared by that run's such nodes, scoped by a session
    policy to the run). `presigned_get` may be present in both cases (a session policy has a
    size limit, and inputs from outside the run are not in a run's policy).

    `read_prefixes` are folders (each ending in "/") the task may read anything under: the
    outputs of a mapped node's children, whose keys are too many to name one by one. With
    credentials the session policy allows GetObject under them; without, nothing can be
    presigned ahead (the keys are only known from the manifest), so the worker asks the API
    for URLs of the keys it needs (`POST /api/worker/read-urls`), which checks them against
    these prefixes.

    `log_key` is where the attempt keeps its log (layout.attempt_log_key: beside the output,
    under the same attempt prefix, so a session policy that covers the prefix covers it);
    without credentials, `presigned_log_put` is the PUT URL for it. Both are None in tokens of
    an orchestrator that keeps no task logs: the worker then stores none.
    """

    endpoint_url: str | None
    region: str
    bucket: str
    output_key: str
    read_keys: tuple[str, ...] = ()
    credentials: dict[str, str] | None = None
    presigned_put: str | None = None
    presigned_get: dict[str, str] = field(default_factory=dict)
    read_prefixes: tuple[str, ...] = ()
    log_key: str | None = None
    presigned_log_put: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "bucket": self.bucket,
            "output_key": self.output_key,
            "read_keys": list(self.read_keys),
            "credentials": dict(self.credentials) if self.credentials is not None else None,
            "presigned_put": self.presigned_put,
            "presigned_get": dict(self.presigned_get),
            "read_prefixes": list(self.read_prefixes),
            "log_key": self.log_key,
            "presigned_log_put": self.presigned_log_put,
        }

    def may_read(self, key: str) -> bool:
        """Whether this grant covers reading `key`: one of its input keys, or a key under one of
        its read prefixes."""
        return key in self.read_keys or self.under_read_prefix(key)

    def under_read_prefix(self, key: str) -> bool:
        """Whether `key` is an object under one of the read prefixes (not the prefix itself). A
        key with a "." or ".." segment or an empty one ("//") never is: S3 takes keys literally,
        but an HTTP client resolves `items/../x` in a URL's path to `x`, outside the prefix."""
        if not isinstance(key, str) or not is_plain_key(key):
            return False
        return any(key.startswith(prefix) and len(key) > len(prefix) for prefix in self.read_prefixes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StorageGrant:
        """Inverse of `to_dict`; raises ValueError on anything that does not fit the shape."""
        if not isinstance(data, Mapping):
            raise ValueError("storage grant must be an object")
        endpoint_url = data.get("endpoint_url")
        presigned_put = data.get("presigned_put")
        credentials = data.get("credentials")
        read_keys = data.get("read_keys", [])
        presigned_get = data.get("presigned_get") or {}
        # Absent in tokens issued before mapped nodes existed: those read no prefix.
        read_prefixes = data.get("read_prefixes", [])
        # Absent in tokens issued before task logs existed: those store no log.
        log_key = data.get("log_key")
        presigned_log_put = data.get("presigned_log_put")
        if endpoint_url is not None and not isinstance(endpoint_url, str):
            raise ValueError("storage grant: endpoint_url must be a string or null")
        if presigned_put is not None and not isinstance(presigned_put, str):
            raise ValueError("storage grant: presigned_put must be a string or null")
        if credentials is not None and not _is_str_map(credentials):
            raise ValueError("storage grant: credentials must be an object of strings or null")
        if not isinstance(read_keys, list | tuple) or not all(isinstance(k, str) for k in read_keys):
            raise ValueError("storage grant: read_keys must be a list of strings")
        if not _is_str_map(presigned_get):
            raise ValueError("storage grant: presigned_get must be an object of strings")
        if not isinstance(read_prefixes, list | tuple) or not all(isinstance(p, str) for p in read_prefixes):
            raise ValueError("storage grant: read_prefixes must be a list of strings")
        for prefix in read_prefixes:
            check_read_prefix(prefix)
        if log_key is not None and (not isinstance(log_key, str) or not log_key):
            raise ValueError("storage grant: log_key must be a non-empty string or null")
        if presigned_log_put is not None and not isinstance(presigned_log_put, str):
            raise ValueError("storage grant: presigned_log_put must be a string or null")
        return cls(
            endpoint_url=endpoint_url,
            region=_require_str(data, "region"),
            bucket=_require_str(data, "bucket"),
            output_key=_require_str(data, "output_key"),
            read_keys=tuple(read_keys),
            credentials=dict(credentials) if credentials is not None else None,
            presigned_put=presigned_put,
            presigned_get=dict(presigned_get),
            read_prefixes=tuple(read_prefixes),
            log_key=log_key,
            presigned_log_put=presigned_log_put,
        )


def is_plain_key(key: str) -> bool:
    """No segment of `key` is empty ("//", a leading "/"), "." or "..": segments an HTTP client
    or proxy may resolve or collapse, so that a presigned URL's path would name another object
    than the key checked against a prefix. (".." inside a segment, as in a data version
    "1..2", is an ordinary character run, and the layout writes such keys.)"""
    return not any(segment in ("", ".", "..") for segment in key.split("/"))


def check_read_prefix(prefix: str) -> str:
    """A prefix a grant may read under, or ValueError. It must end in "/" (without it,
    `items/1` would also cover `items/10/...`, another child's), must not be empty or start
    with "/" (that would be the whole bucket) and must have no "", "." or ".." segment."""
    if not isinstance(prefix, str) or not prefix.endswith("/") or not is_plain_key(prefix[:-1]):
        raise ValueError(f"read prefix {prefix!r} must be a folder: ending in '/', with no empty, "
                         "'.' or '..' segment")
    return prefix


def params_digest(params: Any) -> str:
    """`sha256:` of the canonical JSON of a dispatch's params (sorted keys, no spaces).

    The token binds it, so a token lifted from one dispatch cannot be replayed with other
    params: the worker recomputes it from the message it got and refuses a mismatch.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def map_digest(map_slot: Any) -> str:
    """`sha256:` of the canonical JSON of a dispatch's `map` field (index, item, count).

    For a mapped child the item is what its params are for any other task, so the token binds
    it the same way: a token lifted from one child's dispatch cannot run another item.
    """
    return params_digest(map_slot)


@dataclass(frozen=True)
class TaskClaims:
    """What a worker token asserts about one attempt of one task."""

    task_id: str
    attempt: int
    claim_token: str
    workspace: str
    # The task name and `params_digest` of the params the dispatch carries: a worker runs a
    # dispatch only when its `task` and `params` match these.
    task_name: str
    params_sha256: str
    expires_at: int  # unix seconds
    storage: StorageGrant | None = None
    # `map_digest` of the dispatch's `map` field, for a child of a mapped node; None otherwise.
    map_sha256: str | None = None


class TokenInvalid(Exception):
    """A worker token that must not be honoured; `reason` says why, for logs and the dispatcher."""

    def __init__(self, reason: TokenInvalidReason, detail: str = "") -> None:
        self.reason: TokenInvalidReason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TokenKeyring:
    """Issues and reads worker tokens with an ordered ring of symmetric keys (first = active)."""

    def __init__(self, keys: Sequence[tuple[str, str]], issuer: str, audience: str) -> None:
        if not keys:
            raise ValueError("a token keyring needs at least one key")
        self._keys: dict[str, OctKey] = {}
        # Each key's direct codec, by the protected header segment it writes: a token that
        # starts with one of these segments names its key by it.
        self._direct: dict[str, DirectGcm] = {}
        for kid, material in keys:
            if not kid:
                raise ValueError("token key ids must be non-empty")
            if kid in self._keys:
                raise ValueError(f"duplicate token key id {kid!r}")
            raw = _decode_key(kid, material)
            self._keys[kid] = OctKey.import_key(raw)
            codec = DirectGcm(kid, raw)
            self._direct[codec.header_segment] = codec
            if len(self._direct) == 1:  # the ring's first key encrypts
                self._active_codec = codec
        self._active_kid = keys[0][0]
        self.issuer = issuer
        self.audience = audience
        # Only the one algorithm pair is accepted, so a token cannot pick a weaker one.
        self._registry = jwe.JWERegistry(algorithms=[_ALG, _ENC])
        self._registry.max_ciphertext_length = _MAX_CIPHERTEXT_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenKeyring:
        if settings.mode == "lambda" and settings.is_dev_keyring:
            from orchestrator.config import ConfigurationError

            # Fail closed: the development key is public, and tokens under it can be forged.
            raise ConfigurationError(
                "refusing to use the development token key in lambda mode; set TICKWEAVE_TOKEN_KEYS "
                "(or TICKWEAVE_TOKEN_KEYS_FROM)"
            )
        return cls(settings.token_keys, issuer=settings.token_issuer, audience=settings.token_audience)

    @property
    def active_kid(self) -> str:
        return self._active_kid

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def issue(self, claims: TaskClaims, *, now: float | None = None) -> str:
        issued_at = int(time.time() if now is None else now)
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": claims.task_id,
            "att": claims.attempt,
            "jti": claims.claim_token,
            "ws": claims.workspace,
            "tsk": claims.task_name,
            "prm": claims.params_sha256,
            "exp": int(claims.expires_at),
            "iat": issued_at,
            "stg": claims.storage.to_dict() if claims.storage is not None else None,
        }
        if claims.map_sha256 is not None:
            payload["map"] = claims.map_sha256
        plaintext = json.dumps(payload, separators=(",", ":")).encode()
        # The bytes joserfc.jwe.encrypt_compact writes for {"alg","enc","kid"} under this key.
        return self._active_codec.seal(plaintext)

    def read(self, token: str, *, now: float | None = None) -> TaskClaims:
        """Decrypt and validate a token; raises TokenInvalid with the reason."""
        if not isinstance(token, str) or not token:
            raise TokenInvalid("malformed", "token must be a non-empty string")
        parts = token.split(".")
        codec = self._direct.get(parts[0])
        plaintext: bytes | None = None
        if codec is not None:
            try:
                plaintext = codec.open_token(parts, max_ciphertext_chars=_MAX_CIPHERTEXT_BYTES)
            except InvalidTag as exc:
                raise TokenInvalid("tampered", "authentication failed") from exc
        if plaintext is None:
            plaintext = self._read_with_joserfc(token)
        try:
            payload = json.loads(plaintext)
        except ValueError as exc:
            raise TokenInvalid("malformed", "payload is not JSON") from exc
        if not isinstance(payload, dict):
            raise TokenInvalid("malformed", "payload is not an object")
        return self._claims_from_payload(payload, time.time() if now is None else now)

    def _read_with_joserfc(self, token: str) -> bytes:
        """The plaintext of a token in any shape `DirectGcm` does not open, judged by joserfc."""
        header = _peek_header(token)
        if header.get("alg") != _ALG or header.get("enc") != _ENC:
            raise TokenInvalid("malformed", "unsupported alg/enc")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenInvalid("malformed", "missing kid")
        key = self._keys.get(kid)
        if key is None:
            raise TokenInvalid("unknown_key", f"kid {kid!r} is not in the keyring")
        try:
            # The header is authenticated as AAD, so a kid swapped for another known one fails here.
            plaintext = jwe.decrypt_compact(token, key, registry=self._registry).plaintext
        except DecodeError as exc:
            raise TokenInvalid("tampered", "authentication failed") from exc
        except (JoseError, ValueError) as exc:
            raise TokenInvalid("malformed", type(exc).__name__) from exc
        if plaintext is None:
            raise TokenInvalid("malformed", "empty payload")
        return plaintext

    def _claims_from_payload(self, payload: dict[str, Any], now: float) -> TaskClaims:
        if payload.get("iss") != self.issuer:
            raise TokenInvalid("wrong_issuer")
        aud = payload.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.audience not in audiences:
            raise TokenInvalid("wrong_audience")
        exp = payload.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise TokenInvalid("malformed", "exp must be an integer")
        if now >= exp:
            raise TokenInvalid("expired")
        try:
            attempt = payload["att"]
            if not isinstance(attempt, int) or isinstance(attempt, bool):
                raise ValueError("att must be an integer")
            stg = payload.get("stg")
            map_sha256 = payload.get("map")
            if map_sha256 is not None and not isinstance(map_sha256, str):
                raise ValueError("map must be a string")
            return TaskClaims(
                task_id=_require_str(payload, "sub"),
                attempt=attempt,
                claim_token=_require_str(payload, "jti"),
                workspace=_require_str(payload, "ws"),
                # Tokens issued before these claims existed are refused (malformed): tokens live
                # for an attempt's timeout, so an upgrade only sends such attempts round again.
                task_name=_require_str(payload, "tsk"),
                params_sha256=_require_str(payload, "prm"),
                expires_at=exp,
                storage=StorageGrant.from_dict(stg) if stg is not None else None,
                map_sha256=map_sha256,
            )
        except (KeyError, ValueError) as exc:
            raise TokenInvalid("malformed", str(exc)) from exc


def token_key_bytes(kid: str, material: str) -> bytes:
    """The raw 32 bytes of a configured token key, checked as the key ring checks them."""
    return _decode_key(kid, material)


def _decode_key(kid: str, material: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(material + "=" * (-len(material) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"token key {kid!r} is not valid base64url") from exc
    if len(raw) != _KEY_BYTES:
        raise ValueError(
            f"token key {kid!r} must be {_KEY_BYTES} bytes (base64url), got {len(raw)}; "
            'generate one with: python -c "import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
        )
    return raw


def _peek_header(token: str) -> dict[str, Any]:
    """Read the (not yet authenticated) protected header, only to choose the key."""
    parts = token.split(".")
    if len(parts) != 5:
        raise TokenInvalid("malformed", "not a compact JWE")
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        header = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise TokenInvalid("malformed", "unreadable header") from exc
    if not isinstance(header, dict):
        raise TokenInvalid("malformed", "header is not an object")
    return header


def _require_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _is_str_map(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
