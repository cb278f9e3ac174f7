"""One rule for data-version names at every entry point: a bad name is a 422 naming the value and
its path, never a 500, and nothing (run, task, orchestration, backfill, event, pipeline) is stored."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.engine.service import Engine

from .conftest import WORKSPACE

AUTH = {"x-api-key": "acme-admin-key"}

# (versions, the path the answer must name, a fragment of the offending value as the answer shows it)
BAD_VERSIONS: list[tuple[list[Any], str, str]] = [
    (["*"], "versions[0]", "'*'"),                 # a wildcard inside an STS policy resource
    (["a/b"], "versions[0]", "'a/b'"),             # a path segment more
    ([".."], "versions[0]", "'..'"),               # a relative path segment
    (["."], "versions[0]", "'.'"),
    (["v1\n"], "versions[0]", "'v1\\n'"),          # `re.match` with `$` took the trailing newline
    ([".hidden"], "versions[0]", "'.hidden'"),
    (["ok", "a b"], "versions[1]", "'a b'"),
    (["x", "x"], "versions[1]", "'x'"),            # used to be a 500 (unique violation on tasks)
    (["x" * 129], "versions[0]", "'xxxx"),
    ([], "versions", "at least one version"),
]
IDS = [repr(v)[:20] for v, _, _ in BAD_VERSIONS]


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def stored(engine: Engine) -> dict[str, int]:
    with engine.db.connection() as conn:
        return {
            table: conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]  # type: ignore[index]
            for table in ("runs", "tasks", "orchestrations", "backfills", "events", "pipelines")
        }


def assert_refused(response: Any, path: str, fragment: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert path in error["message"] and fragment in error["message"], error["message"]
    assert any(d["path"] == path and fragment in d["message"] for d in error["details"]), error["details"]


@pytest.fixture
def pipelines(engine: Engine) -> dict[str, int]:
    engine.create_pipeline(WORKSPACE, {"id": "up", "nodes": [{"id": "a", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "down", "depends": [{"pipeline": "up"}],
                                       "nodes": [{"id": "b", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "hourly", "schedule": "0 * * * *", "nodes": [{"id": "c", "task": "echo"}]})
    return stored(engine)


@pytest.mark.parametrize(("versions", "path", "fragment"), BAD_VERSIONS, ids=IDS)
def test_trigger_refuses_bad_versions(client: TestClient, engine: Engine, pipelines: dict[str, int],
                                      versions: list[Any], path: str, fragment: str) -> None:
    for include in ("none", "downstream"):
        response = client.post("/api/pipelines/up/runs", json={"versions": versions, "include": include}, headers=AUTH)
        assert_refused(response, path, fragment)
    assert stored(engine) == pipelines


@pytest.mark.parametrize(("versions", "path", "fragment"), BAD_VERSIONS, ids=IDS)
def test_orchestration_refuses_bad_versions(client: TestClient, engine: Engine, pipelines: dict[str, int],
                                            versions: list[Any], path: str, fragment: str) -> None:
    response = client.post("/api/orchestrations", json={"pipelines": ["up", "down"], "versions": versions},
                           headers={**AUTH, "Idempotency-Key": "k1"})
    assert_refused(response, path, fragment)
    assert stored(engine) == pipelines


@pytest.mark.parametrize(("versions", "path", "fragment"), [b for b in BAD_VERSIONS if b[0]], ids=IDS[:-1])
def test_backfill_refuses_bad_versions(client: TestClient, engine: Engine, pipelines: dict[str, int],
                                       versions: list[Any], path: str, fragment: str) -> None:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    body = {"start": (now - timedelta(hours=4)).isoformat(), "end": (now - timedelta(hours=1)).isoformat(),
            "versions": versions}
    for dry_run in (True, False):
        response = client.post("/api/pipelines/hourly/backfill", json={**body, "dry_run": dry_run}, headers=AUTH)
        assert_refused(response, path, fragment)
    assert stored(engine) == pipelines


@pytest.mark.parametrize(("versions", "path", "fragment"), BAD_VERSIONS, ids=IDS)
def test_definitions_refuse_bad_versions(client: TestClient, engine: Engine, pipelines: dict[str, int],
                                         versions: list[Any], path: str, fragment: str) -> None:
    definition = {"id": "made", "versions": versions, "nodes": [{"id": "a", "task": "echo"}]}
    response = client.post("/api/pipelines", json=definition, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error["message"]
    # An item is located at its index; a repeat or an empty list at the list (the message names the index).
    assert any(d["path"] in (path, "versions") for d in error["details"]), error["details"]
    assert path in error["message"] or any(d["path"] == path for d in error["details"])
    assert client.put("/api/pipelines/up", json={**definition, "id": "up"}, headers=AUTH).status_code == 422
    assert client.post("/api/pipelines/validate", json=definition, headers=AUTH).json()["valid"] is False
    assert stored(engine) == pipelines


@pytest.mark.parametrize(("versions", "path", "fragment"), BAD_VERSIONS, ids=IDS)
def test_event_started_runs_never_carry_bad_versions(client: TestClient, engine: Engine, pipelines: dict[str, int],
                                                     versions: list[Any], path: str, fragment: str) -> None:
    """An event starts runs with the versions of the pipeline definitions it triggers: a definition
    with a bad name is refused when saved, so the event starts nothing; an event carries no versions."""
    definition = {"id": "on-event", "versions": versions, "triggers": [{"event": "data.arrived"}],
                  "nodes": [{"id": "a", "task": "echo"}]}
    response = client.post("/api/pipelines", json=definition, headers=AUTH)
    assert response.status_code == 422 and fragment in response.json()["error"]["message"], response.text
    with_versions = client.post("/api/events", json={"name": "data.arrived", "id": "e0", "versions": versions},
                                headers=AUTH)
    assert with_versions.status_code == 422 and "versions" in with_versions.json()["error"]["message"]
    assert stored(engine) == pipelines
    posted = client.post("/api/events", json={"name": "data.arrived", "id": "e1"}, headers=AUTH)
    assert posted.status_code == 201 and posted.json()["runs"] == [], posted.text
    assert stored(engine) == {**pipelines, "events": 1}


def test_good_names_still_run_everywhere(client: TestClient, engine: Engine, pipelines: dict[str, int]) -> None:
    good = ["15.1.0", "2024-01-01", "a:b_c-d.e", "X" * 128]
    response = client.post("/api/pipelines/up/runs", json={"versions": good}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["versions"] == good
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    backfill = client.post("/api/pipelines/hourly/backfill", headers=AUTH, json={
        "start": (now - timedelta(hours=2)).isoformat(), "end": (now - timedelta(hours=1)).isoformat(),
        "versions": good})
    assert backfill.status_code == 201, backfill.text
    assert client.post("/api/pipelines", json={"id": "made", "versions": good, "nodes": [{"id": "a", "task": "echo"}]},
                       headers=AUTH).status_code == 201
