"""Pipeline-level `depends`: validation across the workspace on save and as a dry run, and the
races of upstream runs completing at once (a dependant starts exactly once)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.errors import InvalidInput
from orchestrator.engine.service import Engine
from orchestrator.storage.layout import node_output_key
from orchestrator.storage.s3 import ensure_bucket, put_json_object
from tests import capturing

WORKSPACE = "acme"
HEADERS = {"x-api-key": "graph-admin-key"}


class CapturingTransport(capturing.CapturingTransport):
    def take(self, run_id: str) -> list[dict[str, Any]]:
        return self.take_run(run_id)


@pytest.fixture
def graph_engine(database_url: str, moto_server: MotoServer) -> Iterator[tuple[Engine, CapturingTransport]]:
    settings = Settings(
        database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url,
        bucket=f"graph-{uuid.uuid4().hex[:10]}",
    )
    ensure_bucket(settings)
    transport = CapturingTransport()
    engine = Engine(settings, Database(database_url, max_size=8), transports={"local": transport})
    engine.create_api_key(WORKSPACE, "admin", raw_key=HEADERS["x-api-key"])
    yield engine, transport
    engine.close()


@pytest.fixture
def client(graph_engine: tuple[Engine, CapturingTransport]) -> Iterator[TestClient]:
    engine, _ = graph_engine
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def producer(pipeline_id: str) -> dict[str, Any]:
    return {"id": pipeline_id, "nodes": [{"id": "n", "task": "echo"}], "outputs": {"out": {"from": "n"}}}


def consumer(pipeline_id: str, *upstreams: str, trigger: str = "on_success") -> dict[str, Any]:
    return {
        "id": pipeline_id, "nodes": [{"id": "n", "task": "echo"}],
        "depends": [{"pipeline": u, "outputs": ["out"], "trigger": trigger} for u in upstreams],
    }


def work_as_worker(engine: Engine, message: dict[str, Any]) -> None:
    """Write the node's output where the token allows and call back, as the SDK does."""
    key = node_output_key(message["workspace"], message["pipeline"], message["run_id"], message["version"],
                          message["node"], message["attempt"])
    size, sha = put_json_object(engine.settings, key, {"from": message["pipeline"]})
    result = engine.record_callback(
        uuid.UUID(message["task_id"]), message["token"], status="succeeded",
        output={"key": key, "size": size, "sha256": sha}, error=None,
    )
    assert result.accepted, result


# --- validation ----------------------------------------------------------------------------


def test_depends_on_a_missing_pipeline_or_output_is_refused_with_its_path(client: TestClient) -> None:
    assert client.post("/api/pipelines", json=producer("up"), headers=HEADERS).status_code == 201
    missing_pipeline = client.post("/api/pipelines", json=consumer("down", "nowhere"), headers=HEADERS)
    assert missing_pipeline.status_code == 422
    assert missing_pipeline.json()["error"]["details"] == [
        {"path": "depends[0].pipeline", "message": "pipeline 'down' depends on 'nowhere', which does not exist"}]
    bad_output = {**consumer("down", "up"), "depends": [{"pipeline": "up", "outputs": ["nope"]}]}
    response = client.post("/api/pipelines", json=bad_output, headers=HEADERS)
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"path": "depends[0].outputs[0]", "message": "pipeline 'up' does not declare an output 'nope' (it declares: out)"}]
    assert client.get("/api/pipelines/down", headers=HEADERS).status_code == 404  # nothing half-written


def test_an_update_closing_a_cycle_or_dropping_a_read_output_is_refused(client: TestClient) -> None:
    for definition in (producer("a"), {**producer("b"), "depends": [{"pipeline": "a", "outputs": ["out"]}]},
                       consumer("c", "b")):
        assert client.post("/api/pipelines", json=definition, headers=HEADERS).status_code == 201
    cyclic = {**producer("a"), "depends": [{"pipeline": "c", "outputs": []}]}
    response = client.put("/api/pipelines/a", json=cyclic, headers=HEADERS)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == [{"path": "depends", "message": "pipeline cycle: a -> c -> b -> a"}]

    dropped = {"id": "b", "nodes": [{"id": "n", "task": "echo"}], "depends": [{"pipeline": "a", "outputs": ["out"]}]}
    response = client.put("/api/pipelines/b", json=dropped, headers=HEADERS)
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"path": "c.depends[0].outputs[0]", "message": "pipeline 'b' does not declare an output 'out' (it declares: none)"}]
    assert client.get("/api/pipelines/a", headers=HEADERS).json()["version"] == 1
    assert client.get("/api/pipelines/b", headers=HEADERS).json()["version"] == 1


