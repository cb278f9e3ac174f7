"""POST /api/callbacks (issue 16): many worker callbacks in one request, each authenticated by its
own token, fenced and answered alone, in the order sent: a bad one (forged, expired, another
task's token, malformed, stale, repeated) refuses itself only. And the worker SDK, which posts
the callbacks of an SQS batch (a Lambda SQS event, the `run_sqs` loop) in one such request,
falling back to single callbacks on an orchestrator without the route.

Real Postgres; the SDK and pipeline-output tests also the moto S3 (and SQS) server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from starlette.responses import JSONResponse
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings, load_settings
from orchestrator.db.connection import Database
from orchestrator.dispatch.local import LocalTransport
from orchestrator.engine import worker_protocol
from orchestrator.engine.errors import NotFound
from orchestrator.engine.service import Engine
from orchestrator.engine.tick import expire_leases
from orchestrator.storage.s3 import encode_json, ensure_bucket, sha256_hex
from orchestrator.storage.tokens import TokenKeyring
from orchestrator.worker import TaskContext, Worker
from orchestrator.worker.grant_io import GrantStorage
from orchestrator.worker.http import HttpSender
from tests import capturing
from tests.polling import poll

from .conftest import WORKSPACE

OTHER_WORKSPACE = "globex"
API = "http://testserver"  # the TestClient's base URL: dispatches call back there


class CapturingTransport(capturing.CapturingTransport):
    def take(self, node: str) -> dict[str, Any]:
        return self.take_node(node)

    def count(self, node: str) -> int:
        return self.matching(lambda m: m["node"] == node)


def no_grant(settings: Any, **kwargs: Any) -> None:
    return None


@pytest.fixture
def transport(engine: Engine) -> CapturingTransport:
    """Dispatches of the shared engine are captured, with tokens that carry no storage grant (so
    a success's output is not looked for in a bucket)."""
    capturing = CapturingTransport()
    engine.transports["local"] = capturing
    engine.dispatcher._issue_grant = no_grant
    return capturing


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def success(message: dict[str, Any], *, task_id: str | None = None, token: str | None = None) -> dict[str, Any]:
    return {"task_id": task_id or message["task_id"], "token": token or message["token"], "status": "succeeded",
            "output": {"key": f"runs/x/{message['node']}", "size": 2}}


def crafted_token(engine: Engine, message: dict[str, Any], *, ttl: int = 600, task_id: str | None = None,
                  keyring: TokenKeyring | None = None) -> str:
    """The message's token with another expiry or task id, or signed with another key."""
    claims = engine.keyring.read(message["token"])
    return (keyring or engine.keyring).issue(dataclasses.replace(
        claims, expires_at=int(time.time()) + ttl, task_id=task_id or claims.task_id))


def tampered(token: str) -> str:
    header, key, iv, ciphertext, tag = token.split(".")
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    return ".".join([header, key, iv, flipped, tag])


def post(client: TestClient, items: list[Any]) -> list[dict[str, Any]]:
    response = client.post("/api/callbacks", json={"callbacks": items})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    assert len(results) == len(items)
    return results


def task_status(engine: Engine, message: dict[str, Any], workspace: str = WORKSPACE) -> tuple[str, int]:
    task, _ = engine.get_task(workspace, uuid.UUID(message["task_id"]))
    return task["status"], task["attempt"]


def run_status(engine: Engine, run_id: Any, workspace: str = WORKSPACE) -> str:
    return str(engine.get_run(workspace, run_id)[0]["status"])


def succeeded_attempts(engine: Engine, run_id: Any) -> dict[str, int]:
    """Per node of the run, its attempts recorded as succeeded."""
    with engine.db.connection() as conn:
        rows = conn.execute(
            """SELECT t.node_id, count(a.*) FILTER (WHERE a.status = 'succeeded') AS n
               FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id WHERE t.run_id = %s GROUP BY t.node_id""",
            (run_id,)).fetchall()
    return {r["node_id"]: int(r["n"]) for r in rows}


def fan_in(pipeline_id: str, width: int, *, root: bool = False) -> dict[str, Any]:
    """`width` nodes (after `root`, if any) joined by `join`."""
    middle = [{"id": f"n{i:02d}", "task": "echo", **({"depends": ["root"]} if root else {})} for i in range(width)]
    return {"id": pipeline_id, "nodes": [*([{"id": "root", "task": "echo"}] if root else []), *middle,
                                         {"id": "join", "task": "echo", "depends": [n["id"] for n in middle]}]}


# --- answers ---------------------------------------------------------------------------------------


def test_a_batch_of_successes_is_recorded_each_answered_and_the_run_moves_on(
    engine: Engine, client: TestClient, transport: CapturingTransport,
) -> None:
    engine.create_pipeline(WORKSPACE, fan_in("fan", 5))
    run = engine.trigger_run(WORKSPACE, "fan")
    messages = [transport.take(f"n{i:02d}") for i in range(5)]

    results = post(client, [success(m) for m in messages])

    assert results == [{"task_id": m["task_id"], "status": 200, "accepted": True, "outcome": "succeeded",
                        "task_status": "succeeded", "run_status": None} for m in messages]
    # The batch made the join ready and dispatched it itself (no tick), with every input.
    join = transport.take("join")
    assert set(join["inputs"]) == {f"n{i:02d}" for i in range(5)}
    assert join["inputs"]["n03"]["key"] == "runs/x/n03"
    (last,) = post(client, [success(join)])
    assert (last["status"], last["outcome"], last["run_status"]) == (200, "succeeded", "succeeded")
    assert run_status(engine, run.id) == "succeeded"
    assert succeeded_attempts(engine, run.id) == dict.fromkeys([*(f"n{i:02d}" for i in range(5)), "join"], 1)


def test_each_callback_of_a_mixed_batch_is_answered_alone_and_only_the_bad_ones_are_refused(
    engine: Engine, client: TestClient, transport: CapturingTransport,
) -> None:
    nodes = ["ok", "forged", "victim", "lender", "expired", "foreign", "bad", "dup"]
    engine.create_pipeline(WORKSPACE, {"id": "mixed", "nodes": [
        *({"id": n, "task": "echo"} for n in nodes),
        {"id": "stale", "task": "echo", "retry": {"max_attempts": 3, "base_delay_s": 0}}]})
    run = engine.trigger_run(WORKSPACE, "mixed")
    sent = {n: transport.take(n) for n in [*nodes, "stale"]}

    # `stale`: its first attempt starts, its lease lapses, and the tick's expiry retries it:
    # attempt 2 is out, and attempt 1's token is stale.
    first = sent["stale"]
    assert client.post("/api/heartbeat", json={"token": first["token"]}).json()["task_status"] == "running"
    with engine.db.connection() as conn:
        conn.execute("UPDATE tasks SET lease_expires_at = tw_now() - interval '1 second' WHERE id = %s",
                     (first["task_id"],))
    assert expire_leases(engine.db, engine.settings, 10) == 1
    engine.dispatch_ready(run.id)
    second = transport.take("stale")
    assert (second["task_id"], second["attempt"]) == (first["task_id"], 2)

    nowhere = str(uuid.uuid4())  # a task that does not exist, with a valid token naming it
    other_keys = TokenKeyring([("other", "A" * 43)], engine.settings.token_issuer, engine.settings.token_audience)
    batch: list[Any] = [
        success(sent["ok"]),                                                              # 0
        success(sent["forged"], token=tampered(sent["forged"]["token"])),                 # 1
        success(sent["victim"], token=sent["lender"]["token"]),                          # 2 another task's token
        success(sent["expired"], token=crafted_token(engine, sent["expired"], ttl=-5)),  # 3
        success(sent["foreign"], token=crafted_token(engine, sent["foreign"], keyring=other_keys)),  # 4
        {**success(sent["bad"]), "status": "done"},                                      # 5 malformed
        success(first),                                                                   # 6 stale attempt
        success(sent["dup"]),                                                             # 7
        success(sent["dup"]),                                                             # 8 the same again
        {"token": sent["ok"]["token"], "status": "succeeded"},                            # 9 no task_id
        "not an object",                                                                  # 10
        {**success(sent["ok"]), "task_id": "not-a-uuid"},                                 # 11
        success(sent["ok"], task_id=nowhere, token=crafted_token(engine, sent["ok"], task_id=nowhere)),  # 12
    ]
    results = post(client, batch)

    statuses = [r["status"] for r in results]
    assert statuses == [200, 401, 401, 401, 401, 422, 409, 200, 200, 422, 422, 422, 404], results
    assert [r["task_id"] for r in results] == [
        *(item["task_id"] for item in batch[:9]), None, None, "not-a-uuid", nowhere]
    assert (results[0]["accepted"], results[0]["outcome"], results[0]["task_status"]) == (True, "succeeded", "succeeded")
    assert "error" not in results[0]
    assert results[1]["error"]["details"]["reason"] == "tampered"
    assert "another task" in results[2]["error"]["message"]
    assert results[3]["error"]["details"]["reason"] == "expired"
    assert results[4]["error"]["details"]["reason"] == "unknown_key"
    for refused in (results[1], results[2], results[3], results[4], results[5]):
        assert refused["accepted"] is False and refused["outcome"] is None and refused["task_status"] is None
    assert results[5]["error"]["code"] == "invalid"
    assert results[5]["error"]["details"][0]["path"] == "callbacks.5.status"
    assert "callbacks[5]" in results[5]["error"]["message"]
    assert (results[6]["accepted"], results[6]["outcome"], results[6]["error"]["code"]) == (
        False, "stale_attempt", "stale_attempt")
    assert (results[7]["accepted"], results[7]["outcome"]) == (True, "succeeded")
    assert (results[8]["accepted"], results[8]["outcome"], results[8]["task_status"]) == (False, "duplicate", "succeeded")
    assert "error" not in results[8]
    assert results[9]["error"]["details"][0]["path"] == "callbacks.9.task_id"
    assert results[10]["error"]["code"] == "invalid"
    assert results[11]["error"]["details"][0]["path"] == "callbacks.11.task_id"
    assert (results[12]["outcome"], results[12]["error"]["code"]) == ("not_found", "not_found")

    # Only the good ones moved their tasks; every refused one left its task (and the lender's) as it was.
    assert task_status(engine, sent["ok"]) == ("succeeded", 1)
    assert task_status(engine, sent["dup"]) == ("succeeded", 1)
    for node in ("forged", "victim", "lender", "expired", "foreign", "bad"):
        assert task_status(engine, sent[node]) == ("dispatched", 1), node
    assert task_status(engine, second) == ("dispatched", 2)

    # Sent again in another batch: a duplicate, answered 200, nothing changes.
    again = post(client, [success(sent["dup"]), success(sent["ok"])])
    assert [(r["status"], r["outcome"]) for r in again] == [(200, "duplicate"), (200, "duplicate")]

    # The rest, with their own tokens: recorded, and the run ends.
    rest = post(client, [success(sent[n]) for n in ("forged", "victim", "lender", "expired", "foreign", "bad")]
                + [success(second)])
    assert [(r["status"], r["outcome"]) for r in rest] == [(200, "succeeded")] * 7
    assert rest[-1]["run_status"] == "succeeded"
    assert run_status(engine, run.id) == "succeeded"
    assert succeeded_attempts(engine, run.id) == dict.fromkeys([*nodes, "stale"], 1)


def test_tokens_authorize_each_callback_not_the_batch(
    engine: Engine, client: TestClient, transport: CapturingTransport,
) -> None:
    """Callbacks of two workspaces' tasks in one batch: each recorded for its own task; a token
    of one workspace's task under the other's task id is refused."""
    pipeline = {"id": "pair", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]}
    engine.create_api_key(OTHER_WORKSPACE, "admin")  # the second workspace
    engine.create_pipeline(WORKSPACE, pipeline)
    engine.create_pipeline(OTHER_WORKSPACE, pipeline)
    ours = engine.trigger_run(WORKSPACE, "pair")
    sent_ours = {n: transport.take(n) for n in ("a", "b")}
    theirs = engine.trigger_run(OTHER_WORKSPACE, "pair")
    sent_theirs = {n: transport.take(n) for n in ("a", "b")}

    results = post(client, [success(sent_ours["a"]), success(sent_theirs["a"]),
                            success(sent_theirs["b"], token=sent_ours["b"]["token"])])

    assert [(r["status"], r["outcome"]) for r in results] == [(200, "succeeded"), (200, "succeeded"), (401, None)]
    assert task_status(engine, sent_ours["a"]) == ("succeeded", 1)
    assert task_status(engine, sent_theirs["a"], OTHER_WORKSPACE) == ("succeeded", 1)
    assert task_status(engine, sent_ours["b"]) == ("dispatched", 1)
    assert task_status(engine, sent_theirs["b"], OTHER_WORKSPACE) == ("dispatched", 1)
    with pytest.raises(NotFound):  # still one workspace's task each
        engine.get_task(WORKSPACE, uuid.UUID(sent_theirs["a"]["task_id"]))

    results = post(client, [success(sent_theirs["b"]), success(sent_ours["b"])])
    assert [r["run_status"] for r in results] == ["succeeded", "succeeded"]
    assert run_status(engine, ours.id) == "succeeded"
    assert run_status(engine, theirs.id, OTHER_WORKSPACE) == "succeeded"


