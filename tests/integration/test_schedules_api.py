"""Schedules over HTTP: listing with next fire times, pause/resume, and bad schedule input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .test_scheduling import set_clock

KEY = "acme-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def scheduled(pid: str = "nightly", **options: Any) -> dict[str, Any]:
    return {"id": pid, "schedule": ["0 3 * * *", "0 15 * * 1"],
            "schedule_options": {"timezone": "Europe/Berlin", **options},
            "nodes": [{"id": "a", "task": "echo"}]}


def test_schedules_and_pipelines_show_next_fire_times(client: TestClient, engine: Engine) -> None:
    from datetime import UTC, datetime

    set_clock(engine, datetime(2026, 1, 5, 0, 0, 30, tzinfo=UTC))  # Monday, winter (UTC+1)
    created = client.post("/api/pipelines", json=scheduled(), headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["next_fire_times"][:3] == [
        "2026-01-05T02:00:00Z", "2026-01-05T14:00:00Z", "2026-01-06T02:00:00Z"]

    items = client.get("/api/schedules", headers=AUTH).json()["items"]
    assert [(s["pipeline"], s["cron"], s["timezone"], s["state"]) for s in items] == [
        ("nightly", "0 3 * * *", "Europe/Berlin", "active"), ("nightly", "0 15 * * 1", "Europe/Berlin", "active")]
    assert len(items[0]["next_fire_times"]) == 5 and items[0]["last_fired_slot"] is None
    assert items[1]["next_fire_times"][:2] == ["2026-01-05T14:00:00Z", "2026-01-12T14:00:00Z"]

    listed = client.get("/api/pipelines", headers=AUTH).json()["items"]
    assert listed[0]["next_fire_times"][0] == "2026-01-05T02:00:00Z"


def test_pause_and_resume_over_http(client: TestClient, engine: Engine) -> None:
    client.post("/api/pipelines", json=scheduled(), headers=AUTH)
    paused = client.post("/api/pipelines/nightly/pause", headers=AUTH)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert paused.json()["next_fire_times"] == []
    assert {s["state"] for s in client.get("/api/schedules", headers=AUTH).json()["items"]} == {"paused"}
    resumed = client.post("/api/pipelines/nightly/resume", headers=AUTH)
    assert resumed.json()["paused"] is False and len(resumed.json()["next_fire_times"]) == 5
    assert client.post("/api/pipelines/nope/pause", headers=AUTH).status_code == 404
    viewer, _ = engine.create_api_key("acme", "viewer")
    assert client.post("/api/pipelines/nightly/pause", headers={"x-api-key": viewer}).status_code == 403


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"schedule": "61 * * * *"}, "schedule", "61 * * * *"),
    ({"schedule": ["0 3 * * *", "not a cron"]}, "schedule", "not a cron"),
    ({"schedule_options": {"timezone": "Mars/Olympus"}}, "schedule_options.timezone", "Mars/Olympus"),
    ({"schedule_options": {"start_at": "2026-02-01T00:00:00Z", "end_at": "2026-01-01T00:00:00Z"}},
     "schedule_options.end_at", "end_at"),
    ({"schedule_options": {"catchup": "sometimes"}}, "schedule_options.catchup", "catchup"),
])
def test_bad_schedules_are_422_naming_the_field(client: TestClient, engine: Engine, change: dict[str, Any],
                                                 path: str, words: str) -> None:
    body = {**scheduled(), **change}
    response = client.post("/api/pipelines", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(d["path"].startswith(path) for d in error["details"]), error
    assert words in error["message"] or any(words in d["message"] or words in d["path"] for d in error["details"])
    assert engine.list_pipelines("acme") == [] and engine.list_schedules("acme") == []