def test_outputs_need_a_task_node_and_a_valid_schema(client: TestClient) -> None:
    definition = {
        "id": "odd", "nodes": [{"id": "n", "task": "echo"}, {"id": "gate", "kind": "approval", "depends": ["n"]}],
        "outputs": {"decision": {"from": "gate"}, "bad": {"from": "n", "schema": {"type": "frobnicate"}}},
    }
    response = client.post("/api/pipelines", json=definition, headers=HEADERS)
    assert response.status_code == 422
    paths = {d["path"]: d["message"] for d in response.json()["error"]["details"]}
    assert paths["outputs.decision.from"].startswith("output 'decision' comes from 'gate', a approval step")
    assert paths["outputs.bad.schema"].startswith("not a valid JSON Schema: 'frobnicate' is not valid")


def test_validate_checks_a_set_against_the_workspace_and_stores_nothing(client: TestClient) -> None:
    assert client.post("/api/pipelines", json=producer("up"), headers=HEADERS).status_code == 201
    good = client.post("/api/pipelines/validate", json={"pipelines": [consumer("mid", "up"), consumer("end", "mid")]},
                       headers=HEADERS)
    assert good.status_code == 200
    report = good.json()
    assert report["valid"] is False  # `end` reads `out` of `mid`, which declares none
    assert [(p["id"], p["valid"]) for p in report["pipelines"]] == [("mid", True), ("end", False)]
    assert report["pipelines"][1]["errors"] == [
        {"path": "depends[0].outputs[0]", "message": "pipeline 'mid' does not declare an output 'out' (it declares: none)"}]

    fixed = {**consumer("mid", "up"), "outputs": {"out": {"from": "n"}}}
    assert client.post("/api/pipelines/validate", json=[fixed, consumer("end", "mid")], headers=HEADERS).json()["valid"]

    cyclic = client.post("/api/pipelines/validate", json={"pipelines": [
        {**producer("x"), "depends": [{"pipeline": "y"}]}, {**producer("y"), "depends": [{"pipeline": "x"}]}]},
        headers=HEADERS).json()
    assert cyclic["valid"] is False and cyclic["errors"] == [{"path": "depends", "message": "pipeline cycle: x -> y -> x"}]

    broken = client.post("/api/pipelines/validate", json={"id": "Bad Id", "nodes": []}, headers=HEADERS).json()
    assert broken["valid"] is False and broken["pipelines"][0]["errors"]
    assert [p["id"] for p in client.get("/api/pipelines", headers=HEADERS).json()["items"]] == ["up"]
    assert client.post("/api/pipelines/validate", json={"pipelines": []}, headers=HEADERS).status_code == 422
    assert client.post("/api/pipelines/validate", json={"pipelines": "x", "y": 1}, headers=HEADERS).status_code == 422


def test_orchestration_requests_with_bad_input_are_refused(client: TestClient) -> None:
    assert client.post("/api/pipelines", json=producer("up"), headers=HEADERS).status_code == 201
    unknown = client.post("/api/orchestrations", json={"pipelines": ["up", "ghost"]}, headers=HEADERS)
    assert unknown.status_code == 404 and "'ghost'" in unknown.json()["error"]["message"]
    assert client.post("/api/orchestrations", json={"pipelines": []}, headers=HEADERS).status_code == 422
    assert client.post("/api/orchestrations", json={"pipelines": ["up", "up"]}, headers=HEADERS).status_code == 422
    bad_versions = client.post("/api/orchestrations", json={"pipelines": ["up"], "versions": ["a/b"]}, headers=HEADERS)
    assert bad_versions.status_code == 422
    assert client.post("/api/pipelines/up/runs", json={"include": "sideways"}, headers=HEADERS).status_code == 422
    assert client.get(f"/api/orchestrations/{uuid.uuid4()}", headers=HEADERS).status_code == 404
    assert client.get(f"/api/outputs/{uuid.uuid4()}/content", headers=HEADERS).status_code == 404
    assert client.get("/api/outputs/not-a-uuid", headers=HEADERS).status_code == 404
    assert client.get("/api/runs", headers=HEADERS).json()["items"] == []  # nothing was created


def test_another_workspaces_outputs_and_orchestrations_are_hidden(
    client: TestClient, graph_engine: tuple[Engine, CapturingTransport]
) -> None:
    engine, transport = graph_engine
    engine.create_api_key("other", "admin")
    engine.create_pipeline("other", producer("up"))
    engine.create_pipeline("other", consumer("down", "up"))
    orchestration = engine.trigger_orchestration("other", root="down", include="upstream")
    up_run = next(r for r in orchestration.runs if r["pipeline_id"] == "up")
    (message,) = transport.take(str(up_run["id"]))
    work_as_worker(engine, message)
    (output,) = engine.list_outputs("other")
    for path in (f"/api/orchestrations/{orchestration.id}", f"/api/outputs/{output['id']}",
                 f"/api/outputs/{output['id']}/content"):
        response = client.get(path, headers=HEADERS)
        assert response.status_code == 404, path
    assert client.get("/api/outputs", headers=HEADERS).json()["items"] == []
    with pytest.raises(InvalidInput):  # and B's graph is not A's: A has no `up`
        engine.create_pipeline(WORKSPACE, consumer("down", "up"))