# --- the request as a whole ------------------------------------------------------------------------


def test_an_envelope_that_is_not_a_batch_is_refused_whole_and_records_nothing(
    engine: Engine, transport: CapturingTransport,
) -> None:
    assert Settings().max_callbacks_per_batch == 100
    assert load_settings({"TICKWEAVE_MAX_CALLBACKS_PER_BATCH": "3"}).max_callbacks_per_batch == 3
    engine.create_pipeline(WORKSPACE, fan_in("many", 101))
    run = engine.trigger_run(WORKSPACE, "many")
    engine.dispatch_ready(run.id)  # a claim takes at most 100
    messages = [transport.take(f"n{i:02d}") for i in range(101)]
    good = [success(m) for m in messages]

    def refused(client: TestClient, body: Any, status: int, *says: str, raw: bytes | None = None) -> None:
        response = (client.post("/api/callbacks", content=raw, headers={"Content-Type": "application/json"})
                    if raw is not None else client.post("/api/callbacks", json=body))
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"code", "message", "details"}
        for text in says:
            assert text in error["message"], error["message"]

    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as client:
        refused(client, {"callbacks": good}, 422, "101 callbacks", "limit of 100")  # max + 1
        refused(client, {"callbacks": []}, 422, "callbacks is empty", '{"callbacks": [')
        refused(client, {}, 422, "callbacks: Field required", "1 to 100 callbacks")
        refused(client, {"callbacks": good[0]}, 422, "callbacks", "valid list")
        refused(client, {"callbacks": good[:1], "extra": 1}, 422, "extra")
        refused(client, good[:2], 422, "JSON array, not an object")
        refused(client, None, 422, "not valid JSON", raw=b'{"callbacks": [')
        refused(client, None, 422, "empty", raw=b"")
    small = engine.settings.with_overrides(max_callbacks_per_batch=3, max_body_bytes=4096)
    with TestClient(create_app(small, engine), raise_server_exceptions=False) as client:
        refused(client, {"callbacks": good[:4]}, 422, "4 callbacks", "limit of 3")
        huge = {**good[0], "status": "failed", "error": {"message": "x" * 5000}}
        del huge["output"]
        refused(client, {"callbacks": [huge]}, 413, "limit")
        assert post(client, good[:3])[2]["outcome"] == "succeeded"  # at the limit: taken

    assert {task_status(engine, m)[0] for m in messages[3:]} == {"dispatched"}
    assert run_status(engine, run.id) == "running"
    assert post(TestClient(create_app(engine.settings, engine)), good[3:])[-1]["status"] == 200
    assert post(TestClient(create_app(engine.settings, engine)), [success(transport.take("join"))])[0][
        "run_status"] == "succeeded"


