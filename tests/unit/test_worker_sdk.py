"""The worker SDK end to end against the moto server, with a fake orchestrator (`send`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.storage.layout import (
    map_item_attempt_prefix,
    map_item_output_key,
    map_items_prefix,
    map_manifest_key,
    node_attempt_prefix,
    node_output_key,
    pipeline_output_key,
)
from orchestrator.storage.s3 import ensure_bucket, issue_storage_grant, put_json_object, read_json_object
from orchestrator.storage.tokens import TaskClaims, TokenKeyring, map_digest, params_digest
from orchestrator.worker import StaleAttempt, TaskContext, TaskFailed, Worker
from orchestrator.worker.http import HttpSender, StorageHTTPError, TransientHTTPError

CALLBACK = "http://orchestrator.test/api/callback/"
HEARTBEAT = "http://orchestrator.test/api/heartbeat"
ROLE_ARN = "arn:aws:iam::123456789012:role/tickweave-storage"


class FakeOrchestrator:
    """Records every POST and answers like the API would for a current attempt."""

    def __init__(self, heartbeat_answer: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.heartbeat_answer = heartbeat_answer or {"accepted": True}
        self.heartbeat_seen = threading.Condition()
        self._lock = threading.Lock()

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append((url, body))
        if url == HEARTBEAT:
            with self.heartbeat_seen:
                self.heartbeat_seen.notify_all()
            return dict(self.heartbeat_answer)
        return {"accepted": True, "status": body["status"]}

    def heartbeats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [body for url, body in self.calls if url == HEARTBEAT]

    def callbacks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [body for url, body in self.calls if url.startswith(CALLBACK)]

    def wait_for_heartbeats(self, count: int, timeout: float = 10.0) -> bool:
        with self.heartbeat_seen:
            return self.heartbeat_seen.wait_for(lambda: len(self.heartbeats()) >= count, timeout=timeout)


class Harness:
    """Settings, a keyring and a dispatch builder, as the orchestrator would produce them."""

    def __init__(self, moto: MotoServer, *, role: bool) -> None:
        key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.settings = Settings(
            s3_endpoint_url=moto.endpoint_url,
            bucket=f"test-{uuid.uuid4().hex[:12]}",
            storage_role_arn=ROLE_ARN if role else None,
            token_keys=(("k1", key),),
        )
        ensure_bucket(self.settings)
        self.keyring = TokenKeyring.from_settings(self.settings)
        self.run_id = uuid.uuid4().hex

    def key(self, node: str, attempt: int = 1) -> str:
        return node_output_key("ws", "pipe", self.run_id, "v1", node, attempt)

    def dispatch(
        self,
        task: str,
        *,
        node: str = "me",
        params: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        upstream: dict[str, str] | None = None,
        attempt: int = 1,
        heartbeat_interval_s: float = 30,
        expires_in: int = 600,
        manifests: dict[str, str] | None = None,
        read_prefixes: tuple[str, ...] | None = None,
        map_slot: Any = None,
        bind_map: bool = True,
    ) -> dict[str, Any]:
        """`manifests` names mapped upstream nodes (input name -> mapped node id): each input is
        that node's manifest, and the grant reads under its items prefix (or `read_prefixes`).
        `map_slot` makes this a mapped child's dispatch, its item bound by the token unless
        `bind_map` is False."""
        task_id = str(uuid.uuid4())
        inputs = dict(inputs or {})
        upstream = upstream or {}
        manifests = manifests or {}
        refs: dict[str, dict[str, Any]] = {name: {"key": key} for name, key in inputs.items()}
        for name, mapped in manifests.items():
            refs[name] = {"key": self.manifest_key(mapped), "manifest": True, "items_prefix": self.items(mapped)}
        if read_prefixes is None:
            read_prefixes = tuple(self.items(mapped) for mapped in manifests.values())
        if map_slot is not None:
            # A malformed slot (tests of refusals) still gets a grant: item 0's.
            raw_index = map_slot.get("index") if isinstance(map_slot, dict) else None
            index = raw_index if type(raw_index) is int and raw_index >= 0 else 0
            output_key = map_item_output_key("ws", "pipe", self.run_id, "v1", node, index, attempt)
            write_prefix = map_item_attempt_prefix("ws", "pipe", self.run_id, "v1", node, index, attempt)
        else:
            output_key = self.key(node, attempt)
            write_prefix = node_attempt_prefix("ws", "pipe", self.run_id, "v1", node, attempt)
        grant = issue_storage_grant(
            self.settings,
            output_key=output_key,
            write_prefix=write_prefix,
            read_keys=[*(ref["key"] for ref in refs.values()), *upstream.values()],
            task_id=task_id,
            read_prefixes=read_prefixes,
        )
        token = self.keyring.issue(
            TaskClaims(
                task_id=task_id,
                attempt=attempt,
                claim_token=uuid.uuid4().hex,
                workspace="ws",
                task_name=task,
                params_sha256=params_digest(params or {}),
                expires_at=int(time.time()) + expires_in,
                storage=grant,
                map_sha256=map_digest(map_slot) if map_slot is not None and bind_map else None,
            )
        )
        message: dict[str, Any] = {
            "task_id": task_id,
            "run_id": self.run_id,
            "workspace": "ws",
            "pipeline": "pipe",
            "node": node,
            "attempt": attempt,
            "task": task,
            "params": params or {},
            "version": "v1",
            "inputs": refs,
            "upstream": {name: {"key": key} for name, key in upstream.items()},
            "token": token,
            "callback_url": CALLBACK + task_id,
            "heartbeat_url": HEARTBEAT,
            "heartbeat_interval_s": heartbeat_interval_s,
            "deadline": None,
        }
        if map_slot is not None:
            message["map"] = map_slot
        return message

    def items(self, node: str) -> str:
        return map_items_prefix("ws", "pipe", self.run_id, "v1", node)

    def manifest_key(self, node: str) -> str:
        return map_manifest_key("ws", "pipe", self.run_id, "v1", node, 1)

    def item_key(self, node: str, index: int, attempt: int = 1) -> str:
        return map_item_output_key("ws", "pipe", self.run_id, "v1", node, index, attempt)


@pytest.fixture(params=["presigned", "sts"])
def harness(request: pytest.FixtureRequest, moto_server: MotoServer) -> Harness:
    return Harness(moto_server, role=request.param == "sts")


def make_worker(harness: Harness, fake: FakeOrchestrator) -> Worker:
    worker = Worker(settings=harness.settings, send=fake)

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"params": ctx.params, "inputs": ctx.inputs, "version": ctx.version, "node": ctx.node}

    @worker.task("boom")
    def boom(ctx: TaskContext) -> None:
        raise RuntimeError("kaput")

    @worker.task("permanent")
    def permanent(ctx: TaskContext) -> None:
        raise TaskFailed("bad input", retryable=False, code="bad_input")

    return worker


def test_echo_end_to_end(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = make_worker(harness, fake)
    put_json_object(harness.settings, harness.key("up"), {"rows": 3})
    dispatch = harness.dispatch("echo", params={"x": 1}, inputs={"up": harness.key("up")})

    answer = worker.execute(dispatch)

    assert answer == {"accepted": True, "status": "succeeded"}
    heartbeat, callback = fake.calls
    assert heartbeat == (HEARTBEAT, {"token": dispatch["token"], "progress": None, "message": None})
    assert callback[0] == dispatch["callback_url"]
    body = callback[1]
    assert body["token"] == dispatch["token"]
    assert body["status"] == "succeeded"
    expected = {"params": {"x": 1}, "inputs": {"up": {"rows": 3}}, "version": "v1", "node": "me"}
    assert read_json_object(harness.settings, harness.key("me")) == expected
    raw = _raw_object(harness, harness.key("me"))
    assert body["output"] == {
        "key": harness.key("me"),
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def _raw_object(harness: Harness, key: str) -> bytes:
    from orchestrator.storage.s3 import orchestrator_s3

    body: bytes = (
        orchestrator_s3(harness.settings).get_object(Bucket=harness.settings.bucket, Key=key)["Body"].read()
    )
    return body


def test_upstream_outputs_and_missing_input(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    archive_key = pipeline_output_key("ws", "ucd-fetch", "ex1", "v1", "archive", 1)
    put_json_object(harness.settings, archive_key, {"url": "s3://archive"})
    seen: dict[str, Any] = {}

    @worker.task("reader")
    def reader(ctx: TaskContext) -> str:
        seen["archive"] = ctx.upstream("ucd-fetch", "archive")
        with pytest.raises(KeyError, match="'nope' is not an input of node 'me'"):
            ctx.input("nope")
        with pytest.raises(KeyError, match="not an upstream output"):
            ctx.upstream("ucd-fetch", "other")
        return "ok"

    answer = worker.execute(harness.dispatch("reader", upstream={"ucd-fetch/archive": archive_key}))
    assert answer["status"] == "succeeded"
    assert seen["archive"] == {"url": "s3://archive"}
    assert read_json_object(harness.settings, harness.key("me")) == "ok"


def test_exception_fails_retryable(harness: Harness) -> None:
    fake = FakeOrchestrator()
    answer = make_worker(harness, fake).execute(harness.dispatch("boom"))
    assert answer["status"] == "failed"
    (callback,) = fake.callbacks()
    error = callback["error"]
    assert error["message"] == "kaput"
    assert error["type"] == "RuntimeError"
    assert error["code"] == "task_error"
    assert error["retryable"] is True
    assert "RuntimeError: kaput" in error["traceback"]
    assert len(error["traceback"]) <= 4000
    assert "output" not in callback


def test_task_failed_not_retryable(harness: Harness) -> None:
    fake = FakeOrchestrator()
    make_worker(harness, fake).execute(harness.dispatch("permanent"))
    (callback,) = fake.callbacks()
    assert callback["status"] == "failed"
    assert callback["error"]["code"] == "bad_input"
    assert callback["error"]["retryable"] is False
    assert callback["error"]["type"] == "TaskFailed"
    assert callback["error"]["message"] == "bad input"


def test_unknown_task(harness: Harness) -> None:
    fake = FakeOrchestrator()
    dispatch = harness.dispatch("no-such-task")
    make_worker(harness, fake).execute(dispatch)
    assert fake.heartbeats() == []
    (callback,) = fake.callbacks()
    assert callback["token"] == dispatch["token"]
    assert callback["status"] == "failed"
    assert callback["error"]["code"] == "unknown_task"
    assert callback["error"]["retryable"] is False
    assert "no-such-task" in callback["error"]["message"]


def test_invalid_tokens_rejected_without_callback(moto_server: MotoServer) -> None:
    harness = Harness(moto_server, role=False)
    fake = FakeOrchestrator()
    worker = make_worker(harness, fake)

    dispatch = harness.dispatch("echo")
    dispatch["token"] = dispatch["token"][:-4] + (
        "AAAA" if not dispatch["token"].endswith("AAAA") else "BBBB"
    )
    assert worker.execute(dispatch)["status"] == "rejected"

    expired = harness.dispatch("echo", expires_in=-1)
    assert worker.execute(expired) == {"status": "rejected", "reason": "expired"}

    stranger = Worker(settings=harness.settings.with_overrides(token_keys=(("other", _key()),)), send=fake)
    stranger.task("echo")(lambda ctx: None)
    assert stranger.execute(harness.dispatch("echo")) == {"status": "rejected", "reason": "unknown_key"}

    no_token = harness.dispatch("echo")
    del no_token["token"]
    assert worker.execute(no_token) == {"status": "rejected", "reason": "malformed"}

    mixed_up = harness.dispatch("echo")
    mixed_up["task_id"] = "someone-else"
    assert worker.execute(mixed_up) == {"status": "rejected", "reason": "mismatch"}

    assert fake.calls == []


def _key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def test_stale_heartbeat_stops_before_running(harness: Harness) -> None:
    fake = FakeOrchestrator(heartbeat_answer={"accepted": False, "reason": "stale attempt"})
    worker = Worker(settings=harness.settings, send=fake)
    ran: list[bool] = []
    worker.task("t")(lambda ctx: ran.append(True))

    answer = worker.execute(harness.dispatch("t"))

    assert answer == {"accepted": False, "reason": "stale attempt"}
    assert ran == []
    assert fake.callbacks() == []
    assert len(fake.heartbeats()) == 1


def test_a_heartbeat_refused_mid_run_stops_the_task_without_output_or_callback(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    put_json_object(harness.settings, harness.key("up"), {"rows": 3})
    seen: dict[str, Any] = {}

    @worker.task("slow")
    def slow(ctx: TaskContext) -> dict[str, Any]:
        # A newer attempt took the task over: from now on the server refuses this one's heartbeats.
        fake.heartbeat_answer = {"accepted": False, "reason": "stale_attempt"}
        deadline = time.monotonic() + 10
        while not ctx.stale and time.monotonic() < deadline:
            threading.Event().wait(0.005)  # the background heartbeat learns it
        seen["stale"] = ctx.stale
        sent = len(fake.heartbeats())
        with pytest.raises(StaleAttempt, match="stale_attempt"):
            ctx.input("up")
        with pytest.raises(StaleAttempt):
            ctx.heartbeat(progress=0.9)
        seen["sent_after"] = len(fake.heartbeats()) - sent  # a stale context sends nothing
        return {"late": True}  # ignored: the attempt stores and reports nothing

    answer = worker.execute(harness.dispatch("slow", inputs={"up": harness.key("up")}, heartbeat_interval_s=0.01))

    assert seen == {"stale": True, "sent_after": 0}
    assert answer == {"accepted": False, "reason": "stale_attempt"}
    assert fake.callbacks() == []
    with pytest.raises(ClientError):
        _raw_object(harness, harness.key("me"))
    beats = len(fake.heartbeats())
    threading.Event().wait(0.05)
    assert len(fake.heartbeats()) == beats  # the heartbeat thread stopped at the refusal


def test_an_error_answer_to_a_heartbeat_is_not_a_stale_attempt(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)

    @worker.task("t")
    def t(ctx: TaskContext) -> dict[str, Any]:
        # A 5xx or an expired token says nothing about which attempt is current.
        fake.heartbeat_answer = {"error": {"code": "internal"}, "http_status": 500}
        return {"answer": ctx.heartbeat(), "stale": ctx.stale}

    assert worker.execute(harness.dispatch("t"))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("me")) == {
        "answer": {"error": {"code": "internal"}, "http_status": 500}, "stale": False}


def test_background_heartbeats_while_running(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)

    @worker.task("slow")
    def slow(ctx: TaskContext) -> dict[str, bool]:
        # The first heartbeat precedes the run; wait (on a condition, not a sleep) for two more.
        return {"beat": fake.wait_for_heartbeats(3)}

    answer = worker.execute(harness.dispatch("slow", heartbeat_interval_s=0.01))
    assert answer["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("me")) == {"beat": True}
    count = len(fake.heartbeats())
    # The heartbeat thread is stopped once the function returns, before the callback.
    assert fake.calls[-1][0].startswith(CALLBACK)
    assert len(fake.heartbeats()) == count


def test_manual_heartbeat_with_progress(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)

    @worker.task("progress")
    def progress(ctx: TaskContext) -> dict[str, Any]:
        return ctx.heartbeat(progress=0.5, message="halfway")

    worker.execute(harness.dispatch("progress"))
    assert fake.heartbeats()[-1]["progress"] == 0.5
    assert fake.heartbeats()[-1]["message"] == "halfway"
    assert read_json_object(harness.settings, harness.key("me")) == {"accepted": True}


def test_non_json_values_stored_with_str(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    worker.task("odd")(lambda ctx: {"when": uuid.UUID(int=1)})
    assert worker.execute(harness.dispatch("odd"))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("me")) == {"when": str(uuid.UUID(int=1))}


def test_reading_a_key_outside_the_grant_fails(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    other_key = harness.key("not-mine")
    put_json_object(harness.settings, other_key, 1)

    @worker.task("snoop")
    def snoop(ctx: TaskContext) -> Any:
        assert ctx.storage is not None
        return ctx.storage.read_json(other_key)

    worker.execute(harness.dispatch("snoop"))
    (callback,) = fake.callbacks()
    assert callback["status"] == "failed"
    assert "not-mine" in callback["error"]["message"]


def test_examples(harness: Harness) -> None:
    import examples.tasks as tasks

    fake = FakeOrchestrator()
    assert {"echo", "sleep", "fail"} <= set(tasks.worker.task_names)

    def run(dispatch: dict[str, Any]) -> dict[str, Any]:
        tasks.worker.execute(dispatch, send=fake, settings=harness.settings)
        return fake.callbacks()[-1]

    put_json_object(harness.settings, harness.key("a"), [1])
    assert (
        run(harness.dispatch("echo", params={"p": 1}, inputs={"a": harness.key("a")}))["status"]
        == "succeeded"
    )
    assert read_json_object(harness.settings, harness.key("me")) == {
        "params": {"p": 1},
        "inputs": {"a": [1]},
        "version": "v1",
        "node": "me",
    }

    assert run(harness.dispatch("sleep", params={"seconds": 0}))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("me")) == {"slept": 0}

    first = run(harness.dispatch("fail", params={"times": 2}, attempt=2))
    assert first["status"] == "failed"
    assert first["error"]["message"] == "failing on purpose (attempt 2 of 2)"
    assert first["error"]["retryable"] is True
    assert run(harness.dispatch("fail", params={"times": 2}, attempt=3))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("me", 3)) == {"attempts": 3}

    permanent = run(harness.dispatch("fail", params={"retryable": False}))
    assert permanent["error"]["retryable"] is False


def test_lambda_handler(moto_server: MotoServer) -> None:
    harness = Harness(moto_server, role=False)
    fake = FakeOrchestrator()
    worker = make_worker(harness, fake)
    assert worker.lambda_handler(harness.dispatch("echo"), None)["status"] == "succeeded"
    ok = harness.dispatch("echo", node="sqs")
    broken = {"not": "a dispatch"}
    event = {
        "Records": [
            {"messageId": "m1", "body": json.dumps(ok)},
            {"messageId": "m2", "body": json.dumps(broken)},
        ]
    }
    # A message without a token is rejected (not raised): it is not a failure worth redelivering.
    assert worker.lambda_handler(event, None) == {"batchItemFailures": []}
    assert read_json_object(harness.settings, harness.key("sqs"))["node"] == "sqs"


def test_duplicate_task_name_rejected() -> None:
    worker = Worker(settings=Settings())
    worker.task("a")(lambda ctx: None)
    with pytest.raises(ValueError, match="already registered"):
        worker.task("a")(lambda ctx: 1)


def test_worker_import_needs_no_env_and_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, examples.tasks;"
        "bad = [m for m in ('psycopg', 'starlette', 'orchestrator.store', 'orchestrator.engine',"
        " 'orchestrator.api', 'orchestrator.db') if m in sys.modules];"
        "print(bad)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TICKWEAVE_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def _mock_sender(handler: Callable[[httpx.Request], httpx.Response]) -> HttpSender:
    return HttpSender(client=httpx.Client(transport=httpx.MockTransport(handler)), attempts=4, backoff_s=0)


def test_http_sender_retries_transient_errors() -> None:
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(attempts) == 2:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"accepted": True, "echo": json.loads(request.content)})

    answer = _mock_sender(handler)("http://o.test/api/heartbeat", {"token": "t"})
    assert answer == {"accepted": True, "echo": {"token": "t"}}
    assert len(attempts) == 3


def test_http_sender_returns_json_refusals_and_gives_up() -> None:
    refusal = _mock_sender(lambda r: httpx.Response(409, json={"accepted": False, "reason": "stale"}))
    assert refusal("http://o.test/x", {}) == {"accepted": False, "reason": "stale", "http_status": 409}

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(httpx.ConnectError):
        _mock_sender(down)("http://o.test/x", {})
    with pytest.raises(TransientHTTPError):  # retried (a 500 may pass), then given up
        _mock_sender(lambda r: httpx.Response(500, text="oops"))("http://o.test/x", {})


def test_storage_http_error_hides_signature() -> None:
    error = StorageHTTPError(
        "GET",
        "http://s3.test/b/k?X-Amz-Signature=secret&X-Amz-Security-Token=tok",
        403,
        b"<Error><Code>AccessDenied</Code><StringToSign>...</StringToSign></Error>",
    )
    assert str(error) == "GET http://s3.test/b/k: HTTP 403 (AccessDenied)"


@pytest.mark.parametrize("via", ["input", "upstream"])
def test_a_missing_input_fails_the_task_naming_the_upstream_and_the_key(harness: Harness, via: str) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    never_written = harness.key("download")

    @worker.task("parse")
    def parse(ctx: TaskContext) -> Any:
        return ctx.input("download") if via == "input" else ctx.upstream("ucd-fetch", "archive")

    refs = {"inputs": {"download": never_written}} if via == "input" else {
        "upstream": {"ucd-fetch/archive": never_written}}
    answer = worker.execute(harness.dispatch("parse", node="parse", **refs))

    assert answer["status"] == "failed"
    (callback,) = fake.callbacks()
    error = callback["error"]
    assert (error["code"], error["type"], error["retryable"]) == ("input_missing", "TaskFailed", True)
    named = "of upstream node 'download'" if via == "input" else "'archive' of upstream pipeline 'ucd-fetch'"
    assert error["message"].startswith(f"node 'parse': the output {named} is not in the bucket (key '{never_written}'")
    assert "botocore" not in error["traceback"] and "ClientError" not in error["traceback"]
    assert "output" not in callback


def test_an_input_the_store_refuses_fails_the_task_naming_the_node_and_the_key(moto_server: MotoServer) -> None:
    """On AWS a scoped grant (no s3:ListBucket) gets AccessDenied, not NoSuchKey, for a missing
    key; moto does not enforce that, so the store's answer is stubbed."""
    from botocore.stub import Stubber

    harness = Harness(moto_server, role=True)
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    key = harness.key("download")

    @worker.task("parse")
    def parse(ctx: TaskContext) -> Any:
        assert ctx.storage is not None
        with Stubber(ctx.storage._s3()) as stub:
            stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
            return ctx.input("download")

    worker.execute(harness.dispatch("parse", node="parse", inputs={"download": key}))
    (callback,) = fake.callbacks()
    assert callback["error"]["code"] == "input_unreadable"
    assert callback["error"]["message"].startswith(
        f"node 'parse': the output of upstream node 'download' could not be read with this task's storage grant "
        f"(key '{key}'; AccessDenied from GetObject)")


