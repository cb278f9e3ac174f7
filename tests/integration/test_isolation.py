"""Workspaces are tenants: every route, walked with workspace A's key against workspace B's
objects, answers 404 (or 403 for a role failure), and no list shows B's rows. Keys are
created, listed and revoked by admins; request limits answer 413."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.db.connection import Connection
from orchestrator.engine.completion import finish_attempt
from orchestrator.engine.service import Engine
from orchestrator.store import tasks as task_store


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def tenants(engine: Engine) -> dict[str, Any]:
    """Workspace B with one of everything; A with an admin and a viewer key."""
    b_admin, b_key_id = engine.create_api_key("tenant-b", "admin")
    a_admin, _ = engine.create_api_key("tenant-a", "admin")
    a_viewer, _ = engine.create_api_key("tenant-a", "viewer")
    engine.create_pipeline("tenant-b", {"id": "secret", "schedule": "0 3 * * *", "steps": [
        {"id": "work", "task": "fail"}, {"id": "gate", "kind": "approval"}]})
    run = engine.trigger_run("tenant-b", "secret", dispatch_now=False)
    with engine.db.transaction() as conn:
        (task,) = task_store.claim_ready_tasks(conn, 10)

    def die(conn: Connection) -> Any:
        return finish_attempt(conn, task["id"], task["attempt"], task["claim_token"], succeeded=False,
                              error={"message": "x"}, retryable=False)

    engine.db.run_in_transaction(die)
    (entry,) = engine.list_dead_letters("tenant-b")
    _, tasks = engine.get_run("tenant-b", run.id)
    gate = next(t for t in tasks if t["node_id"] == "gate")
    engine.create_template("tenant-b", {"id": "hidden", "task": "echo"})
    engine.record_event("tenant-b", "order.created", "evt-b-1", {}, dispatch_now=False)
    now = datetime.now(UTC)
    backfill = engine.start_backfill(
        "tenant-b", "secret", start=now - timedelta(days=3), end=now - timedelta(days=1), versions=None,
        max_active_runs=None, reprocess="none", dry_run=False, actor="test")
    return {"a_admin": a_admin, "a_viewer": a_viewer, "b_admin": b_admin, "b_key_id": b_key_id,
            "run": str(run.id), "task": str(task["id"]), "gate": str(gate["id"]), "dlq": str(entry["id"]),
            "backfill": str(backfill["id"])}


def test_every_route_hides_another_workspaces_objects(client: TestClient, tenants: dict[str, Any]) -> None:
    a = {"x-api-key": tenants["a_admin"]}
    definition = {"id": "secret", "nodes": [{"id": "n", "task": "echo"}]}
    probes = [
        ("GET", "/api/pipelines/secret", None),
        ("PUT", "/api/pipelines/secret", definition),
        ("POST", "/api/pipelines/secret/runs", {}),
        ("POST", "/api/pipelines/secret/pause", None),
        ("POST", "/api/pipelines/secret/resume", None),
        ("GET", f"/api/runs/{tenants['run']}", None),
        ("POST", f"/api/runs/{tenants['run']}/cancel", None),
        ("POST", f"/api/runs/{tenants['run']}/retry", None),
        ("GET", f"/api/tasks/{tenants['task']}", None),
        ("POST", f"/api/tasks/{tenants['gate']}/complete", {"success": True}),
        ("POST", f"/api/approvals/{tenants['gate']}", {"decision": "approve"}),
        ("POST", f"/api/dlq/{tenants['dlq']}/retry", None),
        ("DELETE", f"/api/keys/{tenants['b_key_id']}", None),
        ("GET", "/api/templates/hidden", None),
        ("PUT", "/api/templates/hidden", {"id": "hidden", "task": "echo", "description": "x"}),
        ("GET", "/api/events/evt-b-1", None),
        ("POST", "/api/pipelines/secret/backfill", {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}),
        ("GET", f"/api/backfills/{tenants['backfill']}", None),
        ("POST", f"/api/backfills/{tenants['backfill']}/cancel", None),
        # issue 18's routes
        ("DELETE", "/api/pipelines/secret", None),
        ("DELETE", "/api/pipelines/secret?cancel_runs=true", None),
        ("GET", f"/api/dlq/{tenants['dlq']}", None),
        ("GET", f"/api/tasks/{tenants['task']}/output", None),
        ("GET", f"/api/tasks/{tenants['task']}/attempts/1/log", None),
    ]
    for method, path, body in probes:
        response = client.request(method, path, json=body, headers=a)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert response.json()["error"]["code"] == "not_found"

    for path in ("/api/pipelines", "/api/runs", "/api/schedules", "/api/dlq", "/api/keys", "/api/templates",
                 "/api/events", "/api/workers"):
        items = client.get(path, headers=a).json()["items"]
        assert all("secret" not in str(item) and tenants["run"] not in str(item) for item in items), path
    assert client.get("/api/schedules", headers=a).json()["items"] == []
    assert client.get("/api/dlq", headers=a).json()["items"] == []
    assert client.get("/api/templates", headers=a).json()["items"] == []
    assert client.get("/api/events", headers=a).json()["items"] == []
    assert client.get("/api/notifications", headers=a).json()["items"] == []

    # B's objects are untouched and still visible to B
    b = {"x-api-key": tenants["b_admin"]}
    assert client.get(f"/api/runs/{tenants['run']}", headers=b).json()["status"] == "failed"
    assert len(client.get("/api/dlq", headers=b).json()["items"]) == 1


def test_roles_gate_every_mutation(client: TestClient, tenants: dict[str, Any], engine: Engine) -> None:
    viewer = {"x-api-key": tenants["a_viewer"]}
    engine.create_pipeline("tenant-a", {"id": "mine", "nodes": [{"id": "n", "task": "echo"}]})
    forbidden = [
        ("POST", "/api/pipelines", {"id": "x", "nodes": [{"id": "n", "task": "echo"}]}),
        ("PUT", "/api/pipelines/mine", {"id": "mine", "nodes": [{"id": "n", "task": "echo"}]}),
        ("POST", "/api/pipelines/mine/runs", {}),
        ("POST", "/api/pipelines/mine/pause", None),
        ("POST", f"/api/runs/{uuid.uuid4()}/cancel", None),
        ("POST", f"/api/runs/{uuid.uuid4()}/retry", None),
        ("POST", "/api/dlq/purge", {"older_than_days": 1}),
        ("POST", "/api/keys", {"role": "admin"}),
        ("GET", "/api/keys", None),
        ("POST", "/api/templates", {"id": "t", "task": "echo"}),
        ("POST", "/api/events", {"name": "x", "id": "1"}),
        ("POST", "/api/pipelines/mine/backfill", {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"}),
        ("DELETE", "/api/pipelines/mine", None),
        ("PUT", "/api/notifications/defaults", {"notify": []}),
        ("POST", "/api/notifications/secret", None),
        ("GET", "/api/notifications/secret", None),
        ("POST", "/api/workers/register", {"service": "s", "version": "1", "transport": "http",
                                           "endpoint": "http://127.0.0.1:9/d", "tasks": [{"name": "t", "code_hash": "sha256:00000000"}]}),
    ]
    for method, path, body in forbidden:
        response = client.request(method, path, json=body, headers=viewer)
        assert response.status_code == 403, (method, path, response.text)
    assert client.get("/api/pipelines/mine", headers=viewer).status_code == 200  # and it was not deleted
    operator, _ = engine.create_api_key("tenant-a", "operator")
    assert client.post("/api/pipelines/mine/runs", json={}, headers={"x-api-key": operator}).status_code == 201
    assert client.post("/api/keys", json={"role": "viewer"}, headers={"x-api-key": operator}).status_code == 403


def test_keys_are_shown_once_listed_without_secrets_and_revoked(client: TestClient, tenants: dict[str, Any]) -> None:
    admin = {"x-api-key": tenants["a_admin"]}
    created = client.post("/api/keys", json={"role": "operator", "name": "ci"}, headers=admin)
    assert created.status_code == 201
    key = created.json()["key"]
    assert created.json()["workspace"] == "tenant-a" and key.startswith("tw_") and len(key) > 40
    listing = client.get("/api/keys", headers=admin).json()["items"]
    assert key not in str(listing) and any(k["name"] == "ci" and k["prefix"] == key[:6] for k in listing)
    assert client.get("/api/runs", headers={"x-api-key": key}).status_code == 200

    revoked = client.delete(f"/api/keys/{created.json()['id']}", headers=admin)
    assert revoked.status_code == 200
    assert client.get("/api/runs", headers={"x-api-key": key}).status_code == 401
    assert client.delete(f"/api/keys/{created.json()['id']}", headers=admin).status_code == 409
    own = next(k for k in listing if k["prefix"] == tenants["a_admin"][:6])
    assert client.delete(f"/api/keys/{own['id']}", headers=admin).status_code == 409  # no self-lockout
    assert client.post("/api/keys", json={"role": "root"}, headers=admin).status_code == 422


def test_definition_and_run_size_limits_answer_413(client: TestClient, tenants: dict[str, Any], engine: Engine) -> None:
    admin = {"x-api-key": tenants["a_admin"]}
    huge = {"id": "huge", "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(10_001)]}
    response = client.post("/api/pipelines", json=huge, headers=admin)
    assert response.status_code == 413 and "10001 nodes" in response.json()["error"]["message"]
    engine.create_pipeline("tenant-a", {"id": "wide", "nodes": [{"id": f"n{i}", "task": "echo"} for i in range(200)]})
    too_many = client.post("/api/pipelines/wide/runs", json={"versions": [f"v{i}" for i in range(501)]}, headers=admin)
    assert too_many.status_code == 413 and "tasks per run" in too_many.json()["error"]["message"]
    assert engine.list_runs("tenant-a") == []
    assert client.get("/api/runs?limit=501", headers=admin).status_code == 422  # page size


def test_worker_registrations_are_per_workspace(client: TestClient, tenants: dict[str, Any]) -> None:
    body = {"service": "svc", "version": "1", "transport": "http", "endpoint": "http://127.0.0.1:9/dispatch",
            "tasks": [{"name": "render", "code_hash": "sha256:cccccccc"}]}
    assert client.post("/api/workers/register", json=body, headers={"x-api-key": tenants["b_admin"]}).status_code == 200
    a = {"x-api-key": tenants["a_admin"]}
    assert client.get("/api/task-definitions/render/history", headers=a).status_code == 404
    assert client.get("/api/workers", headers=a).json()["items"] == []
    assert client.post("/api/workers/register", json=body, headers={"x-api-key": tenants["a_viewer"]}).status_code == 403


def test_secrets_stay_out_of_answers_and_logs(client: TestClient, tenants: dict[str, Any],
                                              caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    wrong_key = "tw_" + "s3cr3t" * 8
    answer = client.get("/api/runs", headers={"x-api-key": wrong_key})
    forged = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiZGV2In0..c2VjcmV0LXRva2Vu.Zm9yZ2Vk.dGFn"
    callback = client.post(f"/api/callback/{tenants['task']}", json={"token": forged, "status": "succeeded"})
    tick = client.post("/api/tick", headers={"x-tick-secret": "not-the-secret-" + "x" * 20})
    assert (answer.status_code, callback.status_code, tick.status_code) == (401, 401, 401)
    for response in (answer, callback, tick):
        assert wrong_key not in response.text and forged not in response.text and "x" * 20 not in response.text
    assert wrong_key not in caplog.text and forged not in caplog.text and "x" * 20 not in caplog.text
    listing = client.get("/api/keys", headers={"x-api-key": tenants["a_admin"]}).text
    assert tenants["a_admin"] not in listing and "key_hash" not in listing