def test_a_value_the_database_cannot_hold_refuses_its_callback_only(
    engine: Engine, client: TestClient, transport: CapturingTransport,
) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "nul", "nodes": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}]})
    engine.trigger_run(WORKSPACE, "nul")
    a, b = transport.take("a"), transport.take("b")
    results = post(client, [{**success(a), "output": {"key": "runs/x/a", "note": "nul \u0000 here"}},
                            {"task_id": b["task_id"], "token": b["token"], "status": "failed",
                             "error": {"message": "boom", "retryable": False}}])
    assert [(r["status"], r["outcome"]) for r in results] == [(422, None), (200, "failed")]
    assert "NUL" in results[0]["error"]["message"]
    assert task_status(engine, a) == ("dispatched", 1)


# --- the engine's path: a success producing pipeline outputs ----------------------------------------


@pytest.fixture
def stored(database_url: str, moto_server: MotoServer) -> Iterator[Engine]:
    """An engine on the moto bucket (presigned grants) whose dispatches are captured."""
    settings = Settings(database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url,
                        bucket=f"batch-{uuid.uuid4().hex[:10]}", public_url=API)
    ensure_bucket(settings)
    eng = Engine(settings, Database(database_url, max_size=8), transports={"local": CapturingTransport()})
    eng.create_api_key(WORKSPACE, "admin")  # the workspace
    yield eng
    eng.close()


