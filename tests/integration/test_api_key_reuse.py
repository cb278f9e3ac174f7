"""Creating an API key with a caller-chosen value never changes an existing key: not another
workspace's, not another role's, and a revoked key stays revoked. Creating the same active key
for the same workspace and role again (the dev stack's restart) is a no-op."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.engine.errors import Conflict, Unauthorized
from orchestrator.engine.keys import Principal
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE


def keys_of(engine: Engine, workspace: str) -> list[tuple[str, str, bool]]:
    return [(str(k["id"]), k["role"], k["revoked_at"] is None) for k in engine.list_api_keys(workspace)]


def test_the_same_key_for_the_same_workspace_and_role_is_a_no_op(engine: Engine) -> None:
    raw, key_id = engine.create_api_key("dev", "admin", raw_key="dev-stack-key")
    assert engine.create_api_key("dev", "admin", raw_key="dev-stack-key") == (raw, key_id)
    assert keys_of(engine, "dev") == [(key_id, "admin", True)]


def test_another_workspaces_key_is_neither_taken_over_nor_changed(engine: Engine) -> None:
    _, theirs = engine.create_api_key("victim", "viewer", raw_key="shared-value-123")
    with pytest.raises(Conflict) as refused:
        engine.create_api_key(WORKSPACE, "admin", raw_key="shared-value-123")
    assert "victim" not in refused.value.message  # says nothing about who holds it
    assert engine.authenticate("shared-value-123").workspace_id == "victim"
    assert keys_of(engine, "victim") == [(theirs, "viewer", True)]
    assert all(k["prefix"] != "shared" for k in engine.list_api_keys(WORKSPACE))


def test_a_revoked_key_stays_revoked(engine: Engine) -> None:
    _, key_id = engine.create_api_key("victim", "admin", raw_key="leaked-key-value")
    admin = Principal("victim", "admin", str(uuid.uuid4()), "other")
    engine.revoke_api_key(admin, uuid.UUID(key_id))
    for workspace in ("victim", WORKSPACE):
        with pytest.raises(Conflict):
            engine.create_api_key(workspace, "admin", raw_key="leaked-key-value")
    with pytest.raises(Unauthorized):
        engine.authenticate("leaked-key-value")
    assert keys_of(engine, "victim") == [(key_id, "admin", False)]


def test_another_role_is_refused_and_the_key_keeps_its_role(engine: Engine) -> None:
    _, key_id = engine.create_api_key(WORKSPACE, "viewer", raw_key="viewer-only-key")
    with pytest.raises(Conflict):
        engine.create_api_key(WORKSPACE, "admin", raw_key="viewer-only-key")
    assert engine.authenticate("viewer-only-key").role == "viewer"
    assert (key_id, "viewer", True) in keys_of(engine, WORKSPACE)
