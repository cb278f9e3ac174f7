"""API keys: creation (shown once) and authentication (constant-time by construction: the
lookup is by sha256 digest, so no comparison of the secret itself happens in Python)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from orchestrator.db.connection import Database, Row
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound, Unauthorized
from orchestrator.store import keys as key_store

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
KEY_PREFIX = "tw_"


@dataclass(frozen=True)
class Principal:
    workspace_id: str
    role: str
    key_id: str
    key_prefix: str
    key_name: str = ""

    @property
    def actor(self) -> str:
        """Who did it, as recorded (a run's triggered_by, a decision's `by`, a version's
        created_by): the key's name, or its first characters when it was given no name."""
        return self.key_name or self.key_prefix

    def allows(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def hash_key(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode()).digest()


def new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(
    db: Database, workspace_id: str, role: str, *, name: str = "", raw_key: str | None = None
) -> tuple[str, str]:
    """Create a key (and the workspace if new); returns (raw key, key id). The raw key is not stored.

    A caller-supplied `raw_key` (the dev stack's and tests' fixed keys) that already exists is
    accepted only as a no-op: when it is an active key of the same workspace and role, its id is
    returned, so a restart can create it again. Any other existing key with that value (another
    workspace's, another role's, or a revoked one) is refused with Conflict and left as it was:
    an insert never re-activates or takes over a key.
    """
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    raw = raw_key or new_raw_key()
    if len(raw) < 6:
        raise InvalidInput("an API key must be at least 6 characters")
    digest = hash_key(raw)
    with db.transaction() as conn:
        key_store.ensure_workspace(conn, workspace_id)
        row = key_store.insert_api_key(
            conn, workspace_id=workspace_id, key_hash=digest, prefix=raw[:6], role=role, name=name
        )
        if row is None:
            existing = key_store.find_key_by_hash(conn, digest)
            if (existing is not None and existing["workspace_id"] == workspace_id and existing["role"] == role
                    and existing["revoked_at"] is None):
                return raw, str(existing["id"])
            # The same message whoever owns it: it must not tell a caller whether another
            # workspace uses this value.
            raise Conflict("this API key value is already in use or was revoked; choose another key")
    return raw, str(row["id"])


def authenticate(db: Database, raw_key: str | None) -> Principal:
    if not raw_key:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    with db.connection() as conn:
        row = key_store.find_active_key(conn, hash_key(raw_key))
    if row is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    return Principal(row["workspace_id"], row["role"], str(row["id"]), row["prefix"], row["name"] or "")


def set_workspace_task_limit(db: Database, workspace_id: str, max_active_tasks: int | None) -> None:
    """At most this many tasks of the workspace out with workers at once (None: no limit)."""
    if max_active_tasks is not None and max_active_tasks < 1:
        raise InvalidInput("max_active_tasks must be 1 or more (or none for no limit)")
    with db.transaction() as conn:
        if not key_store.set_workspace_task_limit(conn, workspace_id, max_active_tasks):
            raise NotFound(f"workspace '{workspace_id}' not found")


def list_api_keys(db: Database, workspace_id: str) -> list[Row]:
    """The workspace's keys: id, prefix, role, name, dates; never the key or its hash."""
    with db.connection() as conn:
        return key_store.list_keys(conn, workspace_id)


def revoke_api_key(db: Database, principal: Principal, key_id: uuid.UUID) -> None:
    if str(key_id) == principal.key_id:
        raise Conflict("a key cannot revoke itself; use another admin key")
    with db.transaction() as conn:
        if key_store.revoke_key(conn, principal.workspace_id, key_id) is None:
            if key_store.key_exists(conn, principal.workspace_id, key_id):
                raise Conflict(f"key '{key_id}' is already revoked")
            raise NotFound(f"key '{key_id}' not found")