def captured(engine: Engine) -> CapturingTransport:
    sent = engine.transports["local"]
    assert isinstance(sent, CapturingTransport)
    return sent


def written(engine: Engine, message: dict[str, Any], value: Any) -> dict[str, Any]:
    """The attempt's output written with its own grant, as the SDK does: a success's callback."""
    grant = engine.keyring.read(message["token"]).storage
    assert grant is not None
    body = encode_json(value)
    GrantStorage(grant).write_output(body)
    return {"task_id": message["task_id"], "token": message["token"], "status": "succeeded",
            "output": {"key": grant.output_key, "size": len(body), "sha256": sha256_hex(body)}}


def test_a_success_producing_pipeline_outputs_goes_through_the_engine_in_a_batch_with_plain_ones(
    stored: Engine,
) -> None:
    stored.create_pipeline(WORKSPACE, {"id": "produces", "nodes": [{"id": "up", "task": "echo"}],
                                       "outputs": {"result": {"from": "up", "schema": {
                                           "type": "object", "required": ["rows"]}}}})
    stored.create_pipeline(WORKSPACE, {"id": "plain", "nodes": [
        {"id": "p1", "task": "echo"}, {"id": "p2", "task": "echo"}, {"id": "after", "task": "echo", "depends": ["p1"]}]})
    produces = stored.trigger_run(WORKSPACE, "produces")
    plain = stored.trigger_run(WORKSPACE, "plain")
    up, p1, p2 = (captured(stored).take(n) for n in ("up", "p1", "p2"))
    batch = [written(stored, p1, {"n": 1}), written(stored, up, {"rows": 7}), written(stored, p2, {"n": 2})]

    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        results = post(client, batch)

    assert [(r["status"], r["accepted"], r["outcome"]) for r in results] == [(200, True, "succeeded")] * 3
    assert results[1]["run_status"] == "succeeded"
    assert run_status(stored, produces.id) == "succeeded"
    with stored.db.connection() as conn:
        (output,) = conn.execute("SELECT output, size FROM pipeline_outputs WHERE run_id = %s",
                                 (produces.id,)).fetchall()
    assert output["output"] == "result" and output["size"] == len(encode_json({"rows": 7}))
    after = captured(stored).take("after")  # p1's successor dispatched by the batch
    assert after["inputs"]["p1"]["key"] == batch[0]["output"]["key"]
    assert run_status(stored, plain.id) == "running"
    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        (last,) = post(client, [written(stored, after, {"n": 3})])
    assert last["run_status"] == "succeeded"