def test_the_output_put_carries_s3s_own_sha256_checksum_with_credentials(harness: Harness) -> None:
    from orchestrator.storage.s3 import orchestrator_s3

    fake = FakeOrchestrator()
    assert make_worker(harness, fake).execute(harness.dispatch("echo"))["status"] == "succeeded"
    (callback,) = fake.callbacks()
    head = orchestrator_s3(harness.settings).head_object(
        Bucket=harness.settings.bucket, Key=harness.key("me"), ChecksumMode="ENABLED")
    stored = head.get("ChecksumSHA256")
    if harness.settings.storage_role_arn:
        assert stored is not None and base64.b64decode(stored).hex() == callback["output"]["sha256"]
    else:
        # A presigned PUT is signed before the output exists and cannot carry it; the server
        # checks the size (and the sha256 where it reads the object).
        assert stored is None
    assert head["ContentLength"] == callback["output"]["size"]


# --- mapped nodes: children see their item, reducers walk the manifest -----------------------------

READ_URLS = "http://orchestrator.test/api/worker/read-urls"


class ReadUrlsEndpoint:
    """A sender for the SDK: `POST /api/worker/read-urls` goes to the real endpoint
    (orchestrator.api.worker_reads, so the real presign_reads with the harness's key ring),
    mounted alone in an app and reached through the SDK's own HttpSender; anything else
    (heartbeats, callbacks) goes to the fake orchestrator."""

    def __init__(self, harness: Harness, fake: FakeOrchestrator,
                 tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        from types import SimpleNamespace

        from starlette.applications import Starlette
        from starlette.routing import Route
        from starlette.testclient import TestClient

        from orchestrator.api.worker_reads import read_urls

        app = Starlette(routes=[Route("/api/worker/read-urls", read_urls, methods=["POST"])])
        engine = SimpleNamespace(settings=harness.settings, keyring=harness.keyring)
        app.state.get_engine = lambda: engine
        self._http = HttpSender(client=TestClient(app), attempts=4, backoff_s=0)
        self._fake = fake
        self._tamper = tamper
        self.requests: list[list[str]] = []

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if url != READ_URLS:
            return self._fake(url, body)
        self.requests.append(list(body["keys"]))
        answer = self._http(url, body)
        return self._tamper(answer) if self._tamper is not None else answer


def write_map(harness: Harness, node: str, statuses: list[str], *, value: Callable[[int], Any] = lambda i: {"i": i},
              keys: dict[int, str] | None = None) -> dict[str, Any]:
    """Store a mapped node's children's outputs and its manifest, as the server would have."""
    items: list[dict[str, Any]] = []
    for index, status in enumerate(statuses):
        if status == "succeeded":
            key = (keys or {}).get(index) or harness.item_key(node, index)
            size, sha256 = put_json_object(harness.settings, key, value(index))
            items.append({"index": index, "status": status, "key": key, "size": size, "sha256": sha256})
        elif status == "failed":
            items.append({"index": index, "status": status, "error": {"code": "task_error", "message": f"bad {index}"}})
        else:
            items.append({"index": index, "status": status})
    manifest = {
        "format": "tickweave.map-manifest/1", "node": node, "version": "v1", "run_id": harness.run_id,
        "count": len(statuses), "succeeded": statuses.count("succeeded"), "failed": statuses.count("failed"),
        "skipped": statuses.count("skipped"), "items_prefix": harness.items(node), "items": items,
    }
    put_json_object(harness.settings, harness.manifest_key(node), manifest)
    return manifest


def test_a_mapped_child_sees_its_item_and_writes_its_own_item_key(harness: Harness) -> None:
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)

    @worker.task("parse-file")
    def parse_file(ctx: TaskContext) -> dict[str, Any]:
        return {"item": ctx.item, "index": ctx.index, "count": ctx.map_count}

    slot = {"index": 2, "item": {"file": "c.csv"}, "count": 5}
    answer = worker.execute(harness.dispatch("parse-file", node="parse", map_slot=slot))

    assert answer["status"] == "succeeded"
    (callback,) = fake.callbacks()
    assert callback["output"]["key"] == harness.item_key("parse", 2)
    assert read_json_object(harness.settings, harness.item_key("parse", 2)) == {
        "item": {"file": "c.csv"}, "index": 2, "count": 5}

    # A null item is an item (index says so); a task that is no child has neither.
    worker.execute(harness.dispatch("parse-file", node="parse", map_slot={"index": 0, "item": None, "count": 1}))
    assert read_json_object(harness.settings, harness.item_key("parse", 0)) == {"item": None, "index": 0, "count": 1}
    worker.execute(harness.dispatch("parse-file", node="plain"))
    assert read_json_object(harness.settings, harness.key("plain")) == {"item": None, "index": None, "count": None}


