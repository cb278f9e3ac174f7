"""The remote transports against real parts: the `http` transport and the worker service under
uvicorn, the `sqs` transport and the worker's polling loop against moto's SQS, and the `lambda`
transport's exact invoke request (botocore Stubber) replayed through the worker Lambda handler.
Each runs the whole stack (real Postgres, moto S3/STS, the API under uvicorn) from
tests/e2e/conftest.py."""

from __future__ import annotations

import importlib
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import httpx
import psycopg
import pytest
import uvicorn
from botocore.stub import Stubber
from starlette.applications import Starlette

import examples.tasks
from infra.s3 import MotoServer, free_port
from orchestrator.db.connection import Row
from orchestrator.dispatch.aws_lambda import LambdaTransport
from orchestrator.dispatch.base import DispatchError
from orchestrator.dispatch.http import HttpTransport
from orchestrator.engine.dispatcher import Dispatcher
from orchestrator.storage.s3 import orchestrator_s3
from orchestrator.store import tasks as task_store
from orchestrator.worker import WorkerService
from tests.e2e.conftest import WORKSPACE, Stack, running_stack, wait_until

REPO = Path(__file__).resolve().parents[2]
DIAMOND = (REPO / "examples" / "pipelines" / "hello-diamond.yaml").read_text()
SECRET = "shared-worker-secret"


