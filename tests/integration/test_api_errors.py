"""Bad input through the real app: every mistake is a 4xx with the error shape, and nothing
is half-written."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

KEY = "acme-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD: dict[str, Any] = {"id": "good", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo", "depends": ["a"]}]}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(engine.settings.with_overrides(max_body_bytes=64 * 1024), engine)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_error(response: Any, status: int, code: str | None = None, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"code", "message", "details"}
    assert body["message"]
    if code:
        assert body["code"] == code
    assert contains in body["message"], body["message"]
    return body


def pipeline_count(engine: Engine) -> int:
    return len(engine.list_pipelines(WORKSPACE))


def test_cycle_is_refused_naming_the_cycle(client: TestClient, engine: Engine) -> None:
    bad = {"id": "loop", "nodes": [{"id": "a", "task": "echo", "depends": ["c"]},
                                   {"id": "b", "task": "echo", "depends": ["a"]},
                                   {"id": "c", "task": "echo", "depends": ["b"]}]}
    body = assert_error(client.post("/api/pipelines", json=bad, headers=AUTH), 422, "invalid", "a -> c -> b -> a")
    assert {"path": "nodes", "message": "cycle: a -> c -> b -> a"} in body["details"]
    assert pipeline_count(engine) == 0


def test_missing_dependency_and_duplicate_ids_are_listed_with_paths(client: TestClient, engine: Engine) -> None:
    bad = {"id": "bad", "nodes": [{"id": "a", "task": "echo"}, {"id": "a", "task": "echo"},
                                  {"id": "b", "task": "echo", "depends": ["zz"]}]}
    body = assert_error(client.post("/api/pipelines", json=bad, headers=AUTH), 422, "invalid")
    paths = {d["path"] for d in body["details"]}
    assert {"nodes[1].id", "nodes[2].depends[0]"} <= paths
    assert pipeline_count(engine) == 0


def test_bad_ids_and_unknown_fields(client: TestClient) -> None:
    body = assert_error(client.post("/api/pipelines", json={"id": "Bad Id!", "nodes": [{"id": "a", "task": "x"}]},
                                    headers=AUTH), 422)
    assert any(d["path"] == "id" for d in body["details"])
    body = assert_error(client.post("/api/pipelines", json={**GOOD, "nodez": []}, headers=AUTH), 422)
    assert any("nodez" in d["path"] for d in body["details"])


def test_malformed_json_and_yaml(client: TestClient) -> None:
    assert_error(client.post("/api/pipelines", content=b'{"id": "x", ', headers={**AUTH, "Content-Type": "application/json"}),
                 422, "invalid", "JSON")
    assert_error(client.post("/api/pipelines", content=b"id: [unclosed", headers={**AUTH, "Content-Type": "application/yaml"}),
                 422, "invalid")
    assert_error(client.post("/api/pipelines", content=b"", headers=AUTH), 422, "invalid", "empty")
    assert_error(client.post("/api/pipelines", content=b"[1, 2]", headers={**AUTH, "Content-Type": "application/json"}),
                 422, "invalid")
    assert_error(client.post("/api/pipelines/x/runs", content=b"{nope", headers=AUTH), 422, "invalid", "JSON")


def test_duplicate_create_is_a_conflict_and_update_of_unknown_is_404(client: TestClient, engine: Engine) -> None:
    assert client.post("/api/pipelines", json=GOOD, headers=AUTH).status_code == 201
    assert_error(client.post("/api/pipelines", json=GOOD, headers=AUTH), 409, "conflict", "PUT")
    assert_error(client.put("/api/pipelines/nope", json={**GOOD, "id": "nope"}, headers=AUTH), 404, "not_found")
    assert_error(client.put("/api/pipelines/good", json={**GOOD, "id": "other"}, headers=AUTH), 422, "invalid", "match")
    assert client.get("/api/pipelines/good", headers=AUTH).json()["version"] == 1


def test_unknown_ids_are_404(client: TestClient) -> None:
    assert_error(client.get("/api/pipelines/nope", headers=AUTH), 404, "not_found", "nope")
    assert_error(client.post("/api/pipelines/nope/runs", json={}, headers=AUTH), 404, "not_found")
    assert_error(client.get(f"/api/runs/{uuid.uuid4()}", headers=AUTH), 404, "not_found")
    assert_error(client.get("/api/runs/not-a-uuid", headers=AUTH), 404, "not_found")
    assert_error(client.get(f"/api/tasks/{uuid.uuid4()}", headers=AUTH), 404, "not_found")
    assert_error(client.get("/api/no/such/route", headers=AUTH), 404, "not_found")
    assert_error(client.delete("/api/pipelines", headers=AUTH), 405, "method_not_allowed")


def test_bad_trigger_bodies(client: TestClient, engine: Engine) -> None:
    client.post("/api/pipelines", json=GOOD, headers=AUTH)
    assert_error(client.post("/api/pipelines/good/runs", json={"versions": []}, headers=AUTH), 422, "invalid")
    assert_error(client.post("/api/pipelines/good/runs", json={"versions": ["a b"]}, headers=AUTH), 422, "invalid")
    assert_error(client.post("/api/pipelines/good/runs", json={"params": "x"}, headers=AUTH), 422, "invalid", "params")
    assert_error(client.post("/api/pipelines/good/runs", json={"bogus": 1}, headers=AUTH), 422, "invalid", "bogus")
    assert_error(client.get("/api/runs?limit=0", headers=AUTH), 422, "invalid", "limit")
    assert_error(client.get("/api/runs?status=weird", headers=AUTH), 422, "invalid", "status")
    assert_error(client.get("/api/runs?cursor=garbage", headers=AUTH), 422, "invalid", "cursor")
    assert engine.list_runs(WORKSPACE) == []


def test_missing_wrong_and_underprivileged_keys(client: TestClient, engine: Engine) -> None:
    assert_error(client.get("/api/pipelines"), 401, "unauthorized", "API key")
    assert_error(client.get("/api/pipelines", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(client.get("/api/pipelines", headers={"x-api-key": "wrong"}), 401, "unauthorized")
    assert client.get("/api/pipelines", headers={"x-api-key": KEY}).status_code == 200
    viewer, _ = engine.create_api_key(WORKSPACE, "viewer")
    assert_error(client.post("/api/pipelines", json=GOOD, headers={"x-api-key": viewer}), 403, "forbidden", "admin")
    assert pipeline_count(engine) == 0


def test_other_workspaces_objects_are_invisible(client: TestClient, engine: Engine) -> None:
    client.post("/api/pipelines", json=GOOD, headers=AUTH)
    run_id = client.post("/api/pipelines/good/runs", json={}, headers=AUTH).json()["id"]
    other, _ = engine.create_api_key("other", "admin")
    headers = {"x-api-key": other}
    assert_error(client.get("/api/pipelines/good", headers=headers), 404)
    assert_error(client.get(f"/api/runs/{run_id}", headers=headers), 404)
    assert client.get("/api/runs", headers=headers).json()["items"] == []
    assert client.get("/api/pipelines", headers=headers).json()["items"] == []
    # the same id can exist in both workspaces independently
    assert client.post("/api/pipelines", json=GOOD, headers=headers).status_code == 201


def test_oversized_body_is_413_and_stores_nothing(client: TestClient, engine: Engine) -> None:
    huge = {**GOOD, "description": "x" * 70_000}
    assert_error(client.post("/api/pipelines", json=huge, headers=AUTH), 413, "payload_too_large", "limit")
    assert pipeline_count(engine) == 0


def test_tick_needs_its_secret(client: TestClient, engine: Engine) -> None:
    assert_error(client.post("/api/tick"), 401, "unauthorized")
    assert_error(client.post("/api/tick", headers=AUTH), 401, "unauthorized")
    ok = client.post("/api/tick", headers={"x-tick-secret": engine.settings.tick_secret})
    assert ok.status_code == 200 and set(ok.json()) >= {"expired", "claimed", "dispatched", "durations_ms"}
    assert client.post("/api/tick", headers={"Authorization": f"Bearer {engine.settings.tick_secret}"}).status_code == 200


def test_forged_and_malformed_worker_callbacks(client: TestClient, engine: Engine) -> None:
    task_id = uuid.uuid4()
    assert_error(client.post(f"/api/callback/{task_id}", json={"token": "x.y.z.w.v", "status": "succeeded"}),
                 401, "unauthorized", "refused")
    assert_error(client.post(f"/api/callback/{task_id}", json={"status": "succeeded"}), 422, "invalid", "token")
    assert_error(client.post(f"/api/callback/{task_id}", json={"token": "t", "status": "maybe"}), 422, "invalid")
    assert_error(client.post("/api/heartbeat", json={"token": "garbage"}), 401, "unauthorized")


def test_health_and_info_need_no_key(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    assert info["database"] == "ok" and info["mode"] == "local"
    page = client.get("/")
    assert page.status_code == 200 and "Tickweave" in page.text