@pytest.mark.parametrize("slot", [
    {"index": -1, "item": 1, "count": 3}, {"index": True, "item": 1, "count": 3}, {"index": "0", "item": 1, "count": 3},
    {"index": 3, "item": 1, "count": 3}, {"index": 0, "item": 1, "count": -1}, {"index": 0, "item": 1},
    {"index": 0, "count": 1}, "a.csv", [0, "a.csv", 1],
])
def test_a_malformed_map_field_fails_the_attempt_for_good(moto_server: MotoServer, slot: Any) -> None:
    harness = Harness(moto_server, role=False)
    fake = FakeOrchestrator()
    ran: list[bool] = []
    worker = Worker(settings=harness.settings, send=fake)
    worker.task("parse-file")(lambda ctx: ran.append(True))

    dispatch = harness.dispatch("parse-file", node="parse", map_slot=slot)
    answer = worker.execute(dispatch)

    assert answer["status"] == "failed" and ran == [] and fake.heartbeats() == []
    (callback,) = fake.callbacks()
    assert callback["token"] == dispatch["token"]
    error = callback["error"]
    assert (error["code"], error["type"], error["retryable"]) == ("malformed_dispatch", "MalformedDispatch", False)
    assert error["message"].startswith("the dispatch's map field must be")


def test_a_map_field_other_than_the_one_the_token_binds_runs_nothing(moto_server: MotoServer) -> None:
    harness = Harness(moto_server, role=False)
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    worker.task("parse-file")(lambda ctx: ctx.item)

    swapped = harness.dispatch("parse-file", node="parse", map_slot={"index": 1, "item": "b.csv", "count": 2})
    swapped["map"] = {"index": 1, "item": "/etc/passwd", "count": 2}
    assert worker.execute(swapped) == {"status": "rejected", "reason": "map_mismatch"}
    dropped = harness.dispatch("parse-file", node="parse", map_slot={"index": 1, "item": "b.csv", "count": 2})
    del dropped["map"]
    assert worker.execute(dropped) == {"status": "rejected", "reason": "map_mismatch"}
    assert fake.calls == []
    # A token from a dispatcher that binds no map: the field is taken as given.
    unbound = harness.dispatch("parse-file", node="parse", map_slot={"index": 0, "item": "a.csv", "count": 2},
                               bind_map=False)
    assert worker.execute(unbound)["status"] == "succeeded"


