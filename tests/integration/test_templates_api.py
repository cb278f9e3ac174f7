"""Templates through the real app: create, version, read, list with usage, and a pipeline
refused for a missing template. Needs the /api/templates routes (see docs/templates.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

AUTH = {"Authorization": "Bearer acme-admin-key"}
GREET: dict[str, Any] = {"id": "greet", "task": "echo", "params": {"greeting": "hello"},
                         "retry": {"max_attempts": 2}}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"code", "message", "details"}
    return body


def test_create_update_get_and_list(client: TestClient) -> None:
    created = client.post("/api/templates", json=GREET, headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["body"]["task"] == "echo"
    assert error_of(client.post("/api/templates", json=GREET, headers=AUTH), 409)["code"] == "conflict"

    same = client.put("/api/templates/greet", json=GREET, headers=AUTH)
    assert same.status_code == 200 and same.json()["changed"] is False and same.json()["version"] == 1
    yaml = b"id: greet\ntask: echo\nparams: {greeting: hi}\n"
    changed = client.put("/api/templates/greet", content=yaml, headers={**AUTH, "Content-Type": "application/yaml"})
    assert changed.status_code == 200 and changed.json()["changed"] is True and changed.json()["version"] == 2

    got = client.get("/api/templates/greet", headers=AUTH).json()
    assert got["body"]["params"] == {"greeting": "hi"} and got["used_by"] == []
    assert error_of(client.get("/api/templates/nope", headers=AUTH), 404)["code"] == "not_found"
    assert error_of(client.put("/api/templates/nope", json={**GREET, "id": "nope"}, headers=AUTH), 404)

    assert client.post("/api/pipelines", json={"id": "p", "nodes": [{"id": "a", "template": "greet"}]},
                       headers=AUTH).status_code == 201
    listed = client.get("/api/templates", headers=AUTH).json()
    assert [(t["id"], t["version"], t["used_by"]) for t in listed["items"]] == [("greet", 2, ["p"])]
    assert listed["next_cursor"] is None


def test_invalid_templates_are_422_with_paths(client: TestClient, engine: Engine) -> None:
    body = error_of(client.post("/api/templates", json={"id": "x", "task": "echo", "retries": 3}, headers=AUTH), 422)
    assert body["code"] == "invalid" and any(d["path"] == "retries" for d in body["details"])
    body = error_of(client.put("/api/templates/other", json=GREET, headers=AUTH), 422)
    assert body["details"] == [{"path": "id", "message": "expected 'other'"}]
    assert client.get("/api/templates", headers=AUTH).json()["items"] == []


def test_pipeline_with_a_missing_template_is_refused_naming_it(client: TestClient, engine: Engine) -> None:
    bad = {"id": "p", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "template": "ghost", "depends": ["a"]}]}
    body = error_of(client.post("/api/pipelines", json=bad, headers=AUTH), 422)
    assert body["code"] == "invalid" and "ghost" in body["message"]
    assert body["details"] == [{"path": "nodes[1].template", "message": "template 'ghost' does not exist"}]
    assert engine.list_pipelines(WORKSPACE) == []


def test_pipeline_shows_its_templates(client: TestClient) -> None:
    client.post("/api/templates", json=GREET, headers=AUTH)
    client.post("/api/pipelines", json={"id": "p", "nodes": [{"id": "a", "template": "greet"}]}, headers=AUTH)
    got = client.get("/api/pipelines/p", headers=AUTH).json()
    assert got["definition"]["nodes"][0]["task"] == "echo"
    assert got["templates"] == {"a": {"template": "greet", "version": 1}}
    assert got["source_definition"]["nodes"][0]["template"] == "greet"


def test_viewer_reads_but_cannot_write(client: TestClient, engine: Engine) -> None:
    raw, _ = engine.create_api_key(WORKSPACE, "viewer")
    viewer = {"Authorization": f"Bearer {raw}"}
    assert client.get("/api/templates", headers=viewer).status_code == 200
    assert error_of(client.post("/api/templates", json=GREET, headers=viewer), 403)["code"] == "forbidden"
