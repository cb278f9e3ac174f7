"""End to end over HTTP: definitions in, runs executed by the real worker, outputs in S3."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from orchestrator.storage.s3 import orchestrator_s3

from .conftest import Stack

DIAMOND = """
id: diamond
params: {greeting: hi}
nodes:
  - {id: a, task: echo, params: {n: 1}}
  - {id: b, task: echo, depends: [a]}
  - {id: c, task: echo, depends: [a]}
  - {id: d, task: echo, depends: [b, c]}
"""


def s3_json(stack: Stack, key: str) -> tuple[Any, bytes]:
    body = orchestrator_s3(stack.settings).get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read()
    return json.loads(body), body


def test_diamond_succeeds_join_runs_once_and_outputs_are_in_s3(stack: Stack) -> None:
    created = stack.client.post("/api/pipelines", content=DIAMOND, headers={"Content-Type": "application/yaml"})
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1

    triggered = stack.client.post("/api/pipelines/diamond/runs", json={"params": {"who": "e2e"}})
    assert triggered.status_code == 201, triggered.text
    run = stack.wait_for_run(triggered.json()["id"])

    assert run["status"] == "succeeded"
    tasks = {t["node"]: t for t in run["tasks"]}
    assert {n: t["status"] for n, t in tasks.items()} == dict.fromkeys("abcd", "succeeded")
    assert all(t["attempt"] == 1 for t in tasks.values())  # the join (and every node) ran once
    assert tasks["d"]["depends"] == ["b", "c"]
    assert tasks["d"]["started_at"] >= max(tasks["b"]["finished_at"], tasks["c"]["finished_at"])

    d_value, d_body = s3_json(stack, tasks["d"]["output"]["key"])
    assert tasks["d"]["output"]["key"] == f"runs/e2e/diamond/{run['id']}/default/nodes/d/attempts/1/output.json"
    assert tasks["d"]["output"]["sha256"] == hashlib.sha256(d_body).hexdigest()
    assert tasks["d"]["output"]["size"] == len(d_body)
    assert d_value["params"] == {"greeting": "hi", "who": "e2e"}
    assert set(d_value["inputs"]) == {"b", "c"}
    assert d_value["inputs"]["b"]["inputs"]["a"]["params"] == {"greeting": "hi", "n": 1, "who": "e2e"}

    runs = stack.client.get("/api/runs", params={"pipeline": "diamond"}).json()["items"]
    assert [r["id"] for r in runs] == [run["id"]]
    pipeline = stack.client.get("/api/pipelines/diamond").json()
    assert pipeline["stats"]["use_count"] == 1 and pipeline["stats"]["runs_by_status"] == {"succeeded": 1}


def _sequence(on_failure: str) -> dict[str, Any]:
    return {
        "id": f"seq-{on_failure}",
        "steps": [
            {"id": "first", "task": "echo"},
            {"id": "broken", "task": "fail", "params": {"times": 5, "retryable": False}, "on_failure": on_failure},
            {"id": "last", "task": "echo"},
        ],
    }


def test_continue_failure_lets_the_sequence_complete(stack: Stack) -> None:
    assert stack.client.post("/api/pipelines", json=_sequence("continue")).status_code == 201
    run_id = stack.client.post("/api/pipelines/seq-continue/runs").json()["id"]
    run = stack.wait_for_run(run_id)
    statuses = {t["node"]: t["status"] for t in run["tasks"]}
    assert statuses == {"first": "succeeded", "broken": "failed", "last": "succeeded"}
    assert run["status"] == "succeeded"
    broken = next(t for t in run["tasks"] if t["node"] == "broken")
    assert broken["error"]["code"] == "task_failed" and broken["error"]["retryable"] is False


def test_stop_failure_fails_the_run_and_later_steps_never_run(stack: Stack) -> None:
    assert stack.client.post("/api/pipelines", json=_sequence("stop")).status_code == 201
    run_id = stack.client.post("/api/pipelines/seq-stop/runs").json()["id"]
    run = stack.wait_for_run(run_id)
    statuses = {t["node"]: t["status"] for t in run["tasks"]}
    assert statuses == {"first": "succeeded", "broken": "failed", "last": "skipped"}
    assert run["status"] == "failed"
    last = next(t for t in run["tasks"] if t["node"] == "last")
    assert last["attempt"] == 0 and last["output"] is None
    listing = orchestrator_s3(stack.settings).list_objects_v2(
        Bucket=stack.settings.bucket, Prefix=f"runs/e2e/seq-stop/{run_id}/")
    stored = [o["Key"] for o in listing.get("Contents", [])]
    # runs/ws/p/run/v/nodes/N/attempts/n/...: only "first" wrote an output, "broken" left its log,
    # "last" never ran and wrote nothing
    assert sorted(k.split("/")[6] for k in stored if k.endswith("/output.json")) == ["first"]
    assert sorted({k.split("/")[6] for k in stored}) == ["broken", "first"]


def test_retries_until_the_flaky_task_succeeds(stack: Stack) -> None:
    definition = {"id": "flaky", "nodes": [{"id": "x", "task": "fail", "params": {"times": 2},
                                            "retry": {"max_attempts": 3, "backoff": "fixed", "base_delay_s": 0}}]}
    assert stack.client.post("/api/pipelines", json=definition).status_code == 201
    run = stack.wait_for_run(stack.client.post("/api/pipelines/flaky/runs").json()["id"])
    assert run["status"] == "succeeded"
    (task,) = run["tasks"]
    assert task["attempt"] == 3
    detail = stack.client.get(f"/api/tasks/{task['id']}").json()
    assert [a["status"] for a in detail["attempts"]] == ["failed", "failed", "succeeded"]
    value, _ = s3_json(stack, task["output"]["key"])
    assert value == {"attempts": 3}


def test_yaml_and_json_definitions_are_equivalent(stack: Stack) -> None:
    as_yaml = stack.client.post("/api/pipelines", content=DIAMOND, headers={"Content-Type": "application/yaml"})
    as_json = stack.client.put("/api/pipelines/diamond", json=yaml.safe_load(DIAMOND))
    assert as_json.status_code == 200
    assert as_json.json()["changed"] is False and as_json.json()["sha256"] == as_yaml.json()["sha256"]


def test_a_schedule_fires_through_the_http_tick_and_runs_on_the_worker(stack: Stack) -> None:
    from datetime import UTC, datetime

    import psycopg

    def set_clock(instant: datetime) -> None:
        with psycopg.connect(stack.settings.database_url, autocommit=True) as conn:
            conn.execute("""INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::timestamptz - now())
                            ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """, (instant,))

    set_clock(datetime(2026, 3, 1, 8, 59, 30, tzinfo=UTC))
    definition = {"id": "hourly", "schedule": "0 * * * *", "nodes": [{"id": "x", "task": "echo"}]}
    assert stack.client.post("/api/pipelines", json=definition).status_code == 201
    set_clock(datetime(2026, 3, 1, 9, 0, 5, tzinfo=UTC))
    tick = stack.client.post("/api/tick", headers={"x-tick-secret": stack.settings.tick_secret}).json()
    assert tick["scheduled_runs"] == 1 and tick["claimed"] == 1
    (run,) = stack.client.get("/api/runs", params={"pipeline": "hourly"}).json()["items"]
    assert run["trigger"] == "schedule" and run["scheduled_at"] == "2026-03-01T09:00:00Z"
    assert stack.wait_for_run(run["id"])["status"] == "succeeded"
    again = stack.client.post("/api/tick", headers={"x-tick-secret": stack.settings.tick_secret}).json()
    assert again["scheduled_runs"] == 0