def _reducer(harness: Harness, fake: FakeOrchestrator) -> tuple[Worker, ReadUrlsEndpoint, dict[str, Any]]:
    endpoint = ReadUrlsEndpoint(harness, fake)
    worker = Worker(settings=harness.settings, send=endpoint)
    seen: dict[str, Any] = {}

    @worker.task("load-all")
    def load_all(ctx: TaskContext) -> dict[str, Any]:
        manifest = ctx.manifest("parse")
        seen["results"] = [(r.index, r.status, r.value, r.error) for r in ctx.map_results("parse")]
        seen["outputs"] = list(ctx.map_outputs("parse"))
        return {"count": manifest["count"], "total": sum(v["i"] for v in seen["outputs"])}

    return worker, endpoint, seen


def test_a_reducer_reads_every_child_in_index_order(harness: Harness) -> None:
    statuses = ["succeeded"] * 250
    statuses[7], statuses[100], statuses[249] = "failed", "skipped", "cancelled"
    write_map(harness, "parse", statuses)
    fake = FakeOrchestrator()
    worker, endpoint, seen = _reducer(harness, fake)

    answer = worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))

    assert answer["status"] == "succeeded", fake.callbacks()
    succeeded = [i for i, s in enumerate(statuses) if s == "succeeded"]
    assert seen["outputs"] == [{"i": i} for i in succeeded]
    results = seen["results"]
    assert [r[0] for r in results] == list(range(250))
    assert results[7] == (7, "failed", None, {"code": "task_error", "message": "bad 7"})
    assert results[100] == (100, "skipped", None, None)
    assert results[249] == (249, "cancelled", None, None)
    assert results[8] == (8, "succeeded", {"i": 8}, None)
    assert read_json_object(harness.settings, harness.key("load")) == {"count": 250, "total": sum(succeeded)}
    if harness.settings.storage_role_arn:
        # STS: the session policy lets the credentials read under the items prefix directly.
        assert endpoint.requests == []
    else:
        # Presigned: URLs asked for 100 keys ahead, three times per walk (247 succeeded items).
        walks = [endpoint.requests[i:i + 3] for i in range(0, 6, 3)]
        assert len(endpoint.requests) == 6
        for walk in walks:
            assert [len(batch) for batch in walk] == [100, 100, 47]
            assert [key for batch in walk for key in batch] == [harness.item_key("parse", i) for i in succeeded]


