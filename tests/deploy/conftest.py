"""Fixtures for the deployment tests.

`aws_stack` configures `handler.api` exactly as template.yaml configures the API function
(references to secrets in Secrets Manager and SSM, the `lambda` transport, no local worker), with
moto standing in for S3, STS, Secrets Manager and SSM, a real Postgres, uvicorn serving
`handler.api.app` at the public URL, and `FakeLambda`: a local HTTP server speaking Lambda's Invoke
API that runs `handler.worker.lambda_handler` on a thread for each asynchronous invoke, as the
worker function would. Nothing in the product code knows it is under test: boto3 reaches the
stand-ins through the standard AWS_ENDPOINT_URL_* settings.

`stack` (the e2e stack) is re-exported for the tests that replay single events.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import string
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import uvicorn

from infra.s3 import MotoServer, free_port
from orchestrator.config import Settings
from orchestrator.storage.s3 import ensure_bucket
from tests.e2e.conftest import Stack, stack, wait_until

__all__ = ["EVENTS", "AwsStack", "FakeContext", "FakeLambda", "Stack", "load_event", "stack", "wait_until"]

EVENTS = Path(__file__).parent.parent / "fixtures" / "events"
STORAGE_ROLE = "arn:aws:iam::123456789012:role/tickweave-worker-storage"
WORKER_FUNCTION = "tickweave-worker"


class FakeContext:
    function_name = "tickweave-api"
    aws_request_id = "req-deploy"

    def get_remaining_time_in_millis(self) -> int:
        return 25_000


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return event


def generated_token_key() -> str:
    """What the template's GenerateSecretString makes: 43 characters from [A-Za-z0-9]."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(43))


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """The worker handler writes resolved references into os.environ; put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@dataclass
class Invocation:
    function: str
    invocation_type: str
    payload: dict[str, Any]
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class FakeLambda:
    """Lambda's Invoke API on loopback: `POST /2015-03-31/functions/{name}/invocations`.

    Known functions: `functions[name]` is the handler. An `Event` invoke is answered 202 at once
    and run on a thread (as Lambda queues it); `RequestResponse` runs inline and returns the
    result. An unknown function is a ResourceNotFoundException, as on AWS."""

    _PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")

    def __init__(self) -> None:
        self.functions: dict[str, Any] = {}
        self.invocations: list[Invocation] = []
        # When set, every request is first judged by it (method, path, headers, body): a returned
        # message is answered 403 AccessDeniedException, as Lambda answers a caller whose role
        # lacks lambda:InvokeFunction (tests/deploy/iam.py's `lambda_invoke_denied`).
        self.authorize: Any = None
        self.denied: list[str] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        match = self._PATH.match(request.path.split("?")[0])
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        name = match.group(1) if match else ""
        if self.authorize is not None:
            refusal = self.authorize("POST", request.path, dict(request.headers.items()), body)
            if refusal is not None:
                self.denied.append(refusal)
                self._reply(request, 403, {"Type": "User", "Message": refusal},
                            {"x-amzn-ErrorType": "AccessDeniedException"})
                return
        function = self.functions.get(name.rsplit(":", 1)[-1])
        if function is None:
            self._reply(request, 404, {"Type": "User", "Message": f"Function not found: {name}"},
                        {"x-amzn-ErrorType": "ResourceNotFoundException"})
            return
        invocation = Invocation(name, request.headers.get("X-Amz-Invocation-Type", "RequestResponse"),
                                json.loads(body))
        with self._lock:
            self.invocations.append(invocation)

        def run() -> None:
            try:
                invocation.result = function(json.loads(body), FakeContext())
            except BaseException as exc:  # recorded for the test to inspect, as Lambda would log it
                invocation.error = exc
            finally:
                invocation.done.set()

        if invocation.invocation_type == "Event":
            self._reply(request, 202, None)
            threading.Thread(target=run, daemon=True).start()
        else:
            run()
            self._reply(request, 200, invocation.result)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body, default=str).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until every invocation so far has finished."""
        with self._lock:
            pending = list(self.invocations)
        for invocation in pending:
            assert invocation.done.wait(timeout_s), f"invocation of {invocation.function} did not finish"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class AwsStack:
    api: ModuleType  # handler.api, freshly loaded with the AWS-shaped environment
    worker: ModuleType  # handler.worker, likewise
    fake_lambda: FakeLambda
    base_url: str
    bucket: str
    database_url: str
    token_key: str
    tick_secret: str
    secret_arns: dict[str, str]

    @property
    def settings(self) -> Settings:
        settings: Settings = self.api.get_settings()
        return settings

    def http_event(self, method: str, path: str, *, key: str | None = None, body: Any = None,
                   query: str = "") -> dict[str, Any]:
        """An API Gateway HTTP API (payload 2.0) event, from the recorded fixture."""
        event = load_event("apigw_v2_get_health.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["rawQueryString"] = query
        if key is not None:
            event["headers"]["authorization"] = f"Bearer {key}"
        if body is not None:
            event["body"] = json.dumps(body)
            event["headers"]["content-type"] = "application/json"
        return event

    def call(self, event: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.lambda_handler(event, FakeContext())
        return result


@pytest.fixture
def aws_stack_environment() -> dict[str, str]:
    """Variables `aws_stack` sets over the template's before the functions start; a test module
    overrides this fixture (test_template_policies.py: the storage role it creates)."""
    return {}


@pytest.fixture
def aws_stack(database_url: str, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
              restore_environ: None, aws_stack_environment: dict[str, str]) -> Iterator[AwsStack]:
    endpoint = moto_server.endpoint_url
    run_id = uuid.uuid4().hex[:10]
    bucket = f"deploy-{run_id}"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    ensure_bucket(Settings(s3_endpoint_url=endpoint, bucket=bucket))

    secretsmanager = boto3.client("secretsmanager", endpoint_url=endpoint, region_name="us-east-1")
    ssm = boto3.client("ssm", endpoint_url=endpoint, region_name="us-east-1")
    token_key = generated_token_key()
    tick_secret = secrets.token_urlsafe(24)
    arns = {
        # The shapes the template creates: generated JSON for the token keys, a plain string for
        # the tick secret; the database URL as a plain string (other shapes: test_references.py).
        "tokens": secretsmanager.create_secret(
            Name=f"tickweave/{run_id}/token-keys", SecretString=json.dumps({"kid": "k1", "key": token_key}))["ARN"],
        "tick": secretsmanager.create_secret(Name=f"tickweave/{run_id}/tick", SecretString=tick_secret)["ARN"],
        "db": secretsmanager.create_secret(Name=f"tickweave/{run_id}/db", SecretString=database_url)["ARN"],
    }
    ssm.put_parameter(Name=f"/tickweave/{run_id}/public-url", Value=base_url, Type="String")
    arns["public_url"] = ssm.get_parameter(Name=f"/tickweave/{run_id}/public-url")["Parameter"]["ARN"]

    fake_lambda = FakeLambda()
    for name in list(os.environ):
        if name.startswith("TICKWEAVE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in {
        # template.yaml's ApiFunction environment ...
        "TICKWEAVE_MODE": "lambda", "TICKWEAVE_LOCAL_WORKER": "", "TICKWEAVE_TRANSPORTS": "*=lambda",
        "TICKWEAVE_WORKER_FUNCTION": WORKER_FUNCTION, "TICKWEAVE_BUCKET": bucket,
        "TICKWEAVE_STORAGE_ROLE_ARN": STORAGE_ROLE, "DATABASE_URL_FROM": arns["db"],
        "TICKWEAVE_DB_HOST": "", "TICKWEAVE_DB_NAME": "",
        "TICKWEAVE_TOKEN_KEYS_FROM": arns["tokens"], "TICKWEAVE_TICK_SECRET_FROM": arns["tick"],
        "TICKWEAVE_PUBLIC_URL_FROM": arns["public_url"],
        # ... and WorkerFunction's (it shares TICKWEAVE_TOKEN_KEYS_FROM)
        "TICKWEAVE_WORKER": "tests.deploy.tasks:worker",
        # where boto3 finds the stand-ins
        "S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint, "AWS_ENDPOINT_URL_SSM": endpoint,
        "AWS_ENDPOINT_URL_LAMBDA": fake_lambda.endpoint_url,
        # connections idle for any time are checked before reuse (the default is 5 s)
        "TICKWEAVE_DB_CHECK_IDLE_S": "0",
        **aws_stack_environment,
    }.items():
        monkeypatch.setenv(name, value)

    import handler.api
    import handler.worker
    import tests.deploy.tasks

    importlib.reload(tests.deploy.tasks)
    worker_module = importlib.reload(handler.worker)
    api_module = importlib.reload(handler.api)
    fake_lambda.functions[WORKER_FUNCTION] = worker_module.lambda_handler

    server = uvicorn.Server(uvicorn.Config(api_module.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, "uvicorn did not start")
    try:
        yield AwsStack(api_module, worker_module, fake_lambda, base_url, bucket, database_url, token_key,
                       tick_secret, arns)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        fake_lambda.wait_idle()
        fake_lambda.close()
        api_module.get_runtime().engine.close()


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
