"""Backfills over HTTP: one run per past slot, skipping what already ran, throttled, cancellable."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.scheduling import fire_due_schedules, start_queued
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE
from .test_reliability import FlakyTransport, claim, finish, no_grant
from .test_scheduling import set_clock

AUTH = {"Authorization": "Bearer acme-admin-key"}
def finish_run(engine: Engine, run_id: Any) -> None:
    for task in claim(engine):
        if str(task["run_id"]) == str(run_id):
            finish(engine, task)


HOURLY = {"id": "hourly", "schedule": "0 * * * *", "nodes": [{"id": "a", "task": "echo"}]}


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    # dispatches are accepted and left for the tests to finish, as a worker that never calls back
    engine.transports["local"] = FlakyTransport(failures=0)
    engine.dispatcher._issue_grant = no_grant
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def at(hour: int, day: int = 1) -> str:
    return datetime(2026, 1, day, hour, tzinfo=UTC).isoformat()


def backfill(client: TestClient, **body: Any) -> Any:
    return client.post("/api/pipelines/hourly/backfill", json={"start": at(0), "end": at(5), **body}, headers=AUTH)


def slot_runs(engine: Engine) -> list[tuple[int, str]]:
    rows = engine.list_runs(WORKSPACE, pipeline_id="hourly", limit=500)
    return sorted((r["scheduled_at"].hour, r["status"]) for r in rows)


@pytest.fixture
def scheduled(engine: Engine) -> None:
    """`hourly` created before the range, with 02:00 fired (and succeeded) and 03:00 fired (and failed)."""
    set_clock(engine, datetime(2025, 12, 31, 23, 30, tzinfo=UTC))
    engine.create_pipeline(WORKSPACE, HOURLY)
    for hour in (2, 3):
        set_clock(engine, datetime(2026, 1, 1, hour, 0, 10, tzinfo=UTC))
        summary = fire_due_schedules(engine.db, engine.settings, 10)
        (run_id,) = summary.run_ids
        if hour == 2:
            finish_run(engine, run_id)
        else:
            engine.cancel_run(WORKSPACE, run_id, actor="test")  # not a success: a failed-like outcome
    set_clock(engine, datetime(2026, 1, 2, 12, tzinfo=UTC))


def test_dry_run_lists_the_slots_and_what_would_be_skipped(client: TestClient, engine: Engine, scheduled: None) -> None:
    response = backfill(client, dry_run=True)
    assert response.status_code == 200
    plan = [(s["slot"][11:16], s["action"], s["reason"]) for s in response.json()["slots"]]
    assert plan == [("00:00", "run", None), ("01:00", "run", None), ("02:00", "skip", "already succeeded"),
                    ("03:00", "skip", "already ran (reprocess: failed or all reruns it)"),
                    ("04:00", "run", None), ("05:00", "run", None)]
    assert len(slot_runs(engine)) == 2  # nothing created


@pytest.mark.parametrize(("reprocess", "new_hours"), [
    ("none", [0, 1, 4, 5]), ("failed", [0, 1, 3, 4, 5]), ("all", [0, 1, 2, 3, 4, 5])])
def test_backfill_creates_a_run_per_slot_and_skips_what_ran(client: TestClient, engine: Engine, scheduled: None,
                                                            reprocess: str, new_hours: list[int]) -> None:
    response = backfill(client, reprocess=reprocess)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["runs"] == len(new_hours)
    detail = client.get(f"/api/backfills/{body['id']}", headers=AUTH).json()
    assert [r["scheduled_at"][11:13] for r in detail["runs"]] == [f"{h:02d}" for h in new_hours]
    run = engine.get_run(WORKSPACE, detail["runs"][0]["id"])[0]
    assert run["trigger"] == "schedule" and str(run["backfill_id"]) == body["id"]
    assert run["scheduled_at"] == datetime(2026, 1, 1, new_hours[0], tzinfo=UTC)


def test_max_active_runs_throttles_and_cancel_stops_the_whole_backfill(client: TestClient, engine: Engine,
                                                                        scheduled: None) -> None:
    body = backfill(client, max_active_runs=2).json()
    statuses = Counter(r["status"] for r in client.get(f"/api/backfills/{body['id']}", headers=AUTH).json()["runs"])
    assert statuses == {"running": 2, "pending": 2}
    first = client.get(f"/api/backfills/{body['id']}", headers=AUTH).json()["runs"][0]
    finish_run(engine, first["id"])
    start_queued(engine.db, 10)
    statuses = Counter(r["status"] for r in client.get(f"/api/backfills/{body['id']}", headers=AUTH).json()["runs"])
    assert statuses == {"succeeded": 1, "running": 2, "pending": 1}

    cancelled = client.post(f"/api/backfills/{body['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["cancelled_runs"] == 3
    detail = client.get(f"/api/backfills/{body['id']}", headers=AUTH).json()
    assert detail["status"] == "cancelled" and detail["runs_by_status"] == {"succeeded": 1, "cancelled": 3}
    assert client.post(f"/api/backfills/{body['id']}/cancel", headers=AUTH).status_code == 409


def test_bad_backfills(client: TestClient, engine: Engine, scheduled: None) -> None:
    assert backfill(client, end=at(0)).status_code == 422  # end not after start
    assert backfill(client, end=at(1, day=9)).status_code == 422  # in the future
    assert backfill(client, start="2026-01-01T00:00:00").status_code == 422  # no timezone
    assert backfill(client, start=at(0, day=1).replace("2026", "2020")).status_code == 422  # > 1000 slots
    assert backfill(client, reprocess="some").status_code == 422
    engine.create_pipeline(WORKSPACE, {"id": "manual", "nodes": [{"id": "a", "task": "echo"}]})
    unscheduled = client.post("/api/pipelines/manual/backfill", json={"start": at(0), "end": at(5)}, headers=AUTH)
    assert unscheduled.status_code == 422 and "no schedule" in unscheduled.json()["error"]["message"]
    assert client.post("/api/pipelines/nope/backfill", json={"start": at(0), "end": at(5)}, headers=AUTH).status_code == 404
    assert client.get("/api/backfills/00000000-0000-0000-0000-000000000000", headers=AUTH).status_code == 404
    assert len(slot_runs(engine)) == 2  # nothing half-written