def test_the_walk_is_lazy_at_the_width_of_the_task_limit(harness: Harness) -> None:
    """A manifest of 100,000 children of which only the first 150 outputs exist: taking 150
    values reads those and nothing further (a reducer never holds every output at once)."""
    import itertools

    width, written = 100_000, 150
    items: list[dict[str, Any]] = []
    for index in range(width):
        key = harness.item_key("parse", index)
        if index < written:
            size, sha256 = put_json_object(harness.settings, key, {"i": index})
            items.append({"index": index, "status": "succeeded", "key": key, "size": size, "sha256": sha256})
        else:
            items.append({"index": index, "status": "succeeded", "key": key, "size": 9, "sha256": "0" * 64})
    put_json_object(harness.settings, harness.manifest_key("parse"), {
        "format": "tickweave.map-manifest/1", "node": "parse", "version": "v1", "run_id": harness.run_id,
        "count": width, "succeeded": width, "failed": 0, "skipped": 0, "items_prefix": harness.items("parse"),
        "items": items})
    fake = FakeOrchestrator()
    endpoint = ReadUrlsEndpoint(harness, fake)
    worker = Worker(settings=harness.settings, send=endpoint)

    @worker.task("head")
    def head(ctx: TaskContext) -> list[int]:
        return [value["i"] for value in itertools.islice(ctx.map_outputs("parse"), written)]

    assert worker.execute(harness.dispatch("head", node="load", manifests={"parse": "parse"}))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("load")) == list(range(written))
    if not harness.settings.storage_role_arn:
        assert [len(batch) for batch in endpoint.requests] == [100, 100]


