"""Long-running worker processes: an HTTP worker service (the `http` transport's counterpart) and
an SQS polling loop (the `sqs` transport's counterpart).

Starlette and boto3 are imported inside the functions that need them, so `orchestrator.worker`
stays importable in a Lambda worker image that has neither the web framework nor uses SQS.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.storage.signatures import SIGNATURE_HEADER, verify_dispatch
from orchestrator.worker.sdk import _Refused

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from orchestrator.config import Settings
    from orchestrator.worker.sdk import Worker

__all__ = ["DEFAULT_SQS_WAIT_S", "WorkerService", "create_app", "run_sqs"]

log = logging.getLogger("tickweave.worker.service")

DEFAULT_CONCURRENCY = 8
MAX_DISPATCH_BYTES = 1_048_576
# SQS long polling: the longest wait SQS allows, so an idle worker makes ~3 requests a minute.
DEFAULT_SQS_WAIT_S = 20
# SQS caps a message's visibility timeout at 12 hours.
_MAX_VISIBILITY_S = 43_200
# Kept hidden a little past the attempt's deadline: by then the orchestrator's lease has
# lapsed and the tick dispatches a new attempt with a new message, so redelivering this one
# would only start a run the server refuses as stale.
_VISIBILITY_SLACK_S = 60
_SQS_ERROR_BACKOFF_S = 2.0


class WorkerService:
    """Accepts dispatches for a Worker and runs them on a bounded thread pool.

    Admission is decided before anything runs: the request must be authenticated (below), the
    token must decrypt with the worker's key ring and match the message (otherwise 401, and the
    dispatcher records a dispatch failure), and a free slot must exist (otherwise 503, and the
    dispatcher puts the task back to `ready` to try later). A task is never queued inside the
    service, where its lease could run out unseen.

    Authentication: a dispatch signed (X-Tickweave-Signature) with one of the worker's
    registration secrets, or, for the platform's configured `http` transport, the bearer
    `auth_token`. Once the worker holds a registration secret, a dispatch with neither is
    refused; before any registration and without an `auth_token`, the token is the only check.
    """

    def __init__(
        self, worker: Worker, *, settings: Settings | None = None, auth_token: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY, signing_secrets: tuple[str, ...] = (),
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.worker = worker
        self.settings = settings or worker.settings
        self.auth_token = auth_token
        self.signing_secrets = tuple(signing_secrets)
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tickweave-worker-service")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._completed = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def completed(self) -> int:
        """Dispatches that ran to their end (succeeded, failed or refused by the server)."""
        with self._lock:
            return self._completed

    def authorized(self, header: str | None) -> bool:
        """The bearer check of the configured (platform) transport; True when none is set."""
        if not self.auth_token:
            return True
        expected = f"Bearer {self.auth_token}".encode()
        # Constant time: the comparison must not reveal how much of a guess was right.
        return header is not None and hmac.compare_digest(header.encode(), expected)

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """None when the request may be read; otherwise why not (never a secret)."""
        secrets = (*self.signing_secrets, *self.worker.dispatch_secrets)
        if secrets and (headers.get(SIGNATURE_HEADER) is not None or not self.auth_token):
            # Signed, or it must be: the worker registered and expects no platform secret.
            return verify_dispatch(secrets, headers, body)
        if self.auth_token:
            return None if self.authorized(headers.get("authorization")) else "unauthorized"
        return None  # neither registered nor given a secret: the token is the only check

    def check(self, dispatch: Mapping[str, Any]) -> str | None:
        """None when the token is good; otherwise the reason (never the token itself)."""
        try:
            self.worker._authenticate(dispatch, self.settings)
        except _Refused as refused:
            return refused.reason
        return None

    def submit(self, dispatch: Mapping[str, Any]) -> bool:
        """Start the dispatch on a pool thread; False when every slot is taken."""
        with self._lock:
            if self._in_flight >= self.concurrency:
                return False
            self._in_flight += 1
        try:
            self._pool.submit(self._execute, dispatch)
        except RuntimeError:  # the pool is shut down: the service is stopping
            self._finished()
            return False
        return True

    def close(self, *, wait: bool = True) -> None:
        # Waiting lets tasks in flight call back before the process exits (a graceful stop);
        # a hard kill is covered by the orchestrator's leases.
        self._pool.shutdown(wait=wait)

    def _execute(self, dispatch: Mapping[str, Any]) -> None:
        try:
            self.worker.execute(dispatch, settings=self.settings)
        except Exception:
            # The callback could not be delivered even after the sender's retries; the lease
            # expires on the server and the tick retries the attempt.
            log.exception("dispatch of task %s failed", dispatch.get("task_id"))
        finally:
            self._finished(completed=True)

    def _finished(self, *, completed: bool = False) -> None:
        with self._lock:
            self._in_flight -= 1
            if completed:
                self._completed += 1


def create_app(
    worker: Worker, *, path: str = "/dispatch", auth_token: str | None = None, settings: Settings | None = None,
    concurrency: int = DEFAULT_CONCURRENCY, signing_secrets: tuple[str, ...] = (),
) -> Starlette:
    """A Starlette app: `POST {path}` takes a dispatch message, `GET /health` reports.

    `auth_token` (default: the worker settings' `worker_auth_token`, from
    TICKWEAVE_WORKER_AUTH_TOKEN) is the shared bearer secret the platform's configured `http`
    transport sends. Dispatches to a registered endpoint are signed instead: with the secret
    `Worker.register` got (kept by the worker), or one of `signing_secrets`.
    The service object is `app.state.service`.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    resolved = settings or worker.settings
    service = WorkerService(
        worker, settings=resolved, auth_token=auth_token if auth_token is not None else resolved.worker_auth_token,
        concurrency=concurrency, signing_secrets=signing_secrets,
    )

    async def dispatch(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_DISPATCH_BYTES:
            return JSONResponse({"accepted": False, "error": "too_large"}, status_code=413)
        # The signature covers the exact bytes, so the body is read before anything is parsed.
        refused = service.authenticate(request.headers, body)
        if refused is not None:
            log.warning("dispatch refused: %s", refused)
            return JSONResponse({"accepted": False, "error": "unauthorized", "reason": refused}, status_code=401)
        try:
            message = json.loads(body)
        except ValueError:
            return JSONResponse({"accepted": False, "error": "malformed"}, status_code=400)
        if not isinstance(message, dict):
            return JSONResponse({"accepted": False, "error": "malformed"}, status_code=400)
        reason = service.check(message)
        if reason is not None:
            log.warning("dispatch for task %s refused: %s", message.get("task_id"), reason)
            return JSONResponse({"accepted": False, "error": "invalid_token", "reason": reason}, status_code=401)
        if not service.submit(message):
            return JSONResponse(
                {"accepted": False, "error": "busy"}, status_code=503, headers={"Retry-After": "5"}
            )
        return JSONResponse({"accepted": True, "task_id": message.get("task_id")}, status_code=202)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok", "tasks": list(worker.task_names), "in_flight": service.in_flight,
            "concurrency": service.concurrency,
        })

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        service.close()

    app = Starlette(
        routes=[Route(path, dispatch, methods=["POST"]), Route("/health", health, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def run_sqs(
    worker: Worker, queue_url: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
    stop: threading.Event | None = None, max_messages: int = 10, wait_s: int = DEFAULT_SQS_WAIT_S,
    settings: Settings | None = None, client: Any | None = None,
) -> int:
    """Poll `queue_url` and execute each dispatch until `stop` is set; returns how many ran.

    A batch's messages run concurrently, and the next receive waits for the batch to end, so
    `max_messages` (1-10, SQS's limit) is also the concurrency. `stop` is checked between
    receives: stopping takes up to `wait_s` plus the running batch. The batch's callbacks go to
    the orchestrator together, in one `POST /api/callbacks` (`Worker.execute_many`); a task
    that finished early keeps heartbeating until then.

    A message is deleted once its callback was answered, whatever the outcome: a failed task
    was reported to the orchestrator, which decides about retries, and a refused token or an
    unreadable body would fail the same way on every redelivery. A message whose callback never
    got through is left to reappear, or to the queue's redrive policy.
    """
    if not 1 <= max_messages <= 10:
        raise ValueError("max_messages must be between 1 and 10 (SQS's limit)")
    stop = stop or threading.Event()
    resolved = settings or worker.settings
    if client is None:
        import boto3

        client = boto3.session.Session(region_name=region).client("sqs", endpoint_url=endpoint_url)
    from botocore.exceptions import BotoCoreError, ClientError

    executed = 0
    with ThreadPoolExecutor(max_workers=max_messages, thread_name_prefix="tickweave-sqs-worker") as pool:
        while not stop.is_set():
            try:
                received = client.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=max_messages, WaitTimeSeconds=wait_s,
                )
            except (BotoCoreError, ClientError):
                log.warning("receiving from %s failed", queue_url, exc_info=True)
                stop.wait(_SQS_ERROR_BACKOFF_S)
                continue
            messages = received.get("Messages", [])
            if messages:
                executed += _handle_sqs_batch(worker, client, queue_url, messages, resolved, pool)
    return executed


def _handle_sqs_batch(
    worker: Worker, client: Any, queue_url: str, messages: list[Mapping[str, Any]], settings: Settings,
    pool: ThreadPoolExecutor,
) -> int:
    """Execute one received batch: its dispatches run on `pool`, their callbacks are sent
    together, and each message is deleted once its callback was answered. Returns how many
    dispatches were executed."""
    runnable: list[tuple[Mapping[str, Any], dict[str, Any]]] = []
    for message in messages:
        try:
            dispatch = json.loads(message.get("Body", ""))
            if not isinstance(dispatch, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            log.error("SQS message %s is not a dispatch message; deleting it", message.get("MessageId"))
            _delete(client, queue_url, message)
            continue
        runnable.append((message, dispatch))
    list(pool.map(lambda m: _hide_until_deadline(client, queue_url, m[0]["ReceiptHandle"], m[1].get("deadline")),
                  runnable))
    outcomes = worker.execute_many([dispatch for _, dispatch in runnable], settings=settings, executor=pool)
    executed = 0
    for (message, dispatch), outcome in zip(runnable, outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.error("dispatch of task %s failed; leaving the message to reappear", dispatch.get("task_id"),
                      exc_info=outcome)
            continue
        _delete(client, queue_url, message)
        executed += 1
    return executed


def _delete(client: Any, queue_url: str, message: Mapping[str, Any]) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    except (BotoCoreError, ClientError):
        # Not fatal: a redelivered dispatch is refused by the server as a finished or stale
        # attempt, or by the worker as an expired token.
        log.warning("deleting SQS message %s failed", message.get("MessageId"), exc_info=True)


def _hide_until_deadline(client: Any, queue_url: str, receipt: str, deadline: Any) -> None:
    """Keep the message invisible while its task may run, so no other poller starts it again
    (the queue's default visibility timeout, 30 s, is shorter than many tasks)."""
    from botocore.exceptions import BotoCoreError, ClientError

    timeout = _MAX_VISIBILITY_S
    if isinstance(deadline, str) and deadline:
        try:
            remaining = datetime.fromisoformat(deadline.replace("Z", "+00:00")).timestamp() - time.time()
        except ValueError:
            remaining = float(_MAX_VISIBILITY_S)
        timeout = int(min(_MAX_VISIBILITY_S, max(0.0, remaining) + _VISIBILITY_SLACK_S))
    try:
        client.change_message_visibility(QueueUrl=queue_url, ReceiptHandle=receipt, VisibilityTimeout=timeout)
    except (BotoCoreError, ClientError):
        log.warning("extending the visibility of an SQS message failed", exc_info=True)