@contextmanager
def serve(app: Starlette, port: int | None = None) -> Iterator[str]:
    """`app` under uvicorn on a thread of this process; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "the worker service did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def service_of(app: Starlette) -> WorkerService:
    service: WorkerService = app.state.service
    return service


def run_diamond(stack: Stack) -> dict[str, Any]:
    created = stack.client.post("/api/pipelines", content=DIAMOND, headers={"Content-Type": "application/yaml"})
    assert created.status_code == 201, created.text
    triggered = stack.client.post("/api/pipelines/hello-diamond/runs", json={})
    assert triggered.status_code == 201, triggered.text
    return stack.wait_for_run(triggered.json()["id"])


def assert_outputs_in_s3(stack: Stack, run: dict[str, Any]) -> None:
    assert run["status"] == "succeeded", run
    tasks = {t["node"]: t for t in run["tasks"]}
    assert {node: t["status"] for node, t in tasks.items()} == dict.fromkeys(
        ("fetch", "left", "right", "report"), "succeeded")
    s3 = orchestrator_s3(stack.settings)
    stored = {node: json.loads(s3.get_object(Bucket=stack.settings.bucket, Key=t["output"]["key"])["Body"].read())
              for node, t in tasks.items()}
    assert stored["right"] == {"slept": 1}
    assert set(stored["report"]["inputs"]) == {"left", "right"}
    assert stored["report"]["inputs"]["left"]["inputs"]["fetch"]["node"] == "fetch"


def dispatch_messages(stack: Stack, pipeline: dict[str, Any]) -> list[tuple[Row, dict[str, Any]]]:
    """Trigger `pipeline` without dispatching, claim its ready tasks as a tick would, and build
    their dispatch messages (token with a storage grant, callback URLs of the live API)."""
    stack.engine.create_pipeline(WORKSPACE, pipeline)
    stack.engine.trigger_run(WORKSPACE, pipeline["id"], dispatch_now=False)
    with stack.engine.db.transaction() as conn:
        claimed = task_store.claim_ready_tasks(conn, 10)
    dispatcher = Dispatcher(stack.settings, stack.engine.db, stack.engine.keyring, transports={})
    return [(task, dispatcher.build_message(task, {})) for task in claimed]


def task_status(stack: Stack, task: Row) -> str:
    row, _ = stack.engine.get_task(WORKSPACE, task["id"])
    status: str = row["status"]
    return status


def tampered(token: str) -> str:
    header, key, iv, ciphertext, tag = token.split(".")
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    return ".".join([header, key, iv, flipped, tag])


def move_clock(database_url: str, offset: str) -> None:
    """Move the database's clock (tw_clock) forward, past a dispatch retry delay."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::interval)
                        ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """, (offset,))


# --- http ----------------------------------------------------------------------------------------


def test_a_diamond_runs_end_to_end_through_the_http_worker_service(database_url: str, moto_server: MotoServer) -> None:
    app = examples.tasks.worker.asgi_app(auth_token=SECRET)
    with serve(app) as worker_url, running_stack(
        database_url, moto_server, transports={"*": "http"}, worker_url=f"{worker_url}/dispatch",
        worker_auth_token=SECRET, local_worker=None,
    ) as stack:
        assert set(stack.engine.transports) == {"http"}
        run = run_diamond(stack)
        assert_outputs_in_s3(stack, run)
        assert all(t["attempt"] == 1 for t in run["tasks"])
        assert wait_until(lambda: service_of(app).completed == 4, 10, "the service did not finish 4 dispatches")
        health = httpx.get(f"{worker_url}/health").json()
        assert health["status"] == "ok" and "echo" in health["tasks"] and health["in_flight"] == 0


def test_the_service_refuses_a_forged_token_or_a_wrong_secret_and_runs_nothing(
    database_url: str, moto_server: MotoServer,
) -> None:
    app = examples.tasks.worker.asgi_app(auth_token=SECRET)
    with serve(app) as worker_url, running_stack(database_url, moto_server, local_worker=None) as stack:
        ((task, message),) = dispatch_messages(stack, {"id": "forged", "nodes": [{"id": "x", "task": "echo"}]})
        url = f"{worker_url}/dispatch"
        auth = {"Authorization": f"Bearer {SECRET}"}

        forged = httpx.post(url, json={**message, "token": tampered(message["token"])}, headers=auth)
        assert forged.status_code == 401
        assert forged.json() == {"accepted": False, "error": "invalid_token", "reason": "tampered"}
        mixed_up = httpx.post(url, json={**message, "task_id": str(uuid.uuid4())}, headers=auth)
        assert mixed_up.status_code == 401 and mixed_up.json()["reason"] == "mismatch"
        no_secret = httpx.post(url, json=message)
        wrong_secret = httpx.post(url, json=message, headers={"Authorization": "Bearer guess"})
        assert no_secret.status_code == wrong_secret.status_code == 401
        assert wrong_secret.json()["error"] == "unauthorized"
        assert httpx.post(url, content=b"{not json", headers=auth).status_code == 400

        # nothing ran: no heartbeat reached the API (the task would be `running`)
        assert service_of(app).completed == 0 and service_of(app).in_flight == 0
        assert task_status(stack, task) == "dispatched"

        # the genuine message is accepted at once and the task runs to success
        accepted = httpx.post(url, json=message, headers=auth)
        assert accepted.status_code == 202 and accepted.json() == {"accepted": True, "task_id": str(task["id"])}
        assert wait_until(lambda: task_status(stack, task) == "succeeded", 30, "the accepted task did not succeed")


def test_a_full_service_answers_503_and_the_transport_raises_without_the_secret(
    database_url: str, moto_server: MotoServer,
) -> None:
    app = examples.tasks.worker.asgi_app(auth_token=SECRET, concurrency=1)
    with serve(app) as worker_url, running_stack(database_url, moto_server, local_worker=None) as stack:
        messages = dispatch_messages(stack, {"id": "busy", "nodes": [
            {"id": "slow", "task": "sleep", "params": {"seconds": 2}}, {"id": "quick", "task": "echo"}]})
        by_node = {task["node_id"]: (task, message) for task, message in messages}
        transport = HttpTransport(f"{worker_url}/dispatch", auth_token=SECRET)
        try:
            transport.send(by_node["slow"][1])
            with pytest.raises(DispatchError, match="answered 503") as refused:
                transport.send(by_node["quick"][1])
            assert SECRET not in str(refused.value)
            slow_task = by_node["slow"][0]
            assert wait_until(lambda: task_status(stack, slow_task) == "succeeded", 30, "the slow task did not end")
            # a slot is free again once the running task ended
            assert wait_until(lambda: service_of(app).in_flight == 0, 10, "the slot was not freed")
            transport.send(by_node["quick"][1])
            quick_task = by_node["quick"][0]
            assert wait_until(lambda: task_status(stack, quick_task) == "succeeded", 30, "the quick task did not end")
        finally:
            transport.close()


def test_a_worker_service_that_is_down_puts_the_task_back_without_spending_an_attempt(
    database_url: str, moto_server: MotoServer,
) -> None:
    port = free_port()  # nothing listens here yet
    with running_stack(
        database_url, moto_server, transports={"*": "http"}, worker_url=f"http://127.0.0.1:{port}/dispatch",
        worker_auth_token=SECRET, local_worker=None,
    ) as stack:
        assert stack.client.post("/api/pipelines", json={"id": "down", "nodes": [{"id": "x", "task": "echo"}]}
                                 ).status_code == 201
        run = stack.client.post("/api/pipelines/down/runs", json={}).json()
        (task,) = run["tasks"]
        detail = stack.client.get(f"/api/tasks/{task['id']}").json()
        assert detail["status"] == "ready"
        assert detail["error"]["code"] == "dispatch_failed" and "ConnectError" in detail["error"]["message"]
        assert SECRET not in detail["error"]["message"]
        assert [a["status"] for a in detail["attempts"]] == ["dispatch_failed"]
        assert detail["max_attempts"] == 2  # the failed dispatch gave its attempt back

        # the service comes up on that port; past the retry delay, the tick dispatches again
        with serve(examples.tasks.worker.asgi_app(auth_token=SECRET), port=port):
            move_clock(database_url, "30 seconds")
            finished = stack.wait_for_run(run["id"])
        assert finished["status"] == "succeeded"
        detail = stack.client.get(f"/api/tasks/{task['id']}").json()
        assert [a["status"] for a in detail["attempts"]] == ["dispatch_failed", "succeeded"]


# --- sqs -----------------------------------------------------------------------------------------


def test_a_diamond_runs_through_sqs_and_the_worker_loop_deletes_every_message(
    database_url: str, moto_server: MotoServer,
) -> None:
    sqs = boto3.client("sqs", endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=f"tickweave-dispatch-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    # a message that is not a dispatch must not come back forever either
    sqs.send_message(QueueUrl=queue_url, MessageBody="{truncated")
    stop = threading.Event()
    executed: list[int] = []
    loop = threading.Thread(target=lambda: executed.append(examples.tasks.worker.run_sqs(
        queue_url, endpoint_url=moto_server.endpoint_url, region="us-east-1", stop=stop, wait_s=1)), daemon=True)
    with running_stack(
        database_url, moto_server, transports={"*": "sqs"}, worker_queue_url=queue_url, local_worker=None,
    ) as stack:
        assert set(stack.engine.transports) == {"sqs"}
        loop.start()
        try:
            run = run_diamond(stack)
        finally:
            stop.set()
            loop.join(timeout=30)
        assert not loop.is_alive()
        assert_outputs_in_s3(stack, run)
    assert executed == [4]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    # an undeleted message would be counted as not visible (the loop hides it until its deadline)
    assert attributes == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}


def test_a_queue_that_does_not_exist_is_a_dispatch_error(moto_server: MotoServer) -> None:
    from orchestrator.dispatch.sqs import SqsTransport

    transport = SqsTransport(f"{moto_server.endpoint_url}/123456789012/no-such-queue", region="us-east-1",
                             endpoint_url=moto_server.endpoint_url)
    try:
        with pytest.raises(DispatchError, match="no-such-queue"):
            transport.send({"task_id": "t-1"})
    finally:
        transport.close()


# --- lambda --------------------------------------------------------------------------------------


@pytest.fixture
def worker_function(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """handler.worker as a fresh cold start running the example tasks with the default (dev)
    token keys, which are the stack's."""
    for name in ("TICKWEAVE_TOKEN_KEYS", "TICKWEAVE_TOKEN_KEYS_FROM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TICKWEAVE_WORKER", "examples.tasks:worker")
    import handler.worker

    yield importlib.reload(handler.worker)


