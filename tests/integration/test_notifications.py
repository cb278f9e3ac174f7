"""Notifications end to end against a real Postgres and a real HTTP receiver: events written by
the transactions that cause them (outbox triggers, migration 0022), delivered by the tick's
step with signed bodies, retried with backoff, never sent twice under one lease; SNS via moto;
the API's validation and workspace isolation."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import psycopg
import pytest
from starlette.testclient import TestClient

from infra.s3 import MotoServer
from orchestrator.api.app import create_app
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine import notifications
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.operations import expire_waits
from orchestrator.engine.service import Engine
from orchestrator.engine.worker_protocol import CallbackInput
from orchestrator.store import notifications as notification_store
from orchestrator.store import tasks as task_store
from tests.capturing import CapturingTransport

from .conftest import WORKSPACE

AUTH = {"Authorization": "Bearer acme-admin-key"}


# --- a real receiver -------------------------------------------------------------------------------


class _Listener(ThreadingHTTPServer):
    # The default backlog (5) resets connections when a tick sends 16 at once on a busy machine:
    # the receiver, not the sender, would be what failed.
    request_queue_size = 128


class Receiver:
    """An HTTP server on loopback that keeps every POST and answers the queued statuses in
    order (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.delay_s = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)  # a slow receiver, to widen the race between ticks
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _Listener(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in self.requests if path is None or p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def verified(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check, written from the docs, not with the engine's code."""
    timestamp = headers["x-tickweave-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    offered = [part.strip().removeprefix("sha256=") for part in headers["x-tickweave-signature"].split(",")]
    return abs(time.time() - int(timestamp)) < 300 and any(hmac.compare_digest(o, expected) for o in offered)


# --- helpers ------------------------------------------------------------------------------------------


def claim(engine: Engine, run_id: uuid.UUID | None = None) -> list[Row]:
    with engine.db.transaction() as conn:
        return task_store.claim_ready_tasks(conn, 100, run_id=run_id)


def finish(engine: Engine, task: Row, ok: bool = True) -> AttemptResult:
    def work(conn: Connection) -> AttemptResult:
        return finish_attempt(
            conn, task["id"], task["attempt"], task["claim_token"], succeeded=ok,
            output={"key": f"k/{task['node_id']}"} if ok else None,
            error=None if ok else {"code": "boom", "message": "it broke\nTraceback ...", "retryable": False},
            retryable=False,
        )

    return engine.db.run_in_transaction(work)


def move_clock(database_url: str, offset: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::interval)
                        ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """, (offset,))


def deliveries(engine: Engine) -> list[Row]:
    with engine.db.connection() as conn:
        return conn.execute(
            """SELECT d.*, e.type AS event_type, e.data FROM notification_deliveries d
               JOIN notification_events e ON e.id = d.event_id ORDER BY d.created_at, d.target"""
        ).fetchall()


def events_by_type(engine: Engine) -> dict[str, int]:
    with engine.db.connection() as conn:
        rows = conn.execute("SELECT type, count(*)::int AS n FROM notification_events GROUP BY type").fetchall()
    return {r["type"]: r["n"] for r in rows}


# --- events: exactly one delivery per matching target ------------------------------------------------


def test_each_event_type_makes_one_delivery_per_matching_target_and_each_is_delivered_signed(
    engine: Engine, receiver: Receiver,
) -> None:
    every = receiver.url("/all")
    failures_only = receiver.url("/failed")
    notify = [{"webhook": every}, {"webhook": failures_only, "events": ["run.failed"]}]
    engine.create_pipeline(WORKSPACE, {"id": "gate", "notify": notify, "nodes": [
        {"id": "approve", "kind": "approval", "approval": {"timeout_s": 60, "on_timeout": "escalate"}}]})
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "name": "The one that breaks", "notify": notify,
                                       "nodes": [{"id": "x", "task": "fail"}]})
    engine.create_pipeline(WORKSPACE, {"id": "tolerant", "notify": notify, "steps": [
        {"id": "one", "task": "fail", "on_failure": "continue"}, {"id": "two", "task": "echo"}]})
    engine.create_pipeline(WORKSPACE, {"id": "fine", "notify": notify, "nodes": [{"id": "a", "task": "echo"}]})

    gate = engine.trigger_run(WORKSPACE, "gate", dispatch_now=False)  # its approval waits at once
    breaks = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    (x,) = claim(engine, breaks.id)
    assert finish(engine, x, ok=False).run_status == "failed"  # dead-lettered, and the run failed
    tolerant = engine.trigger_run(WORKSPACE, "tolerant", dispatch_now=False)
    finish(engine, claim(engine, tolerant.id)[0], ok=False)  # dead-lettered, tolerated
    assert finish(engine, claim(engine, tolerant.id)[0]).run_status == "succeeded"
    fine = engine.trigger_run(WORKSPACE, "fine", dispatch_now=False)
    assert finish(engine, claim(engine, fine.id)[0]).run_status == "succeeded"  # nothing to say
    move_clock(engine.settings.database_url, "61 seconds")
    assert expire_waits(engine.db, 10) == 1  # escalated, still waiting

    assert events_by_type(engine) == {"approval.waiting": 1, "approval.escalated": 1, "task.dead_lettered": 2,
                                      "run.failed": 1, "run.succeeded_with_failures": 1}
    rows = deliveries(engine)
    per_target = sorted((r["event_type"], r["target"]) for r in rows)
    assert per_target == sorted([(t, every) for t in ("approval.waiting", "approval.escalated", "task.dead_lettered",
                                                      "task.dead_lettered", "run.failed",
                                                      "run.succeeded_with_failures")]
                                + [("run.failed", failures_only)])
    assert {r["status"] for r in rows} == {"pending"}

    summary = notifications.deliver_due(engine.db, engine.settings)
    assert (summary.claimed, summary.delivered) == (7, 7)
    assert {r["status"] for r in deliveries(engine)} == {"delivered"}
    assert notifications.deliver_due(engine.db, engine.settings).claimed == 0  # nothing twice

    secret = notifications.read_secret(engine.db, WORKSPACE)["secret"]
    assert len(receiver.requests) == 7
    for path, headers, body in receiver.requests:
        assert verified(secret, headers, body), (path, headers)
        message = json.loads(body)
        assert headers["x-tickweave-event-id"] == message["id"] and headers["x-tickweave-event"] == message["type"]
        assert message["workspace"] == WORKSPACE and message["links"]["run"].endswith(message["data"]["run_id"])
    by_type = {m["type"]: m for m in receiver.bodies("/all")}
    assert by_type["run.failed"]["data"]["pipeline_name"] == "The one that breaks"
    assert by_type["run.failed"]["summary"].startswith(f"Run {str(breaks.id)[:8]} of The one that breaks failed")
    assert by_type["run.succeeded_with_failures"]["data"]["failed_tasks"] == 1
    assert by_type["run.succeeded_with_failures"]["data"]["run_id"] == str(tolerant.id)
    assert by_type["approval.waiting"]["data"]["task_id"] == by_type["approval.escalated"]["data"]["task_id"]
    assert by_type["approval.escalated"]["data"]["run_id"] == str(gate.id)
    assert by_type["approval.escalated"]["data"]["escalated_at"] is not None
    dead = [m for m in receiver.bodies("/all") if m["type"] == "task.dead_lettered"]
    assert {m["data"]["error"]["message"] for m in dead} == {"it broke\nTraceback ..."}
    assert all(m["summary"].endswith(": it broke") for m in dead)  # the error's first line
    assert [m["type"] for m in receiver.bodies("/failed")] == ["run.failed"]
    assert str(fine.id) not in {m["data"]["run_id"] for m in receiver.bodies()}


def test_the_one_statement_callback_writes_its_events_too(settings: Settings, receiver: Receiver) -> None:
    """The batch callback ends runs and makes approvals wait inside tw_complete_attempts
    (PL/pgSQL): the triggers see those transitions like any other."""
    transport = CapturingTransport()
    engine = Engine(settings, Database(settings.database_url, max_size=4), transports={"local": transport})
    engine.dispatcher._issue_grant = lambda settings, **kwargs: None  # type: ignore[method-assign]
    try:
        engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
        engine.create_pipeline(WORKSPACE, {"id": "p", "notify": [{"webhook": receiver.url()}], "nodes": [
            {"id": "a", "task": "echo"}, {"id": "gate", "kind": "approval", "depends": ["a"]}]})
        run = engine.trigger_run(WORKSPACE, "p")
        (message,) = transport.take_run(run.id, "a")
        answers = engine.record_callbacks([CallbackInput(uuid.UUID(message["task_id"]), message["token"], "succeeded",
                                                         output={"key": "out/a/1"})])
        assert isinstance(answers[0], AttemptResult) and answers[0].accepted
        assert events_by_type(engine) == {"approval.waiting": 1}
        notifications.deliver_due(engine.db, engine.settings)
        assert [m["data"]["node_id"] for m in receiver.bodies()] == ["gate"]
    finally:
        engine.close()


def test_an_event_of_a_rolled_back_transaction_sends_nothing(engine: Engine, receiver: Receiver) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url()}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    (x,) = claim(engine, run.id)

    class Abandon(Exception):
        pass

    with pytest.raises(Abandon), engine.db.transaction() as conn:
        result = finish_attempt(conn, x["id"], x["attempt"], x["claim_token"], succeeded=False,
                                error={"message": "boom"}, retryable=False)
        assert result.run_status == "failed"
        # inside the transaction the outbox holds the events...
        assert conn.execute("SELECT count(*) AS n FROM notification_events").fetchone()["n"] == 2  # type: ignore[index]
        raise Abandon
    assert events_by_type(engine) == {}  # ...and they went with it
    assert notifications.deliver_due(engine.db, engine.settings).claimed == 0
    assert receiver.requests == []


def test_workspace_default_applies_unless_the_pipeline_says_otherwise(engine: Engine, receiver: Receiver) -> None:
    notifications.set_defaults(engine.db, engine.settings, WORKSPACE,
                               {"notify": [{"webhook": receiver.url("/default"), "events": ["run.failed"]}]})
    engine.create_pipeline(WORKSPACE, {"id": "plain", "nodes": [{"id": "x", "task": "fail"}]})
    engine.create_pipeline(WORKSPACE, {"id": "quiet", "notify": [], "nodes": [{"id": "x", "task": "fail"}]})
    engine.create_pipeline(WORKSPACE, {"id": "own", "notify": [{"webhook": receiver.url("/own"), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    for pipeline in ("plain", "quiet", "own"):
        run = engine.trigger_run(WORKSPACE, pipeline, dispatch_now=False)
        finish(engine, claim(engine, run.id)[0], ok=False)
    notifications.deliver_due(engine.db, engine.settings)
    assert [(p, json.loads(b)["data"]["pipeline_id"]) for p, _, b in receiver.requests] in (
        [("/default", "plain"), ("/own", "own")], [("/own", "own"), ("/default", "plain")])


# --- delivery: retries, leases, races -------------------------------------------------------------------


def test_a_failing_receiver_is_retried_with_backoff_and_the_delivery_recorded(engine: Engine, receiver: Receiver) -> None:
    receiver.answers = [500]
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url(), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)

    first = notifications.deliver_due(engine.db, engine.settings)
    assert (first.claimed, first.retrying, first.delivered) == (1, 1, 0)
    (row,) = deliveries(engine)
    assert (row["status"], row["attempts"], row["http_status"]) == ("pending", 1, 500)
    assert row["last_error"] == "the endpoint answered 500"
    with engine.db.connection() as conn:
        delay = conn.execute("SELECT extract(epoch FROM next_attempt_at - tw_now()) AS s FROM notification_deliveries"
                             ).fetchone()["s"]  # type: ignore[index]
    assert 25 <= float(delay) <= 30  # the first retry 30 s after the first attempt
    assert notifications.deliver_due(engine.db, engine.settings).claimed == 0  # not due yet

    move_clock(engine.settings.database_url, "31 seconds")
    second = notifications.deliver_due(engine.db, engine.settings)
    assert (second.claimed, second.delivered) == (1, 1)
    (row,) = deliveries(engine)
    assert (row["status"], row["attempts"], row["http_status"], row["last_error"]) == ("delivered", 2, 200, None)
    assert row["delivered_at"] is not None and row["next_attempt_at"] is None
    assert [(h["attempt"], h["ok"], h["http_status"]) for h in row["history"]] == [(1, False, 500), (2, True, 200)]
    # two requests, the same event (for the receiver to drop the duplicate if the first had landed)
    assert len(receiver.requests) == 2
    assert receiver.requests[0][1]["x-tickweave-event-id"] == receiver.requests[1][1]["x-tickweave-event-id"]
    assert [h["x-tickweave-attempt"] for _, h, _ in receiver.requests] == ["1", "2"]
    move_clock(engine.settings.database_url, "1 day")
    assert notifications.deliver_due(engine.db, engine.settings).claimed == 0  # delivered once, recorded


def test_a_delivery_gives_up_after_its_attempts(engine: Engine, receiver: Receiver) -> None:
    settings = engine.settings.with_overrides(notify_max_attempts=2)
    receiver.answers = [503, 503, 503]
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url(), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)
    notifications.deliver_due(engine.db, settings)
    move_clock(settings.database_url, "31 seconds")
    assert notifications.deliver_due(engine.db, settings).failed == 1
    (row,) = deliveries(engine)
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("failed", 2, None)
    move_clock(settings.database_url, "1 day")
    assert notifications.deliver_due(engine.db, settings).claimed == 0
    # an operator sends it once more
    notifications.retry_delivery(engine.db, WORKSPACE, row["id"])
    receiver.answers = []
    assert notifications.deliver_due(engine.db, settings).delivered == 1


def test_a_lapsed_lease_is_sent_again_and_the_late_record_is_refused(engine: Engine, receiver: Receiver) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url(), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)
    # a tick claims and dies before sending or recording
    with engine.db.transaction() as conn:
        (lost,) = notification_store.claim_due(conn, 10, notifications.lease_s(engine.settings))
    assert notifications.deliver_due(engine.db, engine.settings).claimed == 0  # its lease holds
    move_clock(engine.settings.database_url, f"{int(notifications.lease_s(engine.settings)) + 1} seconds")
    assert notifications.deliver_due(engine.db, engine.settings).delivered == 1
    with engine.db.transaction() as conn:  # the dead tick's record, were it to come back, changes nothing
        assert notification_store.record_attempt(
            conn, lost["id"], lost["claim_token"], ok=False, retryable=True, http_status=None, error="late",
            duration_ms=1, base_delay_s=30, max_delay_s=60, max_attempts=5, give_up_after_s=86400) is None
    (row,) = deliveries(engine)
    assert (row["status"], row["attempts"]) == ("delivered", 2)
    assert len(receiver.requests) == 1


def test_two_ticks_racing_never_send_a_delivery_twice(settings: Settings, engine: Engine, receiver: Receiver) -> None:
    receiver.delay_s = 0.05
    targets = [{"webhook": receiver.url(f"/r{i}")} for i in range(10)]
    for n in range(3):
        engine.create_pipeline(WORKSPACE, {"id": f"p{n}", "notify": targets, "nodes": [{"id": "x", "task": "fail"}]})
        run = engine.trigger_run(WORKSPACE, f"p{n}", dispatch_now=False)
        finish(engine, claim(engine, run.id)[0], ok=False)
    total = len(deliveries(engine))
    assert total == 3 * 2 * 10  # (run.failed + task.dead_lettered) x 10 targets, three times
    racing = settings.with_overrides(notify_batch_size=7)
    barrier = threading.Barrier(3)
    results: list[notifications.DeliverySummary] = []
    errors: list[BaseException] = []

    def tick() -> None:
        db = Database(settings.database_url, max_size=2)  # its own connections
        try:
            barrier.wait()
            results.append(notifications.deliver_due(db, racing, max_rounds=100))
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=tick) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    sent = [headers["x-tickweave-delivery"] for _, headers, _ in receiver.requests]
    assert len(sent) == len(set(sent)) == total
    assert sum(r.delivered for r in results) == total and sum(1 for r in results if r.claimed) >= 2
    assert {r["status"] for r in deliveries(engine)} == {"delivered"}


def test_rotating_the_secret_signs_with_both_during_the_grace_period(engine: Engine, receiver: Receiver) -> None:
    old = notifications.read_secret(engine.db, WORKSPACE)["secret"]
    assert notifications.read_secret(engine.db, WORKSPACE)["secret"] == old  # made once
    new = notifications.rotate_secret(engine.db, engine.settings, WORKSPACE)["secret"]
    assert new != old
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url(), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)
    notifications.deliver_due(engine.db, engine.settings)
    (_, headers, body) = receiver.requests[0]
    assert verified(new, headers, body) and verified(old, headers, body)
    assert len(headers["x-tickweave-signature"].split(",")) == 2


def test_sns_targets_are_published_to(settings: Settings, moto_server: MotoServer, receiver: Receiver) -> None:
    sns_settings = settings.with_overrides(s3_endpoint_url=moto_server.endpoint_url)
    engine = Engine(sns_settings, Database(settings.database_url, max_size=4), transports={})
    try:
        engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
        sns = boto3.client("sns", region_name="us-east-1", endpoint_url=moto_server.endpoint_url)
        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=moto_server.endpoint_url)
        topic = sns.create_topic(Name=f"tw-{uuid.uuid4().hex[:8]}")["TopicArn"]
        queue_url = sqs.create_queue(QueueName=f"tw-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
        engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"sns": topic, "events": ["run.failed"]}],
                                           "nodes": [{"id": "x", "task": "fail"}]})
        run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
        finish(engine, claim(engine, run.id)[0], ok=False)
        assert notifications.deliver_due(engine.db, engine.settings).delivered == 1
        received = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=2)["Messages"]
        (message,) = [json.loads(m["Body"]) for m in received]
        assert message["type"] == "run.failed" and message["data"]["run_id"] == str(run.id)
        (row,) = deliveries(engine)
        assert (row["target_kind"], row["status"]) == ("sns", "delivered")
    finally:
        engine.close()


# --- the API -------------------------------------------------------------------------------------------


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine), raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


@pytest.mark.parametrize(("notify", "path", "words"), [
    ([{"webhook": "http://example.com/hook"}], "notify[0].webhook", "use https"),
    ([{"webhook": "https://example.com/hook", "events": ["run.exploded"]}], "notify[0].events[0]", "unknown event"),
    ([{"sns": "arn:aws:sqs:us-east-1:123456789012:q"}], "notify[0].sns", "not an SNS topic ARN"),
    ([{"webhook": "https://a.example.com", "sns": "arn:aws:sns:us-east-1:123456789012:t"}], "notify[0].webhook",
     "either webhook"),
    ([{"webhook": "https://user:pw@example.com/h"}], "notify[0].webhook", "user name or password"),
    ([{"webhook": "https://example.com/h", "url": "x"}], "notify[0].url", ""),
    ([{"webhook": "https://example.com/h"}, {"webhook": "https://example.com/h"}], "notify", "more than once"),
    ("https://example.com/h", "notify", ""),
])
def test_bad_notify_definitions_are_422_with_the_path(client: TestClient, notify: Any, path: str, words: str) -> None:
    body = error_of(client.post("/api/pipelines", json={"id": "p", "notify": notify,
                                                        "nodes": [{"id": "a", "task": "echo"}]}, headers=AUTH), 422)
    assert path in [d["path"] for d in body["details"]], body
    assert words in body["message"]
    assert client.get("/api/pipelines/p", headers=AUTH).status_code == 404


def test_private_webhooks_are_refused_unless_the_deployment_allows_them(engine: Engine) -> None:
    strict = engine.settings.with_overrides(allow_private_worker_endpoints=False)
    with TestClient(create_app(strict, Engine(strict, engine.db, transports={})),
                    raise_server_exceptions=False) as strict_client:
        for url in ("https://127.0.0.1/hook", "http://localhost:9000/hook", "https://10.1.2.3/hook"):
            definition = {"id": "p", "notify": [{"webhook": url}], "nodes": [{"id": "a", "task": "echo"}]}
            body = error_of(strict_client.post("/api/pipelines", json=definition, headers=AUTH), 422)
            assert body["details"][0]["path"] == "notify[0].webhook" and "private" in body["message"]
            report = strict_client.post("/api/pipelines/validate", json=definition, headers=AUTH).json()
            assert report["valid"] is False
            body = error_of(strict_client.put("/api/notifications/defaults", json={"notify": [{"webhook": url}]},
                                              headers=AUTH), 422)
            assert body["details"][0]["path"] == "notify[0].webhook"
        assert strict_client.post("/api/pipelines", json={
            "id": "p", "notify": [{"webhook": "https://hooks.example.com/x"}], "nodes": [{"id": "a", "task": "echo"}]},
            headers=AUTH).status_code == 201


def test_defaults_secret_and_deliveries_through_the_api(client: TestClient, engine: Engine, receiver: Receiver) -> None:
    assert client.get("/api/notifications/defaults", headers=AUTH).json()["notify"] is None
    bad = error_of(client.put("/api/notifications/defaults", json={"notify": [{"webhook": receiver.url(),
                                                                              "events": ["nope"]}]}, headers=AUTH), 422)
    assert bad["details"][0]["path"] == "notify[0].events[0]"
    put = client.put("/api/notifications/defaults", json={"notify": [{"webhook": receiver.url("/secret/path?token=s3")}]},
                     headers=AUTH)
    assert put.status_code == 200, put.text
    assert client.get("/api/notifications/defaults", headers=AUTH).json()["notify"] == [
        {"webhook": receiver.url("/secret/path?token=s3")}]
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)

    secret = client.get("/api/notifications/secret", headers=AUTH).json()["secret"]
    assert secret.startswith("tws_")
    assert secret not in client.get("/api/pipelines/breaks", headers=AUTH).text
    assert client.post("/api/tick", headers={"Authorization": f"Bearer {engine.settings.tick_secret}"}).status_code == 200
    assert all(verified(secret, h, b) for _, h, b in receiver.requests) and len(receiver.requests) == 2

    page = client.get("/api/notifications?limit=1", headers=AUTH).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = client.get(f"/api/notifications?limit=5&cursor={page['next_cursor']}", headers=AUTH).json()
    items = page["items"] + rest["items"]
    assert sorted(i["event_type"] for i in items) == ["run.failed", "task.dead_lettered"]
    assert {i["status"] for i in items} == {"delivered"}
    assert {i["target"] for i in items} == {f"http://127.0.0.1:{receiver.server.server_address[1]}/…"}  # no path
    assert client.get("/api/notifications?status=failed", headers=AUTH).json()["items"] == []
    assert error_of(client.get("/api/notifications?status=dead", headers=AUTH), 422)["details"][0]["path"] == "status"
    one = client.get(f"/api/notifications/{items[0]['id']}", headers=AUTH).json()
    assert one["history"][0]["http_status"] == 200 and one["event"]["data"]["run_id"] == str(run.id)
    assert error_of(client.post(f"/api/notifications/{items[0]['id']}/retry", headers=AUTH), 409)["code"] == "conflict"

    rotated = client.post("/api/notifications/secret", headers=AUTH).json()
    assert rotated["secret"] != secret and rotated["previous_secret_expires_at"] is not None
    assert client.put("/api/notifications/defaults", json={"notify": None}, headers=AUTH).json()["notify"] is None


def test_roles_and_other_workspaces(client: TestClient, engine: Engine, receiver: Receiver) -> None:
    engine.create_pipeline(WORKSPACE, {"id": "breaks", "notify": [{"webhook": receiver.url(), "events": ["run.failed"]}],
                                       "nodes": [{"id": "x", "task": "fail"}]})
    run = engine.trigger_run(WORKSPACE, "breaks", dispatch_now=False)
    finish(engine, claim(engine, run.id)[0], ok=False)
    (delivery,) = deliveries(engine)
    viewer = {"Authorization": f"Bearer {engine.create_api_key(WORKSPACE, 'viewer')[0]}"}
    assert client.get("/api/notifications", headers=viewer).status_code == 200
    for method, path in (("GET", "/api/notifications/secret"), ("POST", "/api/notifications/secret"),
                         ("GET", "/api/notifications/defaults")):
        assert error_of(client.request(method, path, headers=viewer), 403)["code"] == "forbidden"
    assert error_of(client.put("/api/notifications/defaults", json={"notify": []}, headers=viewer), 403)

    other = {"Authorization": f"Bearer {engine.create_api_key('other', 'admin')[0]}"}
    assert client.get("/api/notifications", headers=other).json()["items"] == []
    assert error_of(client.get(f"/api/notifications/{delivery['id']}", headers=other), 404)["code"] == "not_found"
    assert error_of(client.post(f"/api/notifications/{delivery['id']}/retry", headers=other), 404)
    acme_secret = client.get("/api/notifications/secret", headers=AUTH).json()["secret"]
    other_secret = client.get("/api/notifications/secret", headers=other).json()["secret"]
    assert other_secret != acme_secret
    assert error_of(client.get("/api/notifications/not-a-uuid", headers=AUTH), 404)


def test_the_claim_of_due_deliveries_uses_its_partial_index(engine: Engine) -> None:
    with engine.db.connection() as conn:
        # a long-lived outbox: thousands of finished deliveries, a few due
        conn.execute("""INSERT INTO notification_events (id, workspace_id, type, pipeline_id, run_id, data)
                        SELECT gen_random_uuid(), 'acme', 'run.failed', 'p', gen_random_uuid(), '{}'
                        FROM generate_series(1, 5000)""")
        conn.execute("""INSERT INTO notification_deliveries (event_id, workspace_id, target_kind, target, status,
                                                             next_attempt_at)
                        SELECT e.id, e.workspace_id, 'webhook', 'https://example.com/h', s.status,
                               CASE WHEN s.status = 'pending' THEN tw_now() END
                        FROM notification_events e CROSS JOIN LATERAL (  -- about one in 256 due
                            SELECT CASE WHEN left(e.id::text, 2) = '00' THEN 'pending' ELSE 'delivered' END AS status) s""")
        conn.execute("ANALYZE notification_deliveries")
        rows = conn.execute("""EXPLAIN (FORMAT JSON) SELECT id FROM notification_deliveries
                               WHERE status IN ('pending', 'sending') AND next_attempt_at <= tw_now()
                               ORDER BY next_attempt_at LIMIT 16 FOR UPDATE SKIP LOCKED""").fetchall()
    plan = json.dumps(rows[0])
    assert "notification_deliveries_due_idx" in plan and "Seq Scan" not in plan