class HeldChecks:
    """`check_node_output` held until `parties` checks are in flight together, then run for real
    against the moto bucket: a stand-in for S3's round trip that only a batch checking its
    outputs at once gets through (checked one after the other, the first waits alone and the
    barrier breaks). `fail` names output keys whose check fails as if S3 were unreachable."""

    def __init__(self, parties: int, fail: frozenset[str] = frozenset()) -> None:
        self.barrier = threading.Barrier(parties)
        self.fail = fail
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = self.ended = 0
        self.real = worker_protocol.check_node_output

    def __call__(self, settings: Settings, bucket: str, output: dict[str, Any]) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.barrier.wait(timeout=20)
            if output["key"] in self.fail:
                raise EndpointConnectionError(endpoint_url="https://s3.example.invalid")
            self.real(settings, bucket, output)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.ended += 1


def test_a_batchs_output_checks_run_at_once_and_a_bad_object_fails_only_its_attempt(
    stored: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id, messages = dispatched_batch(stored, "checked-at-once", 6)
    never_written = dict(success(messages[2]), output={"key": grant_key(stored, messages[2]), "size": 2})
    batch = [never_written if i == 2 else written(stored, m, {"n": i}) for i, m in enumerate(messages)]
    batch[4]["output"] = dict(batch[4]["output"], size=batch[4]["output"]["size"] + 1)
    held = HeldChecks(parties=6)
    monkeypatch.setattr(worker_protocol, "check_node_output", held)

    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        results = post(client, batch)

    assert held.most_in_flight == 6 and held.ended == 6
    # each object checked for its own callback, answered in the order sent
    assert [(r["accepted"], r["outcome"]) for r in results] == [
        (True, "succeeded"), (True, "succeeded"), (True, "failed"), (True, "succeeded"), (True, "failed"),
        (True, "succeeded")]
    # (one attempt each: the failed attempt is the task's last)
    assert task_status(stored, messages[2]) == ("failed", 1) and task_status(stored, messages[4]) == ("failed", 1)
    errors = {m["node"]: stored.get_task(WORKSPACE, uuid.UUID(m["task_id"]))[0]["error"] for m in messages}
    assert errors["t2"]["code"] == "output_missing" and errors["t4"]["code"] == "output_size_mismatch"
    assert {node for node, error in errors.items() if error} == {"t2", "t4"}
    assert succeeded_attempts(stored, run_id) == {"t0": 1, "t1": 1, "t2": 0, "t3": 1, "t4": 0, "t5": 1}
    assert run_status(stored, run_id) == "failed"


def test_a_batch_whose_output_check_cannot_reach_s3_records_nothing_after_every_check_ended(
    stored: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id, messages = dispatched_batch(stored, "unreachable", 4)
    batch = [written(stored, m, {"n": i}) for i, m in enumerate(messages)]
    held = HeldChecks(parties=4, fail=frozenset({batch[1]["output"]["key"]}))
    monkeypatch.setattr(worker_protocol, "check_node_output", held)

    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        response = client.post("/api/callbacks", json={"callbacks": batch})

    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    assert held.ended == 4 and held.in_flight == 0  # no check left running behind the answer
    assert [task_status(stored, m) for m in messages] == [("dispatched", 1)] * 4  # nothing recorded
    assert succeeded_attempts(stored, run_id) == {f"t{i}": 0 for i in range(4)}
    # the worker's retry of the same batch, S3 reachable again, is recorded whole
    monkeypatch.setattr(worker_protocol, "check_node_output", held.real)
    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        assert [r["outcome"] for r in post(client, batch)] == ["succeeded"] * 4
    assert run_status(stored, run_id) == "succeeded"


def test_a_batchs_checks_in_flight_meet_a_lease_expiry_a_cancel_and_a_foreign_token(
    stored: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the batch's checks are all held in flight, one task's lease lapses (it is tried
    again) and another run is cancelled; a callback carrying another workspace's token is in the
    batch too. Each callback is fenced on its own; the foreign one is never checked."""
    stored.create_pipeline(WORKSPACE, {"id": "raced", "nodes": [
        {"id": "t0", "task": "echo"}, {"id": "t2", "task": "echo"},
        {"id": "t1", "task": "echo", "retry": {"max_attempts": 3, "base_delay_s": 0}}]})
    stored.create_pipeline(WORKSPACE, {"id": "cancelled", "nodes": [{"id": "c0", "task": "echo"},
                                                                    {"id": "c1", "task": "echo"}]})
    stored.create_api_key(OTHER_WORKSPACE, "admin")
    stored.create_pipeline(OTHER_WORKSPACE, {"id": "theirs", "nodes": [{"id": "x", "task": "echo"}]})
    raced = stored.trigger_run(WORKSPACE, "raced")
    doomed = stored.trigger_run(WORKSPACE, "cancelled")
    stored.trigger_run(OTHER_WORKSPACE, "theirs")
    sent = {n: captured(stored).take(n) for n in ("t0", "t1", "t2", "c0", "c1", "x")}
    assert stored.record_heartbeat(sent["t1"]["token"], progress=None, message=None)[0]  # t1 started
    batch = [written(stored, sent[n], {"n": n}) for n in ("t0", "t1", "t2", "c0", "c1")]
    # another workspace's (valid) token, naming this workspace's task
    batch.append(dict(batch[0], token=sent["x"]["token"]))

    def meanwhile() -> None:  # run once, by the last check to arrive, before any goes on
        with stored.db.connection() as conn:
            conn.execute("UPDATE tasks SET lease_expires_at = tw_now() - interval '1 second' WHERE id = %s",
                         (sent["t1"]["task_id"],))
        assert expire_leases(stored.db, stored.settings, 10) == 1
        stored.cancel_run(WORKSPACE, doomed.id, actor="test")

    held = HeldChecks(parties=5)
    held.barrier = threading.Barrier(5, action=meanwhile)
    monkeypatch.setattr(worker_protocol, "check_node_output", held)

    with TestClient(create_app(stored.settings, stored), raise_server_exceptions=False) as client:
        results = post(client, batch)

    assert held.ended == 5  # the foreign one was refused before any check
    assert [(r["status"], r["accepted"]) for r in results[:3]] == [(200, True), (409, False), (200, True)]
    assert results[1]["outcome"] == "not_active"  # its lease lapsed: ready for attempt 2
    assert [(r["status"], r["outcome"], r["task_status"]) for r in results[3:5]] == [
        (409, "already_finished", "cancelled")] * 2
    assert results[5]["status"] == 401 and "another task" in results[5]["error"]["message"]
    assert task_status(stored, sent["t0"]) == ("succeeded", 1) and task_status(stored, sent["t2"]) == ("succeeded", 1)
    assert task_status(stored, sent["t1"]) == ("ready", 1)
    assert task_status(stored, sent["c0"]) == ("cancelled", 1) and task_status(stored, sent["c1"]) == ("cancelled", 1)
    assert run_status(stored, doomed.id) == "cancelled"
    assert succeeded_attempts(stored, raced.id) == {"t0": 1, "t1": 0, "t2": 1}
    assert succeeded_attempts(stored, doomed.id) == {"c0": 0, "c1": 0}


def grant_key(engine: Engine, message: dict[str, Any]) -> str:
    grant = engine.keyring.read(message["token"]).storage
    assert grant is not None
    return grant.output_key


# --- concurrency -------------------------------------------------------------------------------------


@pytest.fixture
def wide_engine(settings: Settings) -> Iterator[Engine]:
    eng = Engine(settings, Database(settings.database_url, max_size=12), transports={"local": CapturingTransport()})
    eng.dispatcher._issue_grant = no_grant
    eng.create_api_key(WORKSPACE, "admin")  # the workspace
    yield eng
    eng.close()


def post_at_once(app: Any, batches: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Each batch posted by its own thread with its own client, all released together."""
    barrier = threading.Barrier(len(batches))
    answers: list[list[dict[str, Any]]] = [[] for _ in batches]
    errors: list[BaseException] = []

    def send(k: int) -> None:
        try:
            with TestClient(app, raise_server_exceptions=False) as own:
                barrier.wait(timeout=30)
                answers[k] = post(own, batches[k])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)
    return answers


def test_concurrent_batches_over_a_wide_fan_in_finish_every_task_once_and_the_join_once(wide_engine: Engine) -> None:
    engine = wide_engine
    engine.create_pipeline(WORKSPACE, fan_in("wide", 40, root=True))
    app = create_app(engine.settings, engine)
    for _ in range(3):  # three runs: three chances for the batches to interleave differently
        run = engine.trigger_run(WORKSPACE, "wide")
        with TestClient(app, raise_server_exceptions=False) as client:
            post(client, [success(captured(engine).take("root"))])
        messages = [captured(engine).take(f"n{i:02d}") for i in range(40)]
        # Four batches of ten, each also carrying the first callback of the next batch: the same
        # callback in two batches at once.
        batches = [[success(m) for m in messages[10 * k:10 * k + 10]] + [success(messages[(10 * k + 10) % 40])]
                   for k in range(4)]
        answers = post_at_once(app, batches)

        by_task: dict[str, list[str]] = {}
        for batch, results in zip(batches, answers, strict=True):
            for item, result in zip(batch, results, strict=True):
                assert result["status"] == 200 and result["task_id"] == item["task_id"], result
                by_task.setdefault(item["task_id"], []).append(result["outcome"])
        assert len(by_task) == 40
        for task_id, outcomes in by_task.items():
            assert outcomes.count("succeeded") == 1, (task_id, outcomes)
            assert sorted(outcomes) == (["duplicate", "succeeded"] if len(outcomes) == 2 else ["succeeded"])
        assert sum(len(outcomes) == 2 for outcomes in by_task.values()) == 4

        assert captured(engine).count("join") == 1  # dispatched once, by the batch that made it ready
        with TestClient(app, raise_server_exceptions=False) as client:
            (last,) = post(client, [success(captured(engine).take("join"))])
        assert last["run_status"] == "succeeded"
        assert run_status(engine, run.id) == "succeeded"
        assert succeeded_attempts(engine, run.id) == dict.fromkeys(
            ["root", *(f"n{i:02d}" for i in range(40)), "join"], 1)


# --- the worker SDK ---------------------------------------------------------------------------------


class Counting:
    """The API, counting its requests; `without_batches` answers POST /api/callbacks as a server
    from before the route (404 in the error shape)."""

    def __init__(self, app: ASGIApp, *, without_batches: bool = False) -> None:
        self.app = app
        self.without_batches = without_batches
        self.requests: list[str] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = str(scope["path"])
            with self._lock:
                self.requests.append(f"{scope['method']} {path.rsplit('/', 1)[0] + '/*' if path.startswith('/api/callback/') else path}")
            if self.without_batches and path == "/api/callbacks":
                await JSONResponse({"error": {"code": "not_found", "message": "no route for POST /api/callbacks",
                                              "details": None}}, status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def count(self, request: str) -> int:
        with self._lock:
            return self.requests.count(request)


def sdk_worker(engine: Engine, api: Counting) -> Worker:
    """A worker calling the API in-process (HttpSender over the TestClient, so the API sees every
    request), with the engine's token keys."""
    worker = Worker(settings=engine.settings, send=HttpSender(client=TestClient(api), attempts=2, backoff_s=0))

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node}

    return worker


def dispatched_batch(engine: Engine, pipeline_id: str, count: int) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    engine.create_pipeline(WORKSPACE, {"id": pipeline_id, "nodes": [{"id": f"t{i}", "task": "echo"}
                                                                    for i in range(count)]})
    run = engine.trigger_run(WORKSPACE, pipeline_id)
    return run.id, [captured(engine).take(f"t{i}") for i in range(count)]


def sqs_event(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Records": [{"messageId": f"m{i}", "body": json.dumps(m), "eventSource": "aws:sqs"}
                        for i, m in enumerate(messages)]}


def test_the_sdk_posts_a_lambda_sqs_batchs_callbacks_in_one_request(stored: Engine) -> None:
    api = Counting(create_app(stored.settings, stored))
    run_id, messages = dispatched_batch(stored, "lambda-batch", 4)
    event = sqs_event(messages)
    event["Records"].insert(2, {"messageId": "broken", "body": "{truncated"})

    answer = sdk_worker(stored, api).lambda_handler(event)

    assert answer == {"batchItemFailures": [{"itemIdentifier": "broken"}]}
    assert api.count("POST /api/callbacks") == 1
    assert api.count("POST /api/callback/*") == 0
    assert api.count("POST /api/heartbeat") == 4  # heartbeats stay per task
    assert run_status(stored, run_id) == "succeeded"
    assert succeeded_attempts(stored, run_id) == {f"t{i}": 1 for i in range(4)}


def test_the_sdk_falls_back_to_single_callbacks_on_an_older_server(stored: Engine) -> None:
    api = Counting(create_app(stored.settings, stored), without_batches=True)
    run_id, messages = dispatched_batch(stored, "older", 3)

    answer = sdk_worker(stored, api).lambda_handler(sqs_event(messages))

    assert answer == {"batchItemFailures": []}
    assert api.count("POST /api/callbacks") == 1  # tried once (404), not retried
    assert api.count("POST /api/callback/*") == 3
    assert run_status(stored, run_id) == "succeeded"


class StopAfter:
    """The SQS client of the polling loop, stopping it once `count` messages were received."""

    def __init__(self, client: Any, count: int, stop: threading.Event) -> None:
        self.client = client
        self.count = count
        self.stop = stop
        self.batches: list[int] = []

    def receive_message(self, **kwargs: Any) -> Any:
        received = self.client.receive_message(**kwargs)
        if received.get("Messages"):
            self.batches.append(len(received["Messages"]))
        if sum(self.batches) >= self.count:
            self.stop.set()
        return received

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_the_sqs_loop_posts_a_received_batchs_callbacks_in_one_request_then_deletes_them(
    stored: Engine, moto_server: MotoServer,
) -> None:
    api = Counting(create_app(stored.settings, stored))
    run_id, messages = dispatched_batch(stored, "polled", 5)
    sqs = boto3.client("sqs", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=f"batch-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    for message in messages:
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(message))
    stop = threading.Event()
    polling = StopAfter(sqs, 5, stop)

    executed = sdk_worker(stored, api).run_sqs(queue_url, stop=stop, wait_s=1, client=polling)

    assert executed == 5
    assert polling.batches == [5]
    assert api.count("POST /api/callbacks") == 1 and api.count("POST /api/callback/*") == 0
    assert run_status(stored, run_id) == "succeeded"
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    assert attributes == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}


