"""Events over HTTP: POST /api/events starts matching pipelines once per event id; GET lists
events with their runs; a definition closing an event-trigger cycle is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

AUTH = {"Authorization": "Bearer acme-admin-key"}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def triggered(pid: str, *triggers: dict[str, Any], emits: list[str] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": pid, "triggers": list(triggers), "nodes": [{"id": "a", "task": "echo"}]}
    if emits is not None:
        raw["emits"] = emits
    return raw


def test_posting_an_event_starts_matching_pipelines_once(client: TestClient) -> None:
    for raw in (
        triggered("ingest", {"event": "file.uploaded", "filter": {"bucket": ["raw", "landing"]}}),
        triggered("clean", {"event": "file.uploaded", "filter": {"bucket": "clean"}}),
    ):
        assert client.post("/api/pipelines", json=raw, headers=AUTH).status_code == 201

    body = {"name": "file.uploaded", "id": "s3-evt-1", "payload": {"bucket": "raw", "key": "a.csv"}}
    first = client.post("/api/events", json=body, headers=AUTH)
    assert first.status_code == 201, first.text
    data = first.json()
    assert (data["id"], data["name"], data["created"]) == ("s3-evt-1", "file.uploaded", True)
    assert data["payload"] == body["payload"]
    assert [r["pipeline_id"] for r in data["runs"]] == ["ingest"]

    run = client.get(f"/api/runs/{data['runs'][0]['id']}", headers=AUTH).json()
    assert run["trigger"] == "event"
    assert run["params"]["event"] == {"name": "file.uploaded", "id": "s3-evt-1", "payload": body["payload"]}

    again = client.post("/api/events", json=body, headers=AUTH)
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert again.json()["runs"] == [{**data["runs"][0], "status": again.json()["runs"][0]["status"]}]
    assert len(client.get("/api/runs", headers=AUTH).json()["items"]) == 1


def test_reusing_an_event_id_for_another_event_is_a_conflict(client: TestClient) -> None:
    assert client.post("/api/events", json={"name": "go", "id": "e1", "payload": {"n": 1}}, headers=AUTH).status_code == 201
    other = client.post("/api/events", json={"name": "go", "id": "e1", "payload": {"n": 2}}, headers=AUTH)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Bad Name", "id": "x"},
        {"name": "go", "id": ""},
        {"name": "go", "id": "x" * 256},
        {"name": "go"},
        {"name": "go", "id": "x", "payload": [1, 2]},
        {"name": "go", "id": "x", "extra": 1},
    ],
)
def test_invalid_event_bodies_are_refused(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/api/events", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid"


def test_posting_needs_the_operator_role_and_listing_the_viewer_role(client: TestClient, engine: Engine) -> None:
    viewer, _ = engine.create_api_key(WORKSPACE, "viewer")
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    assert client.post("/api/events", json={"name": "go", "id": "e1"}, headers=as_viewer).status_code == 403
    assert client.get("/api/events", headers=as_viewer).status_code == 200
    assert client.get("/api/events").status_code == 401


def test_events_are_listed_with_their_runs_and_paginated(client: TestClient) -> None:
    client.post("/api/pipelines", json=triggered("ingest", {"event": "go"}), headers=AUTH)
    for i in range(3):
        response = client.post("/api/events", json={"name": "go", "id": f"e{i}"}, headers=AUTH)
        assert response.status_code == 201
    client.post("/api/events", json={"name": "noise", "id": "n1"}, headers=AUTH)

    listed = client.get("/api/events", headers=AUTH).json()
    assert [e["id"] for e in listed["items"]] == ["n1", "e2", "e1", "e0"]
    assert listed["next_cursor"] is None
    assert [r["pipeline_id"] for r in listed["items"][1]["runs"]] == ["ingest"]
    assert listed["items"][0]["runs"] == []

    page = client.get("/api/events?limit=2&name=go", headers=AUTH).json()
    assert [e["id"] for e in page["items"]] == ["e2", "e1"]
    rest = client.get(f"/api/events?limit=2&name=go&cursor={page['next_cursor']}", headers=AUTH).json()
    assert [e["id"] for e in rest["items"]] == ["e0"]
    assert client.get("/api/events?cursor=garbage", headers=AUTH).status_code == 422

    one = client.get("/api/events/e1", headers=AUTH)
    assert one.status_code == 200 and one.json()["id"] == "e1"
    assert client.get("/api/events/missing", headers=AUTH).status_code == 404


def test_a_definition_closing_an_event_cycle_is_refused_naming_it(client: TestClient) -> None:
    created = client.post("/api/pipelines", json=triggered("a", {"event": "b.done"}, emits=["a.done"]), headers=AUTH)
    assert created.status_code == 201, created.text
    refused = client.post("/api/pipelines", json=triggered("b", {"event": "a.done"}, emits=["b.done"]), headers=AUTH)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert "event trigger cycle: a -> b -> a" in error["message"]
    assert error["details"][0]["cycle"] == ["a", "b", "a"]
    assert client.get("/api/pipelines/b", headers=AUTH).status_code == 404  # nothing was saved

    # b without the emit is fine; then adding the emit by update is refused the same way.
    assert client.post("/api/pipelines", json=triggered("b", {"event": "a.done"}), headers=AUTH).status_code == 201
    updated = client.put("/api/pipelines/b", json=triggered("b", {"event": "a.done"}, emits=["b.done"]), headers=AUTH)
    assert updated.status_code == 422
    assert "a -> b -> a" in updated.json()["error"]["message"]
    assert client.get("/api/pipelines/b", headers=AUTH).json()["version"] == 1