def test_a_child_output_outside_the_grants_prefix_is_refused(harness: Harness) -> None:
    # Item 2's key is under another map node's items (its name starts the same): the grant's
    # prefix does not cover it, so the walk stops there, having yielded what came before.
    stray = harness.item_key("parse2", 2)
    write_map(harness, "parse", ["succeeded"] * 4, keys={2: stray})
    fake = FakeOrchestrator()
    endpoint = ReadUrlsEndpoint(harness, fake)
    worker = Worker(settings=harness.settings, send=endpoint)
    seen: list[Any] = []

    @worker.task("load-all")
    def load_all(ctx: TaskContext) -> None:
        for value in ctx.map_outputs("parse"):
            seen.append(value)

    assert worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))["status"] == "failed"
    assert seen == [{"i": 0}, {"i": 1}]
    (callback,) = fake.callbacks()
    error = callback["error"]
    assert (error["code"], error["retryable"]) == ("input_not_granted", False)
    assert error["message"] == (f"node 'load': the output of item 2 of mapped node 'parse' (key '{stray}') is not "
                                "under a read prefix of this task's storage grant")
    # The stray key was never asked for: the server would have refused the whole batch.
    assert all(stray not in batch for batch in endpoint.requests)

    # A grant without the prefix at all (a dispatcher that did not grant it) reads no item.
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=ReadUrlsEndpoint(harness, fake))
    worker.task("load-all")(lambda ctx: list(ctx.map_outputs("parse")))
    worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}, read_prefixes=()))
    (callback,) = fake.callbacks()
    assert callback["error"]["code"] == "input_not_granted"