def test_the_local_worker_reports_tasks_that_end_together_in_one_request(stored: Engine) -> None:
    """The local transport's threads hand their callbacks to one CallbackBatcher: the first goes
    alone at once; the five tasks that end while it is on its way (held here until they have)
    go in one POST /api/callbacks, each recorded once."""
    api = Counting(create_app(stored.settings, stored))
    run_id, messages = dispatched_batch(stored, "local-batch", 6)
    sender = HttpSender(client=TestClient(api), attempts=2, backoff_s=0)
    holding, release = threading.Event(), threading.Event()
    first = [True]

    def send(url: str, body: dict[str, Any]) -> dict[str, Any]:
        if "/api/callback" in url and first[0]:
            first[0] = False
            holding.set()
            assert release.wait(10)
        return sender(url, body)

    worker = Worker(settings=stored.settings, send=send)

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node}

    transport = LocalTransport(worker, settings=stored.settings, threads=6)
    try:
        for message in messages:
            transport.send(message)
        poll(lambda: holding.is_set() and transport.batcher.queued == 5, "the other five callbacks never queued",
             timeout_s=10)
        release.set()
        assert transport.drain(10) == []
    finally:
        transport.close()

    assert api.count("POST /api/callback/*") == 1 and api.count("POST /api/callbacks") == 1
    assert run_status(stored, run_id) == "succeeded"
    assert succeeded_attempts(stored, run_id) == {f"t{i}": 1 for i in range(6)}