def test_the_lambda_transport_sends_the_exact_invoke_and_the_handler_runs_it(
    database_url: str, moto_server: MotoServer, worker_function: ModuleType,
) -> None:
    lambda_client = boto3.client("lambda", region_name="us-east-1")
    with running_stack(database_url, moto_server, local_worker=None) as stack, Stubber(lambda_client) as stubber:
        ((task, message),) = dispatch_messages(stack, {"id": "stubbed", "nodes": [
            {"id": "only", "task": "echo", "params": {"text": "ünïcode"}}]})
        payload = json.dumps(message, separators=(",", ":"), default=str).encode()
        stubber.add_response("invoke", {"StatusCode": 202}, expected_params={
            "FunctionName": "tickweave-worker", "InvocationType": "Event", "Payload": payload})
        stubber.add_client_error("invoke", service_error_code="TooManyRequestsException", http_status_code=429)
        transport = LambdaTransport("tickweave-worker", region="us-east-1", client=lambda_client)

        transport.send(message)
        with pytest.raises(DispatchError, match="TooManyRequestsException"):
            transport.send(message)
        stubber.assert_no_pending_responses()

        # what Lambda would hand the worker function is that payload, parsed
        answer = worker_function.lambda_handler(json.loads(payload), None)
        assert answer["accepted"] is True and answer["outcome"] == "succeeded", answer
        assert task_status(stack, task) == "succeeded"
        row, _ = stack.engine.get_task(WORKSPACE, task["id"])
        stored = json.loads(orchestrator_s3(stack.settings).get_object(
            Bucket=stack.settings.bucket, Key=row["output"]["key"])["Body"].read())
        assert stored["params"] == {"text": "ünïcode"} and stored["node"] == "only"
