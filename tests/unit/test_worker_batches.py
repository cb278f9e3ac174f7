"""The worker SDK's batched callbacks (issue 16): where it holds several outcomes at once
(`Worker.execute_many`: a Lambda SQS event, the `run_sqs` loop), their callbacks go in one
`POST /api/callbacks`; an orchestrator that cannot take the batch gets them one by one, one that
cannot be reached fails the dispatches (their messages go back to the queue), and a task that
finished keeps heartbeating until its callback is sent.

The moto S3 server and a fake orchestrator (`send`, or HttpSender over httpx.MockTransport).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from infra.s3 import MotoServer
from orchestrator.dispatch.local import LocalTransport
from orchestrator.storage.s3 import read_json_object
from orchestrator.worker import TaskContext, Worker
from orchestrator.worker import sdk as sdk_module
from orchestrator.worker.http import HttpSender
from orchestrator.worker.sdk import _callbacks_url
from tests.polling import poll

from .test_worker_sdk import CALLBACK, HEARTBEAT, Harness

BATCH = CALLBACK.removesuffix("callback/") + "callbacks"


class BatchingOrchestrator:
    """Answers heartbeats, single callbacks and batches as the API would; `refuse` names task ids
    whose callback is refused (409, stale), `without_batches` answers the batch route 404."""

    def __init__(self, *, without_batches: bool = False, refuse: tuple[str, ...] = ()) -> None:
        self.without_batches = without_batches
        self.refuse = set(refuse)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.heartbeat_answer: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: {"accepted": True}
        self._lock = threading.Lock()
        self.beaten = threading.Condition()

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append((url, body))
        if url == HEARTBEAT:
            with self.beaten:
                self.beaten.notify_all()
            return self.heartbeat_answer(body)
        if url == BATCH:
            if self.without_batches:
                return {"error": {"code": "not_found", "message": "no route", "details": None}, "http_status": 404}
            return {"results": [{"task_id": item["task_id"], **self._answer(item["task_id"], item["status"])}
                                for item in body["callbacks"]]}
        answer = self._answer(url.rsplit("/", 1)[1], body["status"])
        status = answer.pop("status")
        return answer if status == 200 else {**answer, "http_status": status}

    def _answer(self, task_id: str, outcome: str) -> dict[str, Any]:
        if task_id in self.refuse:
            return {"status": 409, "accepted": False, "outcome": "stale_attempt", "task_status": "running",
                    "run_status": None, "error": {"code": "stale_attempt", "message": "not current", "details": None}}
        return {"status": 200, "accepted": True, "outcome": outcome, "task_status": outcome, "run_status": None}

    def urls(self) -> list[str]:
        with self._lock:
            return [url if not url.startswith(CALLBACK) else CALLBACK + "*" for url, _ in self.calls]

    def heartbeats_of(self, token: str) -> int:
        with self._lock:
            return sum(1 for url, body in self.calls if url == HEARTBEAT and body["token"] == token)


def worker_for(harness: Harness, send: Any) -> Worker:
    worker = Worker(settings=harness.settings, send=send)

    @worker.task("echo")
    def echo(ctx: TaskContext) -> dict[str, Any]:
        return {"node": ctx.node}

    @worker.task("boom")
    def boom(ctx: TaskContext) -> None:
        raise RuntimeError("kaput")

    return worker


@pytest.fixture
def harness(moto_server: MotoServer) -> Harness:
    return Harness(moto_server, role=False)


def test_the_batch_url_is_derived_from_the_callback_url() -> None:
    assert _callbacks_url("https://api.example/api/callback/123") == "https://api.example/api/callbacks"
    assert _callbacks_url("https://gw.example/prod/api/callback/1") == "https://gw.example/prod/api/callbacks"
    assert _callbacks_url("https://worker.example/done/1") is None


def test_several_outcomes_go_in_one_request_and_each_answer_is_the_single_callbacks(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(3)] + [harness.dispatch("boom", node="b")]
    fake = BatchingOrchestrator(refuse=(dispatches[1]["task_id"],))
    worker = worker_for(harness, fake)

    with caplog.at_level(logging.WARNING, logger="tickweave.worker"):
        answers = worker.execute_many(dispatches)

    assert fake.urls() == [HEARTBEAT] * 4 + [BATCH]
    ((_, body),) = [call for call in fake.calls if call[0] == BATCH]
    assert [item["task_id"] for item in body["callbacks"]] == [d["task_id"] for d in dispatches]
    assert [item["token"] for item in body["callbacks"]] == [d["token"] for d in dispatches]
    assert [item["status"] for item in body["callbacks"]] == ["succeeded"] * 3 + ["failed"]
    assert body["callbacks"][3]["error"]["message"] == "kaput"
    assert answers[0] == {"task_id": dispatches[0]["task_id"], "accepted": True, "outcome": "succeeded",
                          "task_status": "succeeded", "run_status": None}
    # A refusal is the answer (with its status, as HttpSender gives a single one), logged, not raised.
    assert (answers[1]["accepted"], answers[1]["outcome"], answers[1]["http_status"]) == (False, "stale_attempt", 409)
    assert answers[3]["outcome"] == "failed"
    assert f"the callback of task {dispatches[1]['task_id']} was refused (409)" in caplog.text
    assert read_json_object(harness.settings, harness.key("n2")) == {"node": "n2"}


def test_a_lone_outcome_a_rejected_dispatch_and_one_that_is_not_a_dispatch(harness: Harness) -> None:
    fake = BatchingOrchestrator()
    worker = worker_for(harness, fake)
    good = harness.dispatch("echo")
    forged = {**harness.dispatch("echo", node="other"), "token": "not-a-token"}

    answers = worker.execute_many([good, forged, ["not", "a", "dispatch"]])

    assert fake.urls() == [HEARTBEAT, CALLBACK + "*"]  # one callback to send: the single route
    assert answers[0]["accepted"] is True
    assert answers[1] == {"status": "rejected", "reason": "malformed"}
    assert isinstance(answers[2], Exception)


def test_batches_are_cut_at_the_count_and_size_limits(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BatchingOrchestrator()
    worker = worker_for(harness, fake)
    monkeypatch.setattr(sdk_module, "CALLBACK_BATCH", 2)
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(5)]
    assert all(answer["accepted"] for answer in worker.execute_many(dispatches))  # type: ignore[index]
    sizes = [len(body["callbacks"]) for url, body in fake.calls if url == BATCH]
    assert sizes == [2, 2, 1]

    fake.calls.clear()
    monkeypatch.setattr(sdk_module, "CALLBACK_BATCH", 100)
    monkeypatch.setattr(sdk_module, "CALLBACK_BATCH_BYTES", 1)  # every callback is over it
    dispatches = [harness.dispatch("echo", node=f"m{i}") for i in range(3)]
    assert all(answer["accepted"] for answer in worker.execute_many(dispatches))  # type: ignore[index]
    assert [len(body["callbacks"]) for url, body in fake.calls if url == BATCH] == [1, 1, 1]


def test_an_orchestrator_without_the_route_gets_them_one_by_one(harness: Harness) -> None:
    fake = BatchingOrchestrator(without_batches=True)
    worker = worker_for(harness, fake)
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(3)]
    answers = worker.execute_many(dispatches)
    assert fake.urls() == [HEARTBEAT] * 3 + [BATCH] + [CALLBACK + "*"] * 3
    assert [answer["outcome"] for answer in answers] == ["succeeded"] * 3  # type: ignore[index]


def _api(handler: Callable[[httpx.Request, list[str]], httpx.Response]) -> tuple[HttpSender, list[str]]:
    """HttpSender over a mock API whose `handler` sees each request and the paths so far."""
    paths: list[str] = []
    lock = threading.Lock()

    def handle(request: httpx.Request) -> httpx.Response:
        with lock:
            paths.append(request.url.path if not request.url.path.startswith("/api/callback/") else "/api/callback/*")
        if request.url.path == "/api/heartbeat":
            return httpx.Response(200, json={"accepted": True})
        return handler(request, paths)

    return HttpSender(client=httpx.Client(transport=httpx.MockTransport(handle)), attempts=4, backoff_s=0), paths


def _batch_answer(request: httpx.Request) -> httpx.Response:
    items = json.loads(request.content)["callbacks"]
    return httpx.Response(200, json={"results": [
        {"task_id": item["task_id"], "status": 200, "accepted": True, "outcome": item["status"],
         "task_status": item["status"], "run_status": None} for item in items]})


def test_a_batch_answered_503_is_retried_like_a_single_callback(harness: Harness) -> None:
    def handler(request: httpx.Request, paths: list[str]) -> httpx.Response:
        if paths.count("/api/callbacks") == 1:
            return httpx.Response(503, text="busy")
        return _batch_answer(request)

    sender, paths = _api(handler)
    worker = worker_for(harness, sender)
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(2)]
    answers = worker.execute_many(dispatches)
    assert paths.count("/api/callbacks") == 2 and "/api/callback/*" not in paths
    assert [answer["outcome"] for answer in answers] == ["succeeded"] * 2  # type: ignore[index]


def test_a_404_or_500_batch_falls_back_to_single_callbacks_over_http(harness: Harness) -> None:
    # 404 (an older orchestrator) at once; a 500 after BATCH_TRIES_ON_500 tries as a batch.
    for status, tries in ((404, 1), (500, 3)):

        def handler(request: httpx.Request, paths: list[str], status: int = status) -> httpx.Response:
            if request.url.path == "/api/callbacks":
                return httpx.Response(status, json={"error": {"code": "x", "message": "no", "details": None}})
            return httpx.Response(200, json={"accepted": True, "outcome": "succeeded", "task_status": "succeeded",
                                             "run_status": None})

        sender, paths = _api(handler)
        worker = worker_for(harness, sender)
        answers = worker.execute_many([harness.dispatch("echo", node=f"n{i}") for i in range(2)])
        assert paths.count("/api/callbacks") == tries and paths.count("/api/callback/*") == 2, (status, paths)
        assert [answer["accepted"] for answer in answers] == [True, True]  # type: ignore[index]


def test_an_unreachable_orchestrator_fails_every_dispatch_of_the_batch(harness: Harness) -> None:
    def handler(request: httpx.Request, paths: list[str]) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    sender, paths = _api(handler)
    worker = worker_for(harness, sender)
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(2)]
    event = {"Records": [{"messageId": f"m{i}", "body": json.dumps(d)} for i, d in enumerate(dispatches)]}

    answer = worker.lambda_handler(event)

    # Retried (4 attempts), then every record goes back to the queue; no single callbacks.
    assert paths.count("/api/callbacks") == 4 and "/api/callback/*" not in paths
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m0"}, {"itemIdentifier": "m1"}]}


def test_a_finished_task_heartbeats_until_its_callback_is_sent_and_is_dropped_if_found_stale(
    harness: Harness,
) -> None:
    fake = BatchingOrchestrator()
    worker = Worker(settings=harness.settings, send=fake)
    fast = harness.dispatch("fast", node="fast", heartbeat_interval_s=0.01)
    slow = harness.dispatch("slow", node="slow")
    stale_from = threading.Event()
    refused: list[dict[str, Any]] = []

    def heartbeat_answer(body: dict[str, Any]) -> dict[str, Any]:
        if body["token"] == fast["token"] and stale_from.is_set():
            refused.append(body)
            return {"accepted": False, "reason": "stale_attempt"}
        return {"accepted": True}

    fake.heartbeat_answer = heartbeat_answer

    @worker.task("fast")
    def run_fast(ctx: TaskContext) -> dict[str, Any]:
        return {"fast": True}

    @worker.task("slow")
    def run_slow(ctx: TaskContext) -> dict[str, Any]:
        # `fast` returned before this started: its heartbeats go on while this runs (its first
        # beat came before it ran, the others from its heartbeat thread)...
        with fake.beaten:
            assert fake.beaten.wait_for(lambda: fake.heartbeats_of(fast["token"]) >= 3, timeout=10)
        # ...until one of them finds its attempt stale.
        stale_from.set()
        with fake.beaten:
            assert fake.beaten.wait_for(lambda: bool(refused), timeout=10)
        return {"slow": True}

    answers = worker.execute_many([fast, slow])

    # The stale one sends no callback (it would be refused); the other is sent alone.
    assert answers[0] == {"accepted": False, "reason": "stale_attempt"}
    assert answers[1]["outcome"] == "succeeded"  # type: ignore[index]
    assert [url for url in fake.urls() if url != HEARTBEAT] == [CALLBACK + "*"]
    # Its heartbeats stopped with the batch.
    assert not [t for t in threading.enumerate() if t.name == f"heartbeat-{fast['task_id']}"]


def test_heartbeats_of_finished_tasks_stop_once_the_batch_is_sent(harness: Harness) -> None:
    fake = BatchingOrchestrator()
    worker = worker_for(harness, fake)
    dispatches = [harness.dispatch("echo", node=f"n{i}", heartbeat_interval_s=0.01) for i in range(3)]
    answers = worker.execute_many(dispatches)
    assert [answer["outcome"] for answer in answers] == ["succeeded"] * 3  # type: ignore[index]
    assert [url for url in fake.urls() if url != HEARTBEAT] == [BATCH]
    names = {f"heartbeat-{d['task_id']}" for d in dispatches}
    assert not [t for t in threading.enumerate() if t.name in names]


# --- the local worker: callbacks of tasks that end together --------------------------------------


class HeldFirstCallback:
    """Sends through `inner`, holding the first callback request (single or batch) until
    `release` is set: the other tasks end while it is on its way."""

    def __init__(self, inner: BatchingOrchestrator) -> None:
        self.inner = inner
        self.holding = threading.Event()
        self.release = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def __call__(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if url != HEARTBEAT:
            with self._lock:
                first, self._first = self._first, False
            if first:
                self.holding.set()
                assert self.release.wait(10), "the test never released the first callback"
        return self.inner(url, body)


def test_the_local_worker_sends_the_callbacks_of_tasks_that_end_together_in_one_request(harness: Harness) -> None:
    fake = BatchingOrchestrator()
    held = HeldFirstCallback(fake)
    transport = LocalTransport(worker_for(harness, held), settings=harness.settings, threads=6)
    dispatches = [harness.dispatch("echo", node=f"n{i}") for i in range(6)]
    try:
        for dispatch in dispatches:
            transport.send(dispatch)
        poll(held.holding.is_set, "the first callback never went out", timeout_s=10)
        # the five others end while the first is on its way: they queue for one request
        poll(lambda: transport.batcher.queued == 5, "the other five callbacks never queued", timeout_s=10)
        held.release.set()
        assert transport.drain(10) == []
    finally:
        transport.close()

    callbacks = [(url, body) for url, body in fake.calls if url != HEARTBEAT]
    assert [url if url == BATCH else CALLBACK + "*" for url, _ in callbacks] == [CALLBACK + "*", BATCH]
    (first_url, _), (_, batch) = callbacks
    sent = [first_url.rsplit("/", 1)[1]] + [item["task_id"] for item in batch["callbacks"]]
    assert sorted(sent) == sorted(d["task_id"] for d in dispatches)  # each task's callback, once
    assert all(item["status"] == "succeeded" for item in batch["callbacks"])
    for i in range(6):
        assert read_json_object(harness.settings, harness.key(f"n{i}")) == {"node": f"n{i}"}


def test_an_idle_local_worker_sends_a_lone_callback_at_once(harness: Harness) -> None:
    fake = BatchingOrchestrator()
    transport = LocalTransport(worker_for(harness, fake), settings=harness.settings, threads=4)
    try:
        transport.send(harness.dispatch("echo", node="alone"))
        assert transport.drain(10) == []
    finally:
        transport.close()
    assert fake.urls() == [HEARTBEAT, CALLBACK + "*"]


def test_a_batch_that_cannot_be_sent_fails_each_of_its_tasks_own_call(harness: Harness) -> None:
    """The batcher hands every waiting thread its outcome: here the exception that kept the
    batch from being sent, raised from each task's own `execute` (the local transport logs it;
    the leases then expire and the tasks are sent again)."""
    fake = BatchingOrchestrator()

    def unreachable(url: str, body: dict[str, Any]) -> dict[str, Any]:
        if url == HEARTBEAT:
            return fake(url, body)
        raise httpx.ConnectError("orchestrator unreachable")

    worker = worker_for(harness, unreachable)
    batcher = worker.callback_batcher()
    dispatches = [harness.dispatch("echo", node=f"u{i}") for i in range(3)]
    outcomes: list[Any] = [None] * 3

    def run(i: int) -> None:
        try:
            outcomes[i] = worker.execute(dispatches[i], batcher=batcher)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(isinstance(o, httpx.ConnectError) for o in outcomes), outcomes
    assert batcher.queued == 0