def test_batches_spread_over_a_wide_joins_slots_take_them_in_one_order(
    wide_engine: Engine, caplog: pytest.LogCaptureFixture,
) -> None:
    """A join of 96 has 24 slots dealt round-robin in upstream id order (migration 0027). Three
    batches each carry every third upstream, so each meets every slot, several times: the batch
    statement takes its outcomes in slot order, so no two batches wait for each other in a
    circle (no transaction is replayed after a deadlock), and the join fires once."""
    engine = wide_engine
    engine.create_pipeline(WORKSPACE, fan_in("slotted", 96, root=True))
    app = create_app(engine.settings, engine)
    for _ in range(3):
        run = engine.trigger_run(WORKSPACE, "slotted")
        with TestClient(app, raise_server_exceptions=False) as client:
            post(client, [success(captured(engine).take("root"))])
        messages = sorted((captured(engine).take(f"n{i:02d}") for i in range(96)), key=lambda m: m["task_id"])
        batches = [[success(m) for m in messages[k::3]] for k in range(3)]
        with caplog.at_level(logging.INFO, logger="orchestrator.db.connection"):
            answers = post_at_once(app, batches)
        assert [r for r in caplog.records if "replaying a transaction" in r.getMessage()] == []
        assert all(r["status"] == 200 and r["outcome"] == "succeeded" for results in answers for r in results)
        assert captured(engine).count("join") == 1
        with TestClient(app, raise_server_exceptions=False) as client:
            (last,) = post(client, [success(captured(engine).take("join"))])
        assert last["run_status"] == "succeeded" and run_status(engine, run.id) == "succeeded"
