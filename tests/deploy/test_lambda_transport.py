"""The `lambda` transport: asynchronous invoke of the worker function, against moto's Lambda API
and against the Invoke stand-in that runs the worker; a refused invoke puts the task back to
`ready`, and the scheduled tick dispatches it again."""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import boto3
import psycopg
import pytest

from infra.s3 import MotoServer
from orchestrator.dispatch.aws_lambda import LambdaTransport
from orchestrator.dispatch.base import DispatchError

from .conftest import WORKER_FUNCTION, AwsStack, load_event, wait_until


def moto_function(endpoint: str) -> str:
    """A function in moto's Lambda (which accepts invokes; without Docker it does not run them)."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = f"tickweave-worker-{uuid.uuid4().hex[:8]}"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "lambda.amazonaws.com"}}]}))["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler/worker.py", "def lambda_handler(event, context):\n    return event\n")
    boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1").create_function(
        FunctionName=name, Runtime="python3.11", Role=role, Handler="handler.worker.lambda_handler",
        Code={"ZipFile": code.getvalue()})
    return name


def test_send_is_an_async_invoke_that_lambda_accepts(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", moto_server.endpoint_url)
    transport = LambdaTransport(moto_function(moto_server.endpoint_url), region="us-east-1")
    try:
        transport.send({"task_id": "t-1", "token": "x" * 100})  # 202 from Lambda: no exception
    finally:
        transport.close()


def test_an_invoke_lambda_refuses_is_a_dispatch_error(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", moto_server.endpoint_url)
    transport = LambdaTransport("no-such-function", region="us-east-1")
    with pytest.raises(DispatchError, match="ResourceNotFoundException"):
        transport.send({"task_id": "t-1"})


def test_the_payload_arrives_as_sent(aws_stack: AwsStack) -> None:
    received: list[dict[str, object]] = []
    aws_stack.fake_lambda.functions["probe"] = lambda event, context: received.append(event)
    message = {"task_id": "t-2", "params": {"text": "ünïcode", "n": 3}, "deadline": None}
    LambdaTransport("probe", region="us-east-1").send(message)
    aws_stack.fake_lambda.wait_idle()
    assert received == [message]
    assert aws_stack.fake_lambda.invocations[-1].invocation_type == "Event"


def test_a_refused_dispatch_waits_for_the_tick(aws_stack: AwsStack) -> None:
    key = aws_stack.call({"tickweave": "create-key", "workspace": "deploy", "role": "admin"})["key"]
    pipeline = {"id": "retried-dispatch", "nodes": [{"id": "only", "task": "echo"}]}
    assert aws_stack.call(aws_stack.http_event("POST", "/api/pipelines", key=key, body=pipeline))["statusCode"] == 201
    worker = aws_stack.fake_lambda.functions.pop(WORKER_FUNCTION)  # the worker function is missing

    triggered = aws_stack.call(aws_stack.http_event("POST", "/api/pipelines/retried-dispatch/runs", key=key, body={}))
    run = json.loads(triggered["body"])
    (task,) = run["tasks"]
    detail = json.loads(aws_stack.call(aws_stack.http_event("GET", f"/api/tasks/{task['id']}", key=key))["body"])
    assert detail["status"] == "ready"
    assert detail["error"]["code"] == "dispatch_failed" and "ResourceNotFoundException" in detail["error"]["message"]

    # the function is back; once the retry delay has passed, the scheduled tick dispatches it
    aws_stack.fake_lambda.functions[WORKER_FUNCTION] = worker
    with psycopg.connect(aws_stack.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tw_clock (singleton, \"offset\") VALUES (true, '30 seconds')")
    summary = aws_stack.call(load_event("scheduler_tick.json"))
    assert summary["claimed"] == 1 and summary["dispatched"] == 1, summary

    def succeeded() -> bool:
        answer = aws_stack.call(aws_stack.http_event("GET", f"/api/runs/{run['id']}", key=key))
        return bool(json.loads(answer["body"])["status"] == "succeeded")

    assert wait_until(succeeded, 30, "the run did not finish after the tick")