# --- races ---------------------------------------------------------------------------------


def race(*actions: Any) -> None:
    """Run the actions at once from their own threads (own connections), behind a barrier."""
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def go(action: Any) -> None:
        barrier.wait()
        try:
            action()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(a,)) for a in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_two_upstreams_completing_at_once_trigger_their_dependant_once(
    graph_engine: tuple[Engine, CapturingTransport]
) -> None:
    engine, transport = graph_engine
    engine.create_pipeline(WORKSPACE, producer("left"))
    engine.create_pipeline(WORKSPACE, producer("right"))
    engine.create_pipeline(WORKSPACE, consumer("join", "left", "right"))
    for round_number in range(5):
        version = f"r{round_number}"
        left = engine.trigger_run(WORKSPACE, "left", versions=[version])
        right = engine.trigger_run(WORKSPACE, "right", versions=[version])
        (left_message,) = transport.take(str(left.id))
        (right_message,) = transport.take(str(right.id))
        race(lambda m=left_message: work_as_worker(engine, m), lambda m=right_message: work_as_worker(engine, m))
        engine.start_pipeline_triggers()  # whatever the callbacks' eager path left, the tick would take
        joins = [r for r in engine.list_runs(WORKSPACE, pipeline_id="join") if r["versions"] == [version]]
        assert len(joins) == 1, (round_number, joins)
        join_run, _ = engine.get_run(WORKSPACE, joins[0]["id"])
        assert join_run["trigger"] == "pipeline"
        assert join_run["trigger_source_execution_id"] in (left.id, right.id)
        assert {(u["pipeline_id"], u["run_id"]) for u in join_run["lineage"]["upstream"]} == {
            ("left", left.id), ("right", right.id)}
        transport.take(str(join_run["id"]))


def test_two_upstream_runs_of_one_orchestration_release_their_downstream_once(
    graph_engine: tuple[Engine, CapturingTransport]
) -> None:
    engine, transport = graph_engine
    engine.create_pipeline(WORKSPACE, producer("left"))
    engine.create_pipeline(WORKSPACE, producer("right"))
    engine.create_pipeline(WORKSPACE, consumer("join", "left", "right"))
    for round_number in range(5):
        orchestration = engine.trigger_orchestration(
            WORKSPACE, root="join", include="upstream", versions=[f"o{round_number}"])
        runs = {r["pipeline_id"]: r for r in orchestration.runs}
        assert runs["join"]["status"] == "pending" and runs["join"]["blocked_upstreams"] == 2
        (left_message,) = transport.take(str(runs["left"]["id"]))
        (right_message,) = transport.take(str(runs["right"]["id"]))
        race(lambda m=left_message: work_as_worker(engine, m), lambda m=right_message: work_as_worker(engine, m))
        join_run, tasks = engine.get_run(WORKSPACE, runs["join"]["id"])
        assert join_run["status"] == "running" and join_run["blocked_upstreams"] == 0
        assert [t["status"] for t in tasks] in (["ready"], ["dispatched"])
        sent = transport.take(str(join_run["id"]))
        assert len(sent) == 1 and sent[0]["attempt"] == 1  # released and dispatched once
        assert set(sent[0]["upstream"]) == {"left/out", "right/out"}
        assert all(ref["mode"] == "orchestration" for ref in sent[0]["upstream"].values())
    # inside orchestrations, nothing was triggered later on top
    assert len(engine.list_runs(WORKSPACE, pipeline_id="join")) == 5


def test_racing_orchestration_requests_with_one_idempotency_key_create_one(
    graph_engine: tuple[Engine, CapturingTransport]
) -> None:
    engine, _ = graph_engine
    engine.create_pipeline(WORKSPACE, producer("up"))
    engine.create_pipeline(WORKSPACE, consumer("down", "up"))
    results: list[Any] = []

    def post() -> None:
        results.append(engine.trigger_orchestration(
            WORKSPACE, pipeline_ids=["down", "up"], idempotency_key="same", dispatch_now=False))

    race(*[post for _ in range(6)])
    assert len({r.id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert len(engine.list_runs(WORKSPACE)) == 2
