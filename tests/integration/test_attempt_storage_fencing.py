"""Fencing that reaches the object store: every attempt writes under its own attempt prefix, its
credentials cannot write another attempt's keys, downstream reads the accepted attempt's key,
a stale attempt's late output and callback change nothing, and the callback's S3 I/O happens
outside the transaction that records it.

Real Postgres and the moto S3/STS server. moto checks IAM only when told to, and even then
evaluates the role's own policies but not the inline session policy of AssumeRole; on AWS the
effective permissions are the role's policies intersected with the session policy.
`session_policies_enforced` turns IAM checks on and adds that intersection, so the grants are
tested by what the store refuses, not only by what the policy document says.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from unittest import mock

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database
from orchestrator.engine.completion import AttemptResult
from orchestrator.engine.outputs import prepare_task_outputs
from orchestrator.engine.service import Engine
from orchestrator.storage.s3 import encode_json, ensure_bucket, orchestrator_s3, read_json_object, sha256_hex
from orchestrator.storage.tokens import StorageGrant
from orchestrator.store import dispatch as dispatch_store
from orchestrator.store import outputs as output_store
from orchestrator.worker import StaleAttempt, TaskContext, Worker
from orchestrator.worker.grant_io import GrantStorage
from tests import capturing

from .test_scheduling import set_clock

WORKSPACE = "acme"
ACCOUNT = "123456789012"

# The node that hangs: a heartbeat lease of 2 x 30 s, retried at once when it lapses. It asks for
# storage credentials (`storage: credentials`); `down` has the default, presigned URLs.
PIPELINE: dict[str, Any] = {
    "id": "fenced",
    "nodes": [
        {"id": "up", "task": "echo", "heartbeat_s": 30, "retry": {"max_attempts": 3, "base_delay_s": 0},
         "storage": "credentials"},
        {"id": "down", "task": "echo", "depends": ["up"]},
    ],
    "outputs": {"result": {"from": "up", "schema": {"type": "object", "required": ["attempt"]}}},
}
# The same with every node on the default: a grant of presigned URLs, one per key.
PIPELINE_URLS: dict[str, Any] = {
    **PIPELINE, "id": "fenced-urls",
    "nodes": [{k: v for k, v in node.items() if k != "storage"} for node in PIPELINE["nodes"]],
}


# --- moto with session policies enforced --------------------------------------------------------


@contextmanager
def session_policies_enforced() -> Iterator[None]:
    """IAM checks on in the (in-process) moto server, with AssumeRole session policies applied as
    AWS applies them: a request of assumed-role credentials needs the role's policies AND the
    session policy to allow it. Only worker-side calls belong inside: the orchestrator's own
    fake keys are not an IAM user and would be refused."""
    from moto.core.authorization import enable_iam_authentication
    from moto.iam.access_control import AssumedRoleAccessKey, IAMPolicy, IAMRequestBase, PermissionResult
    from moto.sts.models import sts_backends

    role_policies_only = IAMRequestBase.check_action_permitted

    def check_action_permitted(self: Any, resource: str) -> None:
        role_policies_only(self, resource)
        key = self._access_key
        if not isinstance(key, AssumedRoleAccessKey):
            return
        for assumed in sts_backends[key.account_id][key.partition].assumed_roles:
            if assumed.access_key_id == key._access_key_id and assumed.policy:
                verdict = IAMPolicy(assumed.policy).is_action_permitted(self._action, resource)
                if verdict != PermissionResult.PERMITTED:
                    self._raise_access_denied()

    with mock.patch.object(IAMRequestBase, "check_action_permitted", check_action_permitted), \
            enable_iam_authentication():
        yield


def create_storage_role(endpoint_url: str, bucket: str) -> str:
    """The worker storage role of template.yaml: its ceiling is PutObject on runs/* and GetObject
    on runs/* and outputs/*; each task's session policy narrows it."""
    iam = boto3.client("iam", endpoint_url=endpoint_url, region_name="us-east-1")
    name = f"storage-{uuid.uuid4().hex[:10]}"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                       "Action": "sts:AssumeRole"}],
    }))
    iam.put_role_policy(RoleName=name, PolicyName="ceiling", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/runs/*"},
            {"Effect": "Allow", "Action": "s3:GetObject",
             "Resource": [f"arn:aws:s3:::{bucket}/runs/*", f"arn:aws:s3:::{bucket}/outputs/*"]},
        ],
    }))
    return str(role["Role"]["Arn"])


def access_denied(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] == "AccessDenied"
    return False


# --- an engine whose dispatches the test plays as the worker --------------------------------------


class CapturingTransport(capturing.CapturingTransport):
    def take(self, node: str) -> dict[str, Any]:
        return self.take_node(node)


@pytest.fixture
def engine(database_url: str, moto_server: MotoServer) -> Iterator[Engine]:
    bucket = f"fence-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        database_url=database_url, local_worker=None, s3_endpoint_url=moto_server.endpoint_url, bucket=bucket,
        storage_role_arn=create_storage_role(moto_server.endpoint_url, bucket),
    )
    ensure_bucket(settings)
    eng = Engine(settings, Database(database_url, max_size=8), transports={"local": CapturingTransport()})
    eng.create_api_key(WORKSPACE, "admin", raw_key="fence-admin-key")
    yield eng
    eng.close()


def transport(engine: Engine) -> CapturingTransport:
    sent = engine.transports["local"]
    assert isinstance(sent, CapturingTransport)
    return sent


def grant_of(engine: Engine, message: dict[str, Any]) -> StorageGrant:
    grant = engine.keyring.read(message["token"]).storage
    assert grant is not None
    # Credentials (for a node that asked for them) or presigned URLs, never both.
    assert (grant.presigned_put is None) == (grant.credentials is not None)
    return grant


def write_as(grant: StorageGrant, value: Any) -> dict[str, Any]:
    """Write an attempt's output with its own grant, as the SDK does; the callback's output."""
    body = encode_json(value)
    if grant.credentials is None:
        # moto's IAM checks cannot read a presigned (query-string) signature: URLs go unenforced.
        GrantStorage(grant).write_output(body)
    else:
        with session_policies_enforced():
            GrantStorage(grant).write_output(body)
    return {"key": grant.output_key, "size": len(body), "sha256": sha256_hex(body)}


def call_back(engine: Engine, message: dict[str, Any], output: dict[str, Any]) -> AttemptResult:
    return engine.record_callback(uuid.UUID(message["task_id"]), message["token"], status="succeeded",
                                  output=output, error=None)


def start_hanging_attempt(
    engine: Engine, pipeline: dict[str, Any] = PIPELINE,
) -> tuple[uuid.UUID, dict[str, Any]]:
    """A run whose `up` is claimed and started by a worker (attempt 1), which then hangs."""
    engine.create_pipeline(WORKSPACE, pipeline)
    run = engine.trigger_run(WORKSPACE, pipeline["id"])
    first = transport(engine).take("up")
    assert first["attempt"] == 1
    accepted, status, _ = engine.record_heartbeat(first["token"], progress=None, message=None)
    assert accepted and status == "running"
    return run.id, first


def expire_and_retry(engine: Engine, first: dict[str, Any]) -> dict[str, Any]:
    """The hanging attempt's lease lapses; the tick retries the task: attempt 2's dispatch."""
    set_clock(engine, datetime.now(UTC) + timedelta(minutes=10))
    summary = engine.tick()
    assert summary.expired == 1, summary
    second = transport(engine).take("up")
    assert (second["task_id"], second["attempt"]) == (first["task_id"], 2)
    return second


def read_raw(engine: Engine, key: str) -> bytes:
    body: bytes = orchestrator_s3(engine.settings).get_object(Bucket=engine.settings.bucket, Key=key)["Body"].read()
    return body


def keys_under(engine: Engine, prefix: str) -> list[str]:
    listed = orchestrator_s3(engine.settings).list_objects_v2(Bucket=engine.settings.bucket, Prefix=prefix)
    return [obj["Key"] for obj in listed.get("Contents", [])]


# --- (a) an attempt's grant cannot write another attempt's keys -----------------------------------


def test_a_credentials_nodes_session_writes_under_its_own_node_in_its_run_only(engine: Engine) -> None:
    """`storage: credentials` nodes share one session per run (issue 15: no AssumeRole per task).
    It writes under those nodes' prefixes in the run: every attempt of the node, not the run's
    other nodes, not another run, not another workspace, and nothing outside runs/."""
    run_id, first = start_hanging_attempt(engine)
    second = expire_and_retry(engine, first)
    grant1, grant2 = grant_of(engine, first), grant_of(engine, second)
    assert grant1.output_key != grant2.output_key
    assert grant1.credentials is not None and grant2.credentials is not None
    # One session for both attempts: the retry made no AssumeRole of its own.
    assert grant1.credentials["AccessKeyId"] == grant2.credentials["AccessKeyId"]
    prefix1, prefix2 = (g.output_key.rsplit("/", 1)[0] + "/" for g in (grant1, grant2))
    node = f"runs/{WORKSPACE}/fenced/{run_id}/default/nodes/up/"
    assert (prefix1, prefix2) == (node + "attempts/1/", node + "attempts/2/")
    bucket = engine.settings.bucket
    worker1 = GrantStorage(grant1)._s3()
    other_run = f"runs/{WORKSPACE}/fenced/{uuid.uuid4()}/default/nodes/up/attempts/1/output.json"

    with session_policies_enforced():
        # Its own output and log, and (the scope is the node, not the attempt) attempt 2's keys.
        for key in (grant1.output_key, prefix1 + "log.txt", grant2.output_key):
            worker1.put_object(Bucket=bucket, Key=key, Body=b"{}", ContentType="application/json")
        # Not another node of the run (nor one whose id starts the same), another run's node,
        # another workspace's run, a pipeline output, or the node's unscoped key.
        for key in (f"runs/{WORKSPACE}/fenced/{run_id}/default/nodes/down/attempts/1/output.json",
                    f"runs/{WORKSPACE}/fenced/{run_id}/default/nodes/upper/attempts/1/output.json",
                    other_run, other_run.replace(f"runs/{WORKSPACE}/", "runs/globex/"),
                    f"outputs/{WORKSPACE}/fenced/{run_id}/default/result/attempts/1.json", node.rstrip("/")):
            assert access_denied(partial(worker1.put_object, Bucket=bucket, Key=key, Body=b"stale")), key
        # It reads its own run's objects (the session is the run's), not another run's.
        assert worker1.get_object(Bucket=bucket, Key=grant2.output_key)["Body"].read() == b"{}"
        assert access_denied(lambda: worker1.get_object(Bucket=bucket, Key=other_run))

    # Not a vacuous refusal: the role's own ceiling (runs/*) allows another run's key; only the
    # session policy keeps it out.
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        worker1.put_object(Bucket=bucket, Key=other_run, Body=b"role ceiling allows it")


def test_a_default_nodes_grant_holds_no_credentials_only_its_own_urls(engine: Engine) -> None:
    run_id, first = start_hanging_attempt(engine, PIPELINE_URLS)
    grant = grant_of(engine, first)
    assert grant.credentials is None
    assert grant.presigned_put is not None and grant.presigned_log_put is not None
    bucket = engine.settings.bucket
    assert httpx.URL(grant.presigned_put).path == f"/{bucket}/{grant.output_key}"
    assert httpx.URL(grant.presigned_log_put).path == f"/{bucket}/{grant.log_key}"
    assert grant.output_key.startswith(f"runs/{WORKSPACE}/fenced-urls/{run_id}/default/nodes/up/attempts/1/")
    # The URLs are signed with the storage role's session, which the worker never sees (the token
    # carries no secret). (moto's IAM checks cannot evaluate a presigned request's signature, so
    # they are off here; the URL's scope to one key is its signature's.)
    assert "X-Amz-Security-Token" in httpx.URL(grant.presigned_put).params
    GrantStorage(grant).write_output(b'{"attempt":1}')
    GrantStorage(grant).write_log(b"log")
    assert read_json_object(engine.settings, grant.output_key) == {"attempt": 1}
    assert "SecretAccessKey" not in json.dumps(grant.to_dict())


def _presigned_signature(url: str, path: str) -> str:
    """The SigV4 query signature the store expects for a PUT of `path` with the query of `url`
    (everything but the signature): what S3 recomputes to accept or refuse a presigned URL."""
    parsed = httpx.URL(url)
    params = {k: v for k, v in parsed.params.multi_items() if k != "X-Amz-Signature"}
    request = AWSRequest(method="PUT", url=str(parsed.copy_with(path=path, query=None)), params=params,
                         headers={"Content-Type": "application/json"})
    request.url = request.prepare().url
    request.context["timestamp"] = parsed.params["X-Amz-Date"]
    credentials = boto3.session.Session().get_credentials()
    assert credentials is not None
    auth = S3SigV4QueryAuth(credentials.get_frozen_credentials(), "s3", "us-east-1",
                            expires=int(parsed.params["X-Amz-Expires"]))
    return str(auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request))


def test_a_presigned_grant_signs_its_own_attempts_key_only(engine: Engine) -> None:
    # No storage role: the grant is a presigned PUT per attempt.
    engine.settings = engine.settings.with_overrides(storage_role_arn=None)
    engine.dispatcher.settings = engine.settings
    _, first = start_hanging_attempt(engine)
    second = expire_and_retry(engine, first)
    grant1, grant2 = (engine.keyring.read(m["token"]).storage for m in (first, second))
    assert grant1 is not None and grant2 is not None
    assert grant1.credentials is None and grant1.presigned_put is not None
    assert grant1.output_key != grant2.output_key
    url = httpx.URL(grant1.presigned_put)
    bucket = engine.settings.bucket
    assert url.path == f"/{bucket}/{grant1.output_key}"
    # The signature covers the path: it verifies for attempt 1's key and not for attempt 2's
    # (S3 answers SignatureDoesNotMatch to the URL pointed at another key).
    assert _presigned_signature(str(url), f"/{bucket}/{grant1.output_key}") == url.params["X-Amz-Signature"]
    assert _presigned_signature(str(url), f"/{bucket}/{grant2.output_key}") != url.params["X-Amz-Signature"]
    assert httpx.put(str(url), content=b'{"attempt":1}', headers={"Content-Type": "application/json"}).is_success
    assert read_json_object(engine.settings, grant1.output_key) == {"attempt": 1}


# --- (b) the whole scenario --------------------------------------------------------------------


def test_a_stale_attempt_cannot_overwrite_the_accepted_output_and_downstream_keeps_reading_it(
    engine: Engine,
) -> None:
    # Default nodes: each attempt's grant is a presigned PUT for its own key alone (a node with
    # `storage: credentials` shares a session across its attempts; see the test above).
    run_id, first = start_hanging_attempt(engine, PIPELINE_URLS)
    second = expire_and_retry(engine, first)

    # Attempt 2 succeeds; downstream is dispatched with attempt 2's key as its input.
    accepted = write_as(grant_of(engine, second), {"attempt": 2})
    assert call_back(engine, second, accepted).outcome == "succeeded"
    down = transport(engine).take("down")
    assert down["inputs"] == {"up": {"key": accepted["key"]}}
    accepted_body = read_raw(engine, accepted["key"])

    # Attempt 1 wakes up: its grant is still valid, but it cannot reach attempt 2's object...
    grant1 = grant_of(engine, first)
    assert grant1.credentials is None and grant1.presigned_put is not None
    url = httpx.URL(grant1.presigned_put)
    assert url.path == f"/{engine.settings.bucket}/{grant1.output_key}" != f"/{engine.settings.bucket}/{accepted['key']}"
    # (That the signature covers the path alone is test_a_presigned_grant_signs_its_own_attempts_key_only.)
    # ...it writes its own (attempt-scoped) key, and its callback is refused as stale.
    stale = write_as(grant1, {"attempt": 1})
    assert stale["key"] != accepted["key"]
    refused = call_back(engine, first, stale)
    assert (refused.accepted, refused.outcome) == (False, "stale_attempt")

    # Nothing moved: attempt 2's object, the task's output, downstream's input, the pipeline output.
    assert read_raw(engine, accepted["key"]) == accepted_body
    up, _ = engine.get_task(WORKSPACE, uuid.UUID(second["task_id"]))
    assert (up["status"], up["attempt"], up["output"]["key"]) == ("succeeded", 2, accepted["key"])
    with engine.db.connection() as conn:
        context = dispatch_store.dispatch_context(conn, [uuid.UUID(down["task_id"])], [])
        (persisted,) = output_store.outputs_of_run(conn, run_id)
    assert context.inputs[uuid.UUID(down["task_id"])] == {"up": {"key": accepted["key"]}}
    assert persisted["sha256"] == accepted["sha256"]
    assert json.loads(engine.output_content(WORKSPACE, persisted["id"])) == {"attempt": 2}
    # Downstream reads attempt 2's value with its own grant (a presigned GET of that key).
    assert GrantStorage(grant_of(engine, down)).read_json(accepted["key"]) == {"attempt": 2}


# --- (c) the SDK stops once its heartbeat is refused as stale ------------------------------------


@pytest.mark.parametrize("task_behaviour", ["lets_it_raise", "swallows_it"])
def test_the_sdk_stops_without_output_or_callback_when_its_heartbeat_is_refused(
    engine: Engine, task_behaviour: str,
) -> None:
    engine.create_pipeline(WORKSPACE, PIPELINE)
    engine.trigger_run(WORKSPACE, "fenced")
    first = transport(engine).take("up")
    posts: list[str] = []

    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as api:

        def send(url: str, body: dict[str, Any]) -> dict[str, Any]:
            """The SDK's POSTs, to the real API routes."""
            path = httpx.URL(url).path
            posts.append(path)
            answer: dict[str, Any] = api.post(path, json=body).json()
            return answer

        worker = Worker(settings=engine.settings, send=send)
        seen: dict[str, Any] = {}

        @worker.task("echo")
        def hang_then_resume(ctx: TaskContext) -> dict[str, Any]:
            # The worker stalls (a GC pause, a frozen container) past its lease; the tick gives
            # the task to attempt 2. Then it resumes and reports progress.
            seen["second"] = expire_and_retry(engine, first)
            try:
                ctx.heartbeat(progress=0.9)
            except StaleAttempt as exc:
                seen["raised"] = exc.reason
                if task_behaviour == "lets_it_raise":
                    raise
            return {"attempt": 1, "late": True}

        answer = worker.execute(first, settings=engine.settings)

    assert seen["raised"] == "stale_attempt"
    assert answer["accepted"] is False and answer["reason"] == "stale_attempt"
    assert posts == ["/api/heartbeat", "/api/heartbeat"]  # the first, the refused one; no callback
    grant1 = grant_of(engine, first)
    assert keys_under(engine, grant1.output_key.rsplit("/", 1)[0] + "/") == []  # nothing written
    task, attempts = engine.get_task(WORKSPACE, uuid.UUID(first["task_id"]))
    assert (task["status"], task["attempt"]) == ("dispatched", 2)
    assert [a["status"] for a in attempts] == ["expired", "dispatched"]  # as the tick left them


# --- part 2: the callback's S3 I/O happens outside its transaction --------------------------------


@pytest.fixture
def s3_calls(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every call of the orchestrator's S3 client, with whether a transaction was open (and so
    row locks possibly held) in the calling thread at the time."""
    calls: list[tuple[str, bool]] = []
    state = threading.local()
    original_transaction = engine.db.transaction

    @contextmanager
    def transaction() -> Iterator[Connection]:
        state.depth = getattr(state, "depth", 0) + 1
        try:
            with original_transaction() as conn:
                yield conn
        finally:
            state.depth -= 1

    monkeypatch.setattr(engine.db, "transaction", transaction)
    client = orchestrator_s3(engine.settings)
    for name in ("get_object", "put_object", "head_object"):
        original = getattr(client, name)

        def recorded(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append((_name, getattr(state, "depth", 0) > 0))
            return _original(*args, **kwargs)

        monkeypatch.setattr(client, name, recorded)
    return calls


def test_the_callback_transaction_makes_no_s3_call(engine: Engine, s3_calls: list[tuple[str, bool]]) -> None:
    run_id, first = start_hanging_attempt(engine)
    output = write_as(grant_of(engine, first), {"attempt": 1})
    s3_calls.clear()
    assert call_back(engine, first, output).outcome == "succeeded"
    # The node output was read and the pipeline output written, both with no transaction open.
    assert ("get_object", False) in s3_calls and ("put_object", False) in s3_calls
    assert [call for call in s3_calls if call[1]] == []
    with engine.db.connection() as conn:
        (persisted,) = output_store.outputs_of_run(conn, run_id)
    assert persisted["key"].endswith("/result/attempts/1.json")
    assert json.loads(engine.output_content(WORKSPACE, persisted["id"])) == {"attempt": 1}


def test_an_output_breaking_its_schema_still_fails_the_attempt(
    engine: Engine, s3_calls: list[tuple[str, bool]],
) -> None:
    run_id, first = start_hanging_attempt(engine)
    output = write_as(grant_of(engine, first), {"no": "attempt field"})
    s3_calls.clear()
    result = call_back(engine, first, output)
    assert (result.accepted, result.outcome, result.dead_lettered) == (True, "failed", True)
    assert [call for call in s3_calls if call[1]] == []
    assert ("put_object", False) not in s3_calls  # refused before anything was persisted
    task, _ = engine.get_task(WORKSPACE, uuid.UUID(first["task_id"]))
    assert task["error"]["code"] == "output_schema_invalid"
    with engine.db.connection() as conn:
        assert output_store.outputs_of_run(conn, run_id) == []


def test_a_stale_attempts_late_output_io_never_replaces_the_accepted_pipeline_output(
    engine: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_id, first = start_hanging_attempt(engine)
    stale_output = write_as(grant_of(engine, first), {"attempt": 1})
    accepted: dict[str, Any] = {}

    def prepare_after_attempt_2_won(db: Database, settings: Settings, task: dict[str, Any],
                                    node_output: dict[str, Any] | None) -> Any:
        if task["attempt"] == 1 and not accepted:
            # Attempt 1 was current when its callback began; while its I/O is about to run, its
            # lease lapses and attempt 2 succeeds, its pipeline output persisted and indexed.
            second = expire_and_retry(engine, first)
            accepted.update(write_as(grant_of(engine, second), {"attempt": 2}))
            assert call_back(engine, second, dict(accepted)).outcome == "succeeded"
        return prepare_task_outputs(db, settings, task, node_output)

    monkeypatch.setattr("orchestrator.engine.worker_protocol.prepare_task_outputs", prepare_after_attempt_2_won)
    refused = call_back(engine, first, stale_output)

    assert (refused.accepted, refused.outcome) == (False, "stale_attempt")
    with engine.db.connection() as conn:
        (persisted,) = output_store.outputs_of_run(conn, run_id)
    # Attempt 1's I/O wrote its own copy, beside attempt 2's and unindexed; the index and the
    # bytes it points at are attempt 2's.
    assert persisted["sha256"] == accepted["sha256"]
    assert json.loads(engine.output_content(WORKSPACE, persisted["id"])) == {"attempt": 2}
    assert persisted["key"].endswith("/result/attempts/2.json")
    stale_copy = persisted["key"].replace("/attempts/2.json", "/attempts/1.json")
    assert read_json_object(engine.settings, stale_copy) == {"attempt": 1}