def test_a_refusal_of_the_read_urls_endpoint_fails_the_attempt_with_its_reason(moto_server: MotoServer) -> None:
    harness = Harness(moto_server, role=False)
    write_map(harness, "parse", ["succeeded"] * 2)
    fake = FakeOrchestrator()

    def refuse(answer: dict[str, Any]) -> dict[str, Any]:
        return {"error": {"code": "unauthorized", "message": "the worker token was refused (expired)"},
                "http_status": 401}

    worker = Worker(settings=harness.settings, send=ReadUrlsEndpoint(harness, fake, tamper=refuse))
    worker.task("load-all")(lambda ctx: list(ctx.map_outputs("parse")))
    worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))
    (callback,) = fake.callbacks()
    error = callback["error"]
    assert (error["code"], error["retryable"]) == ("input_unreadable", True)
    assert error["message"] == ("node 'load': the orchestrator gave no read URLs for the output of item 0 of mapped "
                                "node 'parse' (unauthorized: the worker token was refused (expired))")


def test_an_expired_read_url_is_asked_for_again(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answers an expired presigned URL with 403; moto does not check expiry, so the store's
    answer to the first batch's URLs is stubbed (the URLs themselves come from the endpoint)."""
    from orchestrator.worker import grant_io

    harness = Harness(moto_server, role=False)
    write_map(harness, "parse", ["succeeded"] * 3)
    fake = FakeOrchestrator()
    answers: list[int] = []
    real_get_bytes = grant_io.get_bytes

    def spoil_the_first(answer: dict[str, Any]) -> dict[str, Any]:
        answers.append(1)
        if len(answers) > 1:
            return answer
        return {"urls": {key: url + "&expired=1" for key, url in answer["urls"].items()}}

    def store(url: str) -> bytes:
        if url.endswith("&expired=1"):
            raise StorageHTTPError("GET", url, 403, b"<Error><Code>AccessDenied</Code></Error>")
        return real_get_bytes(url)

    monkeypatch.setattr(grant_io, "get_bytes", store)
    endpoint = ReadUrlsEndpoint(harness, fake, tamper=spoil_the_first)
    worker = Worker(settings=harness.settings, send=endpoint)
    worker.task("load-all")(lambda ctx: list(ctx.map_outputs("parse")))
    assert worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))["status"] == "succeeded"
    assert read_json_object(harness.settings, harness.key("load")) == [{"i": 0}, {"i": 1}, {"i": 2}]
    keys = [harness.item_key("parse", i) for i in range(3)]
    assert endpoint.requests == [keys, [keys[0]], [keys[1]], [keys[2]]]


