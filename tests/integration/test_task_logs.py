"""Task logs end to end: the worker SDK captures what each attempt logs and prints, stores it in
S3 beside the attempt's output with the attempt's own grant (presigned PUT, or the session
policy of a storage role), and `GET /api/tasks/{id}/attempts/{n}/log` reads it back for the
task's workspace, from an offset, while the task runs and after.

Real Postgres, the moto S3/STS server, the real SDK and the real Starlette app: the test plays
only the transport (it takes the dispatch messages and hands them to a Worker)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Database
from orchestrator.engine.outputs import MAX_CONTENT_ANSWER_BYTES
from orchestrator.engine.service import Engine
from orchestrator.storage.layout import attempt_log_key
from orchestrator.storage.s3 import ensure_bucket, orchestrator_s3
from orchestrator.storage.tokens import StorageGrant
from orchestrator.worker import TaskContext, TaskFailed, Worker
from orchestrator.worker.grant_io import GrantStorage
from orchestrator.worker.task_log import LOG_CAP_BYTES
from tests import capturing
from tests.polling import poll

from .test_attempt_storage_fencing import access_denied, create_storage_role, session_policies_enforced

WORKSPACE = "acme"
KEY = "logs-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE_S = 30.0


class Harness:
    """The engine (its dispatches kept by a capturing transport), the real app, and a Worker
    whose heartbeats and callbacks go to that app."""

    def __init__(self, engine: Engine, api: TestClient) -> None:
        self.engine = engine
        self.api = api
        self.worker = Worker(settings=engine.settings, send=self.send)
        # Set by the storage-role case: the callback is the orchestrator's own call to S3 (it
        # checks the output), made with its fake keys, which are not an IAM principal.
        self.callback_wrapper: Callable[[], Any] | None = None

    def send(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        path = httpx.URL(url).path
        if self.callback_wrapper is not None and path.startswith("/api/callback"):
            with self.callback_wrapper():
                answer: dict[str, Any] = self.api.post(path, json=body).json()
            return answer
        answer = self.api.post(path, json=body).json()
        return answer

    @property
    def transport(self) -> capturing.CapturingTransport:
        sent = self.engine.transports["local"]
        assert isinstance(sent, capturing.CapturingTransport)
        return sent

    def start(self, pipeline: dict[str, Any]) -> uuid.UUID:
        self.engine.create_pipeline(WORKSPACE, pipeline)
        return self.engine.trigger_run(WORKSPACE, pipeline["id"]).id

    def take(self, node: str) -> dict[str, Any]:
        return self.transport.take_node(node)

    def log(self, task_id: str, attempt: int = 1, *, offset: int | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
        query = "" if offset is None else f"?offset={offset}"
        response: httpx.Response = self.api.get(f"/api/tasks/{task_id}/attempts/{attempt}/log{query}",
                                                headers=headers or AUTH)
        return response


def _engine(database_url: str, moto_server: MotoServer, *, role: bool) -> Engine:
    bucket = f"logs-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url, bucket=bucket,
        storage_role_arn=create_storage_role(moto_server.endpoint_url, bucket) if role else None,
    )
    ensure_bucket(settings)
    engine = Engine(settings, Database(database_url, max_size=8), transports={"local": capturing.CapturingTransport()})
    engine.create_api_key(WORKSPACE, "admin", raw_key=KEY)
    return engine


@pytest.fixture
def harness(database_url: str, moto_server: MotoServer) -> Iterator[Harness]:
    """Without a storage role: the grant carries a presigned PUT for the log."""
    engine = _engine(database_url, moto_server, role=False)
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as api:
        yield Harness(engine, api)
    engine.close()


# --- what is captured, per task ---------------------------------------------------------------------


def test_each_task_logs_its_records_and_prints_and_not_a_concurrent_tasks(harness: Harness) -> None:
    harness.start({"id": "pair", "nodes": [{"id": "left", "task": "chatty"}, {"id": "right", "task": "chatty"}]})
    messages = [harness.take("left"), harness.take("right")]
    together = threading.Barrier(2, timeout=20)

    @harness.worker.task("chatty")
    def chatty(ctx: TaskContext) -> dict[str, Any]:
        for step in range(3):
            together.wait()  # each step of one task runs while the other's does
            print(f"print {step} from {ctx.node}")
            ctx.log.info("info %d from %s", step, ctx.node)
            logging.getLogger(f"user.{ctx.node}").warning("warning %d from %s", step, ctx.node)
            sys.stderr.write(f"stderr {step} from {ctx.node}\n")
        return {"node": ctx.node}

    # Both in one batch on two threads, as an SQS batch runs them.
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = harness.worker.execute_many(messages, executor=pool)
    assert all(isinstance(a, dict) and a.get("accepted") for a in answers), answers

    for message, other in zip(messages, ("right", "left"), strict=True):
        node = message["node"]
        response = harness.log(message["task_id"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["x-log-complete"] == "true"
        assert int(response.headers["x-log-size"]) == len(response.content)
        lines = response.text.splitlines()
        for step in range(3):
            assert f"print {step} from {node}" in lines
            assert f"stderr {step} from {node}" in lines
            assert any(line.endswith(f"Z INFO tickweave.task.chatty: info {step} from {node}") for line in lines)
            assert any(line.endswith(f"Z WARNING user.{node}: warning {step} from {node}") for line in lines)
        assert f"from {other}" not in response.text
        # Beside the attempt's output, as text.
        task, _ = harness.engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
        key = task["output"]["key"].rsplit("/", 1)[0] + "/log.txt"
        head = orchestrator_s3(harness.engine.settings).head_object(Bucket=harness.engine.settings.bucket, Key=key)
        assert head["ContentType"] == "text/plain; charset=utf-8"


def test_a_failing_tasks_log_holds_its_prints_and_its_traceback(harness: Harness) -> None:
    harness.start({"id": "fails", "nodes": [{"id": "only", "task": "breaks", "retry": {"max_attempts": 1}}]})
    message = harness.take("only")

    @harness.worker.task("breaks")
    def breaks(ctx: TaskContext) -> None:
        print("about to divide")
        ctx.log.warning("the denominator is %d", 0)
        _ = 1 / 0

    answer = harness.worker.execute(message)
    assert answer.get("accepted") is True, answer
    task, attempts = harness.engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
    assert task["status"] == "failed" and attempts[0]["status"] == "failed"

    response = harness.log(message["task_id"])
    assert response.status_code == 200 and response.headers["x-log-complete"] == "true"
    text = response.text
    assert "about to divide\n" in text
    assert "WARNING tickweave.task.breaks: the denominator is 0" in text
    assert f"ERROR tickweave.task.breaks: task {message['task_id']} attempt 1 raised" in text
    assert "Traceback (most recent call last):" in text
    assert "ZeroDivisionError: division by zero" in text
    assert text.index("about to divide") < text.index("Traceback")


def test_a_task_failed_on_purpose_logs_why(harness: Harness) -> None:
    harness.start({"id": "refuses", "nodes": [{"id": "only", "task": "refuses", "retry": {"max_attempts": 1}}]})
    message = harness.take("only")

    @harness.worker.task("refuses")
    def refuses(ctx: TaskContext) -> None:
        print("checking the input")
        raise TaskFailed("the input is empty", retryable=False)

    harness.worker.execute(message)
    text = harness.log(message["task_id"]).text
    assert "checking the input\n" in text
    assert "failed: the input is empty" in text


def test_the_log_is_capped_at_one_mebibyte_with_a_marker(harness: Harness) -> None:
    harness.start({"id": "loud", "nodes": [{"id": "only", "task": "loud"}]})
    message = harness.take("only")
    line = "y" * 99  # 100 bytes with its newline
    lines = (LOG_CAP_BYTES * 3 // 2) // 100

    @harness.worker.task("loud")
    def loud(ctx: TaskContext) -> None:
        print("first line")
        for _ in range(lines):
            print(line)

    harness.worker.execute(message)
    response = harness.log(message["task_id"])
    body = response.content
    assert len(body) <= LOG_CAP_BYTES and int(response.headers["x-log-size"]) == len(body)
    assert body.startswith(b"first line\n" + line.encode() + b"\n")
    kept, marker = body.rsplit(b"\n[log truncated: ", 1)
    assert marker.endswith(b" bytes dropped]\n")
    dropped = int(marker.removesuffix(b" bytes dropped]\n"))
    assert len(kept) + dropped == len("first line\n") + lines * 100
    assert len(kept) > LOG_CAP_BYTES - 100  # the first part is kept whole, up to the cap


# --- while it runs, and reading from an offset ---------------------------------------------------------


def test_the_log_is_readable_while_the_task_runs_and_from_an_offset(harness: Harness) -> None:
    # heartbeat_s 5 (the least a node may ask): the SDK stores the log at each heartbeat.
    harness.start({"id": "slow", "nodes": [{"id": "only", "task": "slow", "heartbeat_s": 5}]})
    message = harness.take("only")
    task_id = message["task_id"]
    started, release = threading.Event(), threading.Event()

    @harness.worker.task("slow")
    def slow(ctx: TaskContext) -> None:
        print("first line")
        started.set()
        assert release.wait(DEADLINE_S * 2), "the test never released the task"
        print("second line")

    runner = threading.Thread(target=harness.worker.execute, args=(message,))
    runner.start()
    try:
        assert started.wait(DEADLINE_S)
        # Running, nothing stored yet: an empty log, not complete (the first store is a
        # heartbeat away).
        early = harness.log(task_id)
        assert early.status_code == 200, early.text
        assert (early.content, early.headers["x-log-size"], early.headers["x-log-complete"]) == (b"", "0", "false")

        def first_line_stored() -> httpx.Response | None:
            response = harness.log(task_id)
            return response if response.content else None

        running = poll(first_line_stored, "timed out waiting for the running task's first line", DEADLINE_S)
        assert running.text == "first line\n"
        assert running.headers["x-log-complete"] == "false"
        size = int(running.headers["x-log-size"])
        assert size == len(running.content)
        # Nothing new from the end of what was read.
        same = harness.log(task_id, offset=size)
        assert (same.status_code, same.content, same.headers["x-log-size"]) == (200, b"", str(size))
    finally:
        release.set()
        runner.join(timeout=DEADLINE_S)

    # Finished: from the offset read so far, only what is new; complete.
    rest = harness.log(task_id, offset=size)
    assert rest.status_code == 200
    assert rest.text == "second line\n"
    assert rest.headers["x-log-complete"] == "true"
    assert int(rest.headers["x-log-size"]) == size + len(rest.content)
    whole = harness.log(task_id)
    assert whole.text == "first line\nsecond line\n"
    # An offset inside the log, and one past its end.
    assert harness.log(task_id, offset=6).text == "line\nsecond line\n"
    beyond = harness.log(task_id, offset=10_000)
    assert (beyond.status_code, beyond.content, beyond.headers["x-log-size"]) == (200, b"", str(len(whole.content)))


# --- who may read, and bad requests --------------------------------------------------------------------


def test_another_workspaces_task_is_not_found_and_bad_numbers_are_refused(harness: Harness) -> None:
    harness.start({"id": "quiet", "nodes": [{"id": "only", "task": "quiet"}]})
    message = harness.take("only")

    @harness.worker.task("quiet")
    def quiet(ctx: TaskContext) -> None:
        print("in acme")

    harness.worker.execute(message)
    task_id = message["task_id"]
    assert harness.log(task_id).text == "in acme\n"

    harness.engine.create_api_key("other", "admin", raw_key="other-admin-key")
    foreign = harness.log(task_id, headers={"Authorization": "Bearer other-admin-key"})
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "not_found"
    assert "in acme" not in foreign.text

    missing_attempt = harness.log(task_id, attempt=2)
    assert missing_attempt.status_code == 404 and "no attempt 2" in missing_attempt.json()["error"]["message"]
    assert harness.log(str(uuid.uuid4())).status_code == 404
    for bad in ("0", "-1", "one", "1.5", "99999999999"):
        response = harness.api.get(f"/api/tasks/{task_id}/attempts/{bad}/log", headers=AUTH)
        assert response.status_code == 422, (bad, response.text)
        assert "attempt number" in response.json()["error"]["message"]
    for bad in ("-1", "x", "1e3", ""):
        response = harness.api.get(f"/api/tasks/{task_id}/attempts/1/log?offset={bad}", headers=AUTH)
        assert response.status_code == 422, (bad, response.text)
        assert "offset" in response.json()["error"]["message"]
    assert harness.api.get(f"/api/tasks/{task_id}/attempts/1/log").status_code == 401


def test_a_finished_attempt_that_stored_no_log_is_not_found(harness: Harness) -> None:
    # No task of that name in the worker: the attempt fails before any task function runs.
    harness.start({"id": "unknown", "nodes": [{"id": "only", "task": "nobody-runs-this", "retry": {"max_attempts": 1}}]})
    message = harness.take("only")
    harness.worker.execute(message)
    task, _ = harness.engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
    assert task["status"] == "failed"
    response = harness.log(message["task_id"])
    assert response.status_code == 404
    assert "stored no log" in response.json()["error"]["message"]


# --- the grant: presigned PUT, or the storage role's session policy ------------------------------------


def test_the_grant_names_the_attempts_log_key_beside_its_output(harness: Harness) -> None:
    run_id = harness.start({"id": "granted", "nodes": [{"id": "only", "task": "quiet"}]})
    message = harness.take("only")
    grant = harness.engine.keyring.read(message["token"]).storage
    assert grant is not None
    assert grant.log_key == attempt_log_key(WORKSPACE, "granted", str(run_id), "default", "only", 1)
    assert grant.log_key.rsplit("/", 1)[0] == grant.output_key.rsplit("/", 1)[0]
    assert grant.presigned_log_put is not None and grant.credentials is None
    url = httpx.URL(grant.presigned_log_put)
    assert url.path == f"/{harness.engine.settings.bucket}/{grant.log_key}"
    # The log's URL writes the log and nothing else: its signature covers the log's path and
    # Content-Type, and is not the one S3 would expect for the output key (moto does not check
    # presigned signatures; S3 would answer SignatureDoesNotMatch).
    bucket = harness.engine.settings.bucket
    assert url.params["X-Amz-SignedHeaders"] == "content-type;host"
    assert _presigned_put_signature(url, f"/{bucket}/{grant.log_key}") == url.params["X-Amz-Signature"]
    assert _presigned_put_signature(url, f"/{bucket}/{grant.output_key}") != url.params["X-Amz-Signature"]


def _presigned_put_signature(url: httpx.URL, path: str) -> str:
    """The SigV4 query signature S3 expects for a PUT of `path` (text/plain; charset=utf-8)
    with the query of `url`, everything but the signature."""
    params = {k: v for k, v in url.params.multi_items() if k != "X-Amz-Signature"}
    request = AWSRequest(method="PUT", url=str(url.copy_with(path=path, query=None)), params=params,
                         headers={"Content-Type": "text/plain; charset=utf-8"})
    request.url = request.prepare().url
    request.context["timestamp"] = url.params["X-Amz-Date"]
    credentials = boto3.session.Session().get_credentials()
    assert credentials is not None
    auth = S3SigV4QueryAuth(credentials.get_frozen_credentials(), "s3", "us-east-1",
                            expires=int(url.params["X-Amz-Expires"]))
    return str(auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request))


@pytest.fixture
def role_harness(database_url: str, moto_server: MotoServer) -> Iterator[Harness]:
    """With a storage role: workers hold STS credentials narrowed by a session policy, which
    moto enforces here (see session_policies_enforced)."""
    from moto.core.authorization import disable_iam_authentication

    engine = _engine(database_url, moto_server, role=True)
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as api:
        harness = Harness(engine, api)
        harness.callback_wrapper = disable_iam_authentication
        yield harness
    engine.close()


def test_with_a_storage_role_the_session_policy_lets_the_attempt_write_its_own_log_only(
    role_harness: Harness,
) -> None:
    harness = role_harness
    # `a` asks for credentials; `b` has the default (presigned URLs), so its log is not a's to write.
    harness.start({"id": "scoped", "nodes": [{"id": "a", "task": "scoped", "storage": "credentials"},
                                            {"id": "b", "task": "scoped"}]})
    first, second = harness.take("a"), harness.take("b")

    @harness.worker.task("scoped")
    def scoped(ctx: TaskContext) -> dict[str, Any]:
        print(f"printed by {ctx.node}")
        ctx.log.info("logged by %s", ctx.node)
        return {"ok": True}

    grant = harness.engine.keyring.read(first["token"]).storage
    other = harness.engine.keyring.read(second["token"]).storage
    assert grant is not None and grant.credentials is not None and grant.presigned_log_put is None
    assert other is not None and other.log_key is not None

    with session_policies_enforced():
        answer = harness.worker.execute(first)
        # The same credentials cannot write another task's log (its key is under runs/, which
        # the role's ceiling allows: only the session policy keeps it out).
        intruder = GrantStorage(StorageGrant(**{**grant.__dict__, "log_key": other.log_key}))
        assert access_denied(lambda: intruder.write_log(b"not mine"))
    assert answer.get("accepted") is True, answer

    response = harness.log(first["task_id"])
    assert response.status_code == 200 and response.headers["x-log-complete"] == "true"
    assert "printed by a\n" in response.text
    assert "INFO tickweave.task.scoped: logged by a" in response.text
    # Task b never ran: its attempt is dispatched, with no log yet.
    pending = harness.log(second["task_id"])
    assert (pending.status_code, pending.content, pending.headers["x-log-complete"]) == (200, b"", "false")


def test_each_item_of_a_mapped_node_has_its_own_log(harness: Harness) -> None:
    run_id = harness.start({"id": "fanned", "nodes": [
        {"id": "each", "task": "item", "params": {"names": ["x", "y"]}, "map": {"over": "params.names"}}]})
    children = sorted(harness.transport.remove(lambda m: m["node"] == "each"), key=lambda m: m["map"]["index"])
    assert [m["map"]["item"] for m in children] == ["x", "y"]

    @harness.worker.task("item")
    def item(ctx: TaskContext) -> None:
        print(f"item {ctx.item} at {ctx.index}")

    for message in children:
        harness.worker.execute(message)
    for message in children:
        index = message["map"]["index"]
        grant = harness.engine.keyring.read(message["token"]).storage
        assert grant is not None and grant.log_key is not None
        assert grant.log_key.startswith(f"runs/{WORKSPACE}/fanned/{run_id}/default/nodes/each/items/{index}/")
        response = harness.log(message["task_id"])
        assert response.status_code == 200, response.text
        assert response.text == f"item {message['map']['item']} at {index}\n"


# --- GET /api/tasks/{id}/output: the content a step stored, declared under `outputs:` or not, for
# its workspace only, never more than an API answer may carry (Lambda stops at 6 MB) ---------------
def _output(harness: Harness, task_id: str, headers: dict[str, str] | None = None) -> Any:
    return harness.api.get(f"/api/tasks/{task_id}/output", headers=headers or AUTH)


def test_a_steps_output_is_served_though_the_pipeline_declares_none(harness: Harness) -> None:
    harness.start({"id": "plain", "nodes": [{"id": "first", "task": "emit"}, {"id": "second", "task": "emit",
                                                                             "depends": ["first"]}]})
    first = harness.take("first")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node, "rows": [1, 2, 3]}

    assert harness.worker.execute(first)["accepted"]
    response = _output(harness, first["task_id"])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content) == {"node": "first", "rows": [1, 2, 3]}

    # The second step has not run: no output yet, a 404 that says so.
    second = harness.take("second")
    pending = _output(harness, second["task_id"])
    assert pending.status_code == 404
    assert "has no stored output" in pending.json()["error"]["message"]


def test_another_workspaces_task_a_bad_id_and_no_key_are_refused(harness: Harness) -> None:
    harness.start({"id": "private", "nodes": [{"id": "only", "task": "emit"}]})
    message = harness.take("only")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"secret": "only for acme"}

    assert harness.worker.execute(message)["accepted"]
    harness.engine.create_api_key("intruder", "admin", raw_key="intruder-key")
    stolen = _output(harness, message["task_id"], {"Authorization": "Bearer intruder-key"})
    assert stolen.status_code == 404 and "only for acme" not in stolen.text
    assert _output(harness, str(uuid.uuid4())).status_code == 404
    malformed = _output(harness, "not-a-uuid")  # as every task route answers a malformed id
    assert malformed.status_code == 404 and "task" in malformed.json()["error"]["message"]
    assert harness.api.get(f"/api/tasks/{message['task_id']}/output").status_code == 401


def test_an_output_larger_than_an_answer_may_carry_is_refused_with_its_key(harness: Harness) -> None:
    harness.start({"id": "bulky", "nodes": [{"id": "only", "task": "emit"}]})
    message = harness.take("only")

    @harness.worker.task("emit")
    def emit(ctx: TaskContext) -> dict[str, Any]:
        return {"ok": True}

    assert harness.worker.execute(message)["accepted"]
    task, _ = harness.engine.get_task(WORKSPACE, uuid.UUID(message["task_id"]))
    key = task["output"]["key"]
    # Grown in place past the answer limit (a worker may write any size; the API may not answer it).
    orchestrator_s3(harness.engine.settings).put_object(
        Bucket=harness.engine.settings.bucket, Key=key, Body=b"[" + b"0," * (MAX_CONTENT_ANSWER_BYTES // 2) + b"0]")
    response = _output(harness, message["task_id"])
    assert response.status_code == 413, response.text
    message_text = response.json()["error"]["message"]
    assert key in message_text and "6 MB" in message_text
