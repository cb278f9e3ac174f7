"""Pipelines depending on pipelines, end to end through the real app, worker and moto S3:
orchestrations in topological order, later triggers, hydration, versions, schema-checked
persisted outputs and lineage."""

from __future__ import annotations

import json
from typing import Any

import yaml

from orchestrator.storage.s3 import orchestrator_s3

from .conftest import Stack, wait_until

FETCH = """
id: fetch
versions: [v1]
nodes:
  - {id: get, task: echo, params: {n: 1}}
outputs:
  archive: {from: get, schema: {type: object, required: [params, version]}}
"""

PARSE = """
id: parse
depends:
  - {pipeline: fetch, outputs: [archive]}
nodes:
  - {id: read, task: echo}
outputs:
  table: {from: read}
"""


def put(stack: Stack, text: str) -> dict[str, Any]:
    definition = yaml.safe_load(text)
    response = stack.client.post("/api/pipelines", json=definition)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def runs_of(stack: Stack, pipeline: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = stack.client.get("/api/runs", params={"pipeline": pipeline}).json()["items"]
    return items


def run(stack: Stack, run_id: str) -> dict[str, Any]:
    body: dict[str, Any] = stack.client.get(f"/api/runs/{run_id}").json()
    return body


def node_value(stack: Stack, task: dict[str, Any]) -> Any:
    body = orchestrator_s3(stack.settings).get_object(Bucket=stack.settings.bucket, Key=task["output"]["key"])
    return json.loads(body["Body"].read())


def only_task(run_body: dict[str, Any], node: str, version: str = "v1") -> dict[str, Any]:
    (task,) = [t for t in run_body["tasks"] if t["node"] == node and t["version"] == version]
    return task


def test_orchestration_runs_upstream_first_and_the_downstream_reads_its_output(stack: Stack) -> None:
    put(stack, FETCH)
    put(stack, PARSE)
    triggered = stack.client.post("/api/pipelines/parse/runs", json={"include": "upstream", "versions": ["v1", "v2"]})
    assert triggered.status_code == 201, triggered.text
    body = triggered.json()
    orchestration = body["orchestration"]
    assert [r["pipeline_id"] for r in orchestration["runs"]] == ["fetch", "parse"]
    assert body["pipeline_id"] == "parse" and body["status"] == "pending"  # waits for fetch
    fetch_id = next(r["id"] for r in orchestration["runs"] if r["pipeline_id"] == "fetch")

    parse_run = stack.wait_for_run(body["id"])
    fetch_run = run(stack, fetch_id)
    assert fetch_run["status"] == parse_run["status"] == "succeeded"
    assert fetch_run["versions"] == parse_run["versions"] == ["v1", "v2"]  # versions propagate
    # topological order (a task is claimed in a transaction begun after its run was released)
    assert min(t["dispatched_at"] for t in parse_run["tasks"]) >= fetch_run["finished_at"]
    assert parse_run["orchestration_id"] == fetch_run["orchestration_id"] == orchestration["id"]

    for version in ("v1", "v2"):
        read = node_value(stack, only_task(parse_run, "read", version))
        upstream = read["inputs"]["fetch/archive"]  # what ctx.upstream returned, for this version
        assert upstream == node_value(stack, only_task(fetch_run, "get", version))
        assert upstream["version"] == version
        assert set(read["inputs"]) == {"fetch/archive"}  # no raw task results of the upstream run

    # lineage both ways; the outputs were persisted and indexed
    assert {(u["pipeline_id"], u["output"], u["version"], u["run_id"], u["mode"]) for u in parse_run["lineage"]["upstream"]} == {
        ("fetch", "archive", "v1", fetch_id, "orchestration"), ("fetch", "archive", "v2", fetch_id, "orchestration")}
    assert [(d["run_id"], d["relation"]) for d in fetch_run["lineage"]["downstream"]] == [(parse_run["id"], "orchestration")]
    assert sorted((o["output"], o["version"]) for o in fetch_run["outputs"]) == [("archive", "v1"), ("archive", "v2")]
    listed = stack.client.get("/api/outputs", params={"pipeline": "fetch", "version": "v2", "output": "archive"}).json()["items"]
    assert [(o["run_id"], o["version"]) for o in listed] == [(fetch_id, "v2")]
    content = stack.client.get(f"/api/outputs/{listed[0]['id']}/content")
    assert content.status_code == 200 and content.json() == node_value(stack, only_task(fetch_run, "get", "v2"))
    key = f"outputs/e2e/fetch/{fetch_id}/v2/archive/attempts/1.json"  # by the attempt that produced it
    stored = orchestrator_s3(stack.settings).get_object(Bucket=stack.settings.bucket, Key=key)["Body"].read()
    assert json.loads(stored) == content.json() and listed[0]["size"] == len(stored)
    assert listed[0]["schema_sha256"] and len(listed[0]["sha256"]) == 64

    # fetch's success did not also trigger parse later: parse was in the orchestration
    assert len(runs_of(stack, "parse")) == 1


def test_a_later_trigger_runs_the_dependant_with_the_same_versions_and_hydrated_inputs(stack: Stack) -> None:
    put(stack, FETCH)
    put(stack, PARSE)
    fetch = stack.client.post("/api/pipelines/fetch/runs", json={"versions": ["v7"]}).json()
    stack.wait_for_run(fetch["id"])

    parse_runs = wait_until(lambda: runs_of(stack, "parse"), 30, "parse was not triggered")
    assert len(parse_runs) == 1
    parse_run = stack.wait_for_run(parse_runs[0]["id"])
    assert parse_run["status"] == "succeeded"
    assert parse_run["trigger"] == "pipeline"
    assert parse_run["trigger_source_execution_id"] == fetch["id"]
    assert parse_run["trigger_source_pipeline_id"] == "fetch"
    assert parse_run["versions"] == ["v7"]
    assert [(u["run_id"], u["mode"]) for u in parse_run["lineage"]["upstream"]] == [(fetch["id"], "hydrated")]
    downstream = run(stack, fetch["id"])["lineage"]["downstream"]
    assert [(d["run_id"], d["relation"], d["trigger"]) for d in downstream] == [(parse_run["id"], "triggered", "pipeline")]
    read = node_value(stack, only_task(parse_run, "read", "v7"))
    assert read["inputs"]["fetch/archive"]["version"] == "v7"


def test_a_run_with_a_missing_upstream_output_fails_before_any_task_starts(stack: Stack) -> None:
    put(stack, FETCH)
    put(stack, PARSE)
    # paused: fetch's run below must not trigger parse (the test is about the manual run)
    stack.client.post("/api/pipelines/parse/pause")
    triggered = stack.client.post("/api/pipelines/parse/runs", json={"versions": ["v1"]})
    assert triggered.status_code == 201
    body = triggered.json()
    assert body["status"] == "failed"
    assert body["error"] == (
        "upstream output missing, no succeeded execution has it: pipeline 'fetch' output 'archive' version 'v1'"
    )
    assert {t["status"] for t in body["tasks"]} == {"skipped"} and all(t["attempt"] == 0 for t in body["tasks"])

    # once fetch has produced v1, a hand-started run hydrates from the latest succeeded execution
    first = stack.wait_for_run(stack.client.post("/api/pipelines/fetch/runs", json={"versions": ["v1"]}).json()["id"])
    second = stack.wait_for_run(stack.client.post("/api/pipelines/fetch/runs", json={"versions": ["v1"]}).json()["id"])
    assert first["status"] == second["status"] == "succeeded"
    again = stack.wait_for_run(stack.client.post("/api/pipelines/parse/runs", json={"versions": ["v1"]}).json()["id"])
    assert again["status"] == "succeeded"
    assert [(u["run_id"], u["mode"]) for u in again["lineage"]["upstream"]] == [(second["id"], "hydrated")]
    # still a missing version is named
    other = stack.client.post("/api/pipelines/parse/runs", json={"versions": ["v1", "v9"]}).json()
    assert other["status"] == "failed" and "version 'v9'" in other["error"] and "version 'v1'" not in other["error"]


def test_a_scheduled_run_hydrates_its_upstream_outputs(stack: Stack) -> None:
    put(stack, FETCH)
    put(stack, PARSE.replace("id: parse", "id: parse\nschedule: '0 3 * * *'\nversions: [v1]"))
    stack.client.post("/api/pipelines/parse/pause")  # no later trigger: only the scheduled run
    fetched = stack.wait_for_run(stack.client.post("/api/pipelines/fetch/runs", json={}).json()["id"])
    stack.client.post("/api/pipelines/parse/resume")
    backfill = stack.client.post(
        "/api/pipelines/parse/backfill", json={"start": "2026-11-01T00:00:00Z", "end": "2026-11-01T12:00:00Z"}
    )
    assert backfill.status_code == 201, backfill.text
    (slot_run,) = [r for r in runs_of(stack, "parse") if r["trigger"] == "schedule"]
    done = stack.wait_for_run(slot_run["id"])
    assert done["status"] == "succeeded" and done["scheduled_at"].startswith("2026-11-01T03:00")
    assert [(u["run_id"], u["mode"]) for u in done["lineage"]["upstream"]] == [(fetched["id"], "hydrated")]


def test_three_in_a_row_downstream_closure(stack: Stack) -> None:
    put(stack, "id: a\nnodes: [{id: n, task: echo}]\noutputs: {out: {from: n}}")
    put(stack, "id: b\ndepends: [{pipeline: a, outputs: [out]}]\nnodes: [{id: n, task: echo}]\noutputs: {out: {from: n}}")
    put(stack, "id: c\ndepends: [{pipeline: b, outputs: [out]}]\nnodes: [{id: n, task: echo}]")
    body = stack.client.post("/api/pipelines/a/runs", json={"include": "downstream"}).json()
    runs = {r["pipeline_id"]: r["id"] for r in body["orchestration"]["runs"]}
    assert list(runs) == ["a", "b", "c"]
    done = {p: stack.wait_for_run(i) for p, i in runs.items()}
    assert all(r["status"] == "succeeded" for r in done.values())
    first_dispatch = {p: min(t["dispatched_at"] for t in r["tasks"]) for p, r in done.items()}
    assert done["a"]["finished_at"] <= first_dispatch["b"] and done["b"]["finished_at"] <= first_dispatch["c"]
    c_read = node_value(stack, only_task(done["c"], "n", "default"))
    b_value = node_value(stack, only_task(done["b"], "n", "default"))
    assert c_read["inputs"] == {"b/out": b_value}
    assert b_value["inputs"]["a/out"] == node_value(stack, only_task(done["a"], "n", "default"))
    # inside one orchestration nothing was triggered twice
    assert [len(runs_of(stack, p)) for p in "abc"] == [1, 1, 1]


def test_diamond_orchestration_joins_once_with_both_upstreams(stack: Stack) -> None:
    put(stack, "id: top\nnodes: [{id: n, task: echo}]\noutputs: {out: {from: n}}")
    for side in ("left", "right"):
        put(stack, f"id: {side}\ndepends: [{{pipeline: top, outputs: [out]}}]\nnodes: [{{id: n, task: echo}}]\n"
                   "outputs: {out: {from: n}}")
    put(stack, "id: bottom\ndepends: [{pipeline: left, outputs: [out]}, {pipeline: right, outputs: [out]}]\n"
               "nodes: [{id: n, task: echo}]")
    body = stack.client.post("/api/orchestrations", json={"pipelines": ["bottom", "right", "left", "top"]},
                             headers={"Idempotency-Key": "diamond-1"})
    assert body.status_code == 201, body.text
    orchestration = body.json()
    assert orchestration["pipelines"] == ["top", "left", "right", "bottom"]
    again = stack.client.post("/api/orchestrations", json={"pipelines": ["bottom", "right", "left", "top"]},
                              headers={"Idempotency-Key": "diamond-1"})
    assert again.status_code == 200 and again.json()["id"] == orchestration["id"]
    runs = {r["pipeline_id"]: r["id"] for r in orchestration["runs"]}
    done = {p: stack.wait_for_run(i) for p, i in runs.items()}
    assert all(r["status"] == "succeeded" and r["trigger"] == "api" for r in done.values())
    bottom_dispatch = min(t["dispatched_at"] for t in done["bottom"]["tasks"])
    assert bottom_dispatch >= max(done["left"]["finished_at"], done["right"]["finished_at"])
    read = node_value(stack, only_task(done["bottom"], "n", "default"))
    assert set(read["inputs"]) == {"left/out", "right/out"}
    assert {(u["pipeline_id"], u["run_id"]) for u in done["bottom"]["lineage"]["upstream"]} == {
        ("left", runs["left"]), ("right", runs["right"])}
    assert len(runs_of(stack, "bottom")) == 1


def test_an_upstream_failure_fails_its_orchestration_dependants_without_running_them(stack: Stack) -> None:
    put(stack, "id: up\nnodes: [{id: n, task: fail, params: {retryable: false}}]\noutputs: {out: {from: n}}")
    put(stack, "id: down\ndepends: [{pipeline: up, outputs: [out]}]\nnodes: [{id: n, task: echo}]")
    body = stack.client.post("/api/pipelines/down/runs", json={"include": "upstream"}).json()
    down = stack.wait_for_run(body["id"])
    up_id = next(r["id"] for r in body["orchestration"]["runs"] if r["pipeline_id"] == "up")
    assert run(stack, up_id)["status"] == "failed"
    assert down["status"] == "failed" and down["error"] == f"upstream run {up_id} of pipeline 'up' did not succeed"
    assert [t["status"] for t in down["tasks"]] == ["skipped"]


def test_an_output_that_breaks_its_schema_fails_the_run_with_the_schema_error(stack: Stack) -> None:
    put(stack, "id: bad\nnodes: [{id: n, task: echo}]\noutputs: {report: {from: n, schema: {type: object, required: [rows]}}}")
    done = stack.wait_for_run(stack.client.post("/api/pipelines/bad/runs", json={}).json()["id"])
    assert done["status"] == "failed"
    task = only_task(done, "n", "default")
    assert task["status"] == "failed" and task["dead_lettered"] is True
    assert task["error"]["code"] == "output_schema_invalid"
    assert task["error"]["message"] == "output 'report' does not match its schema: 'rows' is a required property"
    assert done["outputs"] == []
    assert stack.client.get("/api/outputs", params={"pipeline": "bad"}).json()["items"] == []


def test_on_complete_dependants_follow_failures_and_data_only_ones_never_trigger(stack: Stack) -> None:
    put(stack, "id: flaky\nnodes: [{id: n, task: fail, params: {retryable: false}}]")
    put(stack, "id: cleanup\ndepends: [{pipeline: flaky, trigger: on_complete}]\nnodes: [{id: n, task: echo}]")
    put(stack, "id: audit\ndepends: [{pipeline: flaky, trigger: none}]\nnodes: [{id: n, task: echo}]")
    failed = stack.wait_for_run(stack.client.post("/api/pipelines/flaky/runs", json={}).json()["id"])
    assert failed["status"] == "failed"
    (cleanup,) = wait_until(lambda: runs_of(stack, "cleanup"), 30, "cleanup was not triggered")
    assert stack.wait_for_run(cleanup["id"])["trigger_source_execution_id"] == failed["id"]
    stack.client.post("/api/tick", headers={"x-tick-secret": stack.settings.tick_secret})
    assert runs_of(stack, "audit") == []