def test_an_input_that_is_no_manifest_is_refused_by_name(harness: Harness) -> None:
    put_json_object(harness.settings, harness.key("up"), {"rows": 3})
    put_json_object(harness.settings, harness.key("future"), {"format": "tickweave.map-manifest/2", "items": []})
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    worker.task("reduce-up")(lambda ctx: list(ctx.map_results("up")))
    worker.task("reduce-future")(lambda ctx: ctx.manifest("future"))
    worker.task("reduce-nothing")(lambda ctx: ctx.manifest("nope"))

    worker.execute(harness.dispatch("reduce-up", node="load", inputs={"up": harness.key("up")}))
    worker.execute(harness.dispatch("reduce-future", node="load", inputs={"future": harness.key("future")}))
    worker.execute(harness.dispatch("reduce-nothing", node="load"))
    up, future, nothing = (c["error"] for c in fake.callbacks())
    assert (up["code"], up["retryable"]) == ("not_a_manifest", False)
    assert up["message"] == "node 'load': input 'up' is not the output of a mapped node"
    assert "format 'tickweave.map-manifest/2'" in future["message"] and "upgrade the worker" in future["message"]
    assert nothing["code"] == "task_error" and "'nope' is not an input of node 'load'" in nothing["message"]


def test_a_child_output_changed_since_it_was_accepted_is_refused(harness: Harness) -> None:
    write_map(harness, "parse", ["succeeded"] * 3)
    put_json_object(harness.settings, harness.item_key("parse", 1), {"i": 1, "evil": True})  # rewritten later
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=ReadUrlsEndpoint(harness, fake))
    worker.task("load-all")(lambda ctx: list(ctx.map_outputs("parse")))
    worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))
    (callback,) = fake.callbacks()
    assert (callback["error"]["code"], callback["error"]["retryable"]) == ("input_changed", False)
    assert "item 1 of mapped node 'parse'" in callback["error"]["message"]


@pytest.mark.parametrize(("items", "problem"), [
    ([{"index": 0, "status": "succeeded", "key": 5}], "output key that is not a string"),
    ([{"index": 0, "status": "running"}], "status 'running'"),
    ([{"index": 1, "status": "failed"}, {"index": 0, "status": "failed"}], "increasing index order"),
    ([{"index": -1, "status": "failed"}], "integer >= 0"),
    (["x"], "not an object"),
])
def test_an_invalid_manifest_item_is_named(moto_server: MotoServer, items: list[Any], problem: str) -> None:
    harness = Harness(moto_server, role=True)
    put_json_object(harness.settings, harness.manifest_key("parse"), {
        "format": "tickweave.map-manifest/1", "count": len(items), "items": items})
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    worker.task("load-all")(lambda ctx: list(ctx.map_results("parse")))
    worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"}))
    (callback,) = fake.callbacks()
    assert (callback["error"]["code"], callback["error"]["retryable"]) == ("manifest_invalid", False)
    assert problem in callback["error"]["message"]


def test_a_stale_attempt_stops_walking_the_manifest(moto_server: MotoServer) -> None:
    harness = Harness(moto_server, role=True)
    write_map(harness, "parse", ["succeeded", "failed", "succeeded"])
    fake = FakeOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    seen: list[Any] = []

    @worker.task("load-all")
    def load_all(ctx: TaskContext) -> None:
        walk = ctx.map_results("parse")
        seen.append(next(walk).value)
        fake.heartbeat_answer = {"accepted": False, "reason": "stale_attempt"}
        with pytest.raises(StaleAttempt):
            ctx.heartbeat()
        with pytest.raises(StaleAttempt):
            next(walk)

    assert worker.execute(harness.dispatch("load-all", node="load", manifests={"parse": "parse"})) == {
        "accepted": False, "reason": "stale_attempt"}
    assert seen == [{"i": 0}]
    assert fake.callbacks() == []


def test_the_read_urls_address_comes_from_the_dispatch() -> None:
    from orchestrator.worker.sdk import _read_urls_url

    assert _read_urls_url("https://api.example/prod/api/heartbeat", "") == "https://api.example/prod/api/worker/read-urls"
    assert (_read_urls_url("https://other/hb", "https://api.example/api/callback/123")
            == "https://api.example/api/worker/read-urls")
    assert _read_urls_url("https://other/hb", "https://other/cb") is None
