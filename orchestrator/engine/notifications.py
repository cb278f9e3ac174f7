"""Notifications: the workspace's settings, the address policy for targets, and the tick's
delivery step (docs/notifications.md).

Events are written to an outbox by database triggers in the transaction that causes them
(migration 0022). The tick claims due deliveries with a lease (FOR UPDATE SKIP LOCKED), sends
them with no transaction open, and records each attempt fenced by its claim token: a delivery
is sent at least once, and never twice under one lease. Webhook bodies are signed with the
workspace's secret (HMAC-SHA256 of `<timestamp>.<body>`); SNS targets are published to with
the function's own AWS credentials.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from orchestrator.config import Settings, aws_client
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.dispatch.addresses import endpoint_problem
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.graph import format_path
from orchestrator.logs import log_event
from orchestrator.model.notify import (
    NotifyDefaults,
    NotifyTarget,
    is_private_host,
    sns_region,
    webhook_problem,
)
from orchestrator.store import notifications as store

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

DELIVERY_STATUSES = ("pending", "sending", "delivered", "failed")
SIGNATURE_HEADER = "X-Tickweave-Signature"
TIMESTAMP_HEADER = "X-Tickweave-Timestamp"
# The "1" is the message format's version (docs/notifications.md), not the product's.
USER_AGENT = "Tickweave-Notifications/1"
# An answer body is never kept (the endpoint could be anything a tenant points it at); an error
# message is cut to this length.
MAX_ERROR_LENGTH = 500


# --- address policy ---------------------------------------------------------------------------


def webhook_address_problem(settings: Settings, url: str) -> str | None:
    """Why `url` may not be a webhook target in this deployment, judged as written (no DNS):
    its shape (the model's rules), and a loopback/private host or plain http only where
    TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS is on."""
    problem = webhook_problem(url)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_private_host(host) and not settings.allow_private_worker_endpoints:
        return (
            f"{host} is a loopback or private address: notifications may only go to public https "
            "endpoints here (TICKWEAVE_ALLOW_PRIVATE_WORKER_ENDPOINTS is off)"
        )
    return None


def target_problems(settings: Settings, targets: Sequence[NotifyTarget], prefix: str) -> list[dict[str, str]]:
    """The address-policy problems of valid targets, as {path, message} (paths under `prefix`)."""
    problems = []
    for index, target in enumerate(targets):
        if target.webhook is not None:
            problem = webhook_address_problem(settings, target.webhook)
            if problem is not None:
                problems.append({"path": f"{prefix}[{index}].webhook", "message": problem})
    return problems


def definition_target_problems(settings: Settings, raw: Any) -> list[dict[str, str]]:
    """The address-policy problems of a pipeline definition's `notify` targets, as {path, message}.

    Only targets that are valid in shape are judged here; the model reports the others, with
    their paths, when the definition is parsed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("notify"), list):
        return []
    problems: list[dict[str, str]] = []
    for index, item in enumerate(raw["notify"]):
        try:
            target = NotifyTarget.model_validate(item)
        except ValidationError:
            continue
        problems += [{**p, "path": f"notify[{index}].webhook"} for p in target_problems(settings, [target], "notify")]
    return problems


def check_definition_targets(settings: Settings, raw: Any) -> None:
    """Refuse (422) a pipeline definition whose `notify` targets this deployment may not reach."""
    problems = definition_target_problems(settings, raw)
    if problems:
        raise InvalidInput(
            "the pipeline definition is invalid: " + "; ".join(f"{p['path']}: {p['message']}" for p in problems),
            details=problems,
        )


# --- workspace settings -----------------------------------------------------------------------


def get_defaults(db: Database, workspace_id: str) -> dict[str, Any]:
    with db.connection() as conn:
        row = store.get_settings(conn, workspace_id)
    return {"notify": row["targets"] if row else None, "updated_at": row["updated_at"] if row else None}


def set_defaults(db: Database, settings: Settings, workspace_id: str, raw: Any) -> dict[str, Any]:
    """Replace the workspace default targets (`{"notify": [...]}`; `{"notify": null}` clears them)."""
    try:
        parsed = NotifyDefaults.model_validate(raw)
    except ValidationError as exc:
        details = [{"path": format_path(_error_loc(e)), "message": str(e["msg"]).removeprefix("Value error, ")}
                   for e in exc.errors()]
        raise InvalidInput(
            "the notification defaults are invalid: " + "; ".join(f"{d['path']}: {d['message']}" for d in details),
            details=details,
        ) from None
    targets = parsed.notify
    if targets is not None:
        problems = target_problems(settings, targets, "notify")
        if problems:
            raise InvalidInput(
                "the notification defaults are invalid: " + "; ".join(f"{p['path']}: {p['message']}" for p in problems),
                details=problems,
            )
    dumped = None if targets is None else [t.model_dump(mode="json") for t in targets]
    with db.transaction() as conn:
        row = store.set_default_targets(conn, workspace_id, dumped)
    return {"notify": row["targets"], "updated_at": row["updated_at"]}


def _error_loc(error: Any) -> tuple[int | str, ...]:
    loc = tuple(error.get("loc", ()))
    # An error raised by NotifyTarget's model validator names its field in the context.
    field = (error.get("ctx") or {}).get("field")
    return (*loc, field) if field else loc


def new_secret() -> str:
    return "tws_" + secrets.token_urlsafe(32)


def read_secret(db: Database, workspace_id: str) -> dict[str, Any]:
    """The workspace's signing secret, made on first use."""
    with db.transaction() as conn:
        secret = store.ensure_secret(conn, workspace_id, new_secret())
        row = store.get_settings(conn, workspace_id)
    assert row is not None
    return {"secret": secret, "rotated_at": row["secret_rotated_at"],
            "previous_secret_expires_at": row["previous_secret_expires_at"]}


def rotate_secret(db: Database, settings: Settings, workspace_id: str) -> dict[str, Any]:
    """A new signing secret; the previous one keeps signing alongside it for the grace period."""
    with db.transaction() as conn:
        row = store.rotate_secret(conn, workspace_id, new_secret(), settings.notify_secret_grace_s)
    return {"secret": row["signing_secret"], "rotated_at": row["secret_rotated_at"],
            "previous_secret_expires_at": row["previous_secret_expires_at"]}


# --- reading deliveries -----------------------------------------------------------------------


def shown_target(kind: str, target: str) -> str:
    """A target as delivery lists show it: a webhook's scheme and host only (its path or query
    may carry a secret, as Slack's do); an SNS topic ARN whole."""
    if kind != "webhook":
        return target
    parts = urlsplit(target)
    rest = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{parts.netloc}{rest}"


def delivery_view(row: Row) -> dict[str, Any]:
    view = {
        "id": row["id"], "event_id": row["event_id"], "event_type": row["event_type"],
        "pipeline_id": row["pipeline_id"], "run_id": row["run_id"], "task_id": row["task_id"],
        "target_kind": row["target_kind"], "target": shown_target(row["target_kind"], row["target"]),
        "status": row["status"], "attempts": row["attempts"], "next_attempt_at": row["next_attempt_at"],
        "http_status": row["http_status"], "last_error": row["last_error"], "created_at": row["created_at"],
        "updated_at": row["updated_at"], "delivered_at": row["delivered_at"],
    }
    if "history" in row:
        view["history"] = row["history"]
        view["event"] = {"created_at": row["event_created_at"], "data": row["event_data"]}
    return view


def list_deliveries(
    db: Database, workspace_id: str, *, status: str | None, limit: int, before: tuple[datetime, uuid.UUID] | None,
) -> list[dict[str, Any]]:
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(f"unknown status {status!r}: use one of {', '.join(DELIVERY_STATUSES)}",
                           details=[{"path": "status", "message": f"use one of {', '.join(DELIVERY_STATUSES)}"}])
    with db.connection() as conn:
        rows = store.list_deliveries(conn, workspace_id, status=status, limit=limit, before=before)
    return [delivery_view(r) for r in rows]


def get_delivery(db: Database, workspace_id: str, delivery_id: uuid.UUID) -> dict[str, Any]:
    with db.connection() as conn:
        row = store.get_delivery(conn, workspace_id, delivery_id)
    if row is None:
        raise NotFound(f"notification delivery '{delivery_id}' not found")
    return delivery_view(row)


def retry_delivery(db: Database, workspace_id: str, delivery_id: uuid.UUID) -> dict[str, Any]:
    """A failed delivery due again now, for one more attempt (the next tick sends it)."""
    with db.transaction() as conn:
        row = store.retry_delivery(conn, workspace_id, delivery_id)
        if row is None:
            status = store.delivery_status(conn, workspace_id, delivery_id)
            if status is None:
                raise NotFound(f"notification delivery '{delivery_id}' not found")
            raise Conflict(f"notification delivery '{delivery_id}' is {status}; only a failed one can be retried",
                           details={"status": status})
    return dict(row)


# --- the message --------------------------------------------------------------------------------


def _subject(row: Row) -> str:
    data: dict[str, Any] = row["data"]
    pipeline = data.get("pipeline_name") or row["pipeline_id"]
    run = str(row["run_id"])[:8]
    where = f"{data.get('node_id')} ({data.get('version')})"
    match row["event_type"]:
        case "run.failed":
            error = f": {data['error']}" if data.get("error") else ""
            return f"Run {run} of {pipeline} failed{error}"
        case "run.succeeded_with_failures":
            count = data.get("failed_tasks") or 0
            return f"Run {run} of {pipeline} succeeded with {count} failed task{'s' if count != 1 else ''}"
        case "approval.waiting":
            return f"Approval {where} in run {run} of {pipeline} is waiting for a decision"
        case "approval.escalated":
            return f"Approval {where} in run {run} of {pipeline} timed out and was escalated; it still waits"
        case "task.dead_lettered":
            error = (data.get("error") or {}).get("message") or ""
            first = error.strip().splitlines()[0] if error.strip() else ""
            return f"Task {where} in run {run} of {pipeline} failed and was dead-lettered" + (f": {first}" if first else "")
    return f"{row['event_type']} in run {run} of {pipeline}"


def event_message(settings: Settings, row: Row) -> dict[str, Any]:
    """The JSON every target receives (webhook body, SNS message). `id` is the event's: the same
    for every target and every attempt, for receivers to drop duplicates."""
    links = {"dashboard": f"{settings.public_url}/#/runs/{row['run_id']}",
             "run": f"{settings.public_url}/api/runs/{row['run_id']}"}
    if row["task_id"] is not None:
        links["task"] = f"{settings.public_url}/api/tasks/{row['task_id']}"
    return {
        "id": str(row["event_id"]), "type": row["event_type"], "created_at": row["event_created_at"].isoformat(),
        "workspace": row["workspace_id"], "summary": _subject(row)[:1000], "data": row["data"], "links": links,
    }


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """hex HMAC-SHA256 of `<timestamp>.<body>` with the secret's UTF-8 bytes as the key."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secrets_: Sequence[str], timestamp: str, body: bytes) -> str:
    """`sha256=<hex>`, one per secret (two during a rotation's grace period), comma-separated."""
    return ",".join(f"sha256={sign(s, timestamp, body)}" for s in secrets_)


def verify_signature(secret: str, timestamp: str, body: bytes, header: str, *, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """What a receiver does: one of the header's signatures matches, and the timestamp is recent."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    expected = sign(secret, timestamp, body)
    return age <= tolerance_s and any(
        hmac.compare_digest(part.strip().removeprefix("sha256="), expected) for part in header.split(",")
    )


# --- sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retryable: bool = True
    http_status: int | None = None
    error: str | None = None
    duration_ms: float = 0.0


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def send_webhook(
    client: httpx.Client, settings: Settings, url: str, body: bytes, headers: dict[str, str], secrets_: Sequence[str],
) -> Outcome:
    problem = webhook_address_problem(settings, url) or endpoint_problem(
        url, allow_private=settings.allow_private_worker_endpoints
    )
    if problem is not None:
        # A name that does not resolve may resolve later; an address refused by policy will not change.
        return Outcome(ok=False, retryable="does not resolve" in problem, error=_cut(f"refused: {problem}"))
    import httpx  # not at module level: the app imports this module, and a cold start pays ~50 ms for httpx

    timestamp = str(int(time.time()))
    headers = {**headers, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature_header(secrets_, timestamp, body)}
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return Outcome(ok=False, error=f"no answer within {settings.notify_timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Outcome(ok=False, error=_cut(f"{type(exc).__name__}: {exc}"))
    if 200 <= response.status_code < 300:
        return Outcome(ok=True, http_status=response.status_code)
    # Redirects are not followed (the address was checked, the redirect's target was not).
    return Outcome(ok=False, http_status=response.status_code, error=f"the endpoint answered {response.status_code}")


@functools.lru_cache(maxsize=16)
def _sns_client(region: str, endpoint_url: str | None) -> Any:
    return aws_client("sns", region, endpoint_url=endpoint_url)


def publish_sns(settings: Settings, arn: str, message: dict[str, Any], body: bytes, delivery_id: uuid.UUID) -> Outcome:
    from botocore.exceptions import BotoCoreError, ClientError

    subject = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(message["summary"]))[:100]
    request: dict[str, Any] = {
        "TopicArn": arn, "Message": body.decode(), "Subject": subject,
        "MessageAttributes": {
            "event_type": {"DataType": "String", "StringValue": message["type"]},
            "event_id": {"DataType": "String", "StringValue": message["id"]},
        },
    }
    if arn.endswith(".fifo"):
        # One group per run keeps a run's events in order; the delivery id makes a resend within
        # SNS's deduplication window a no-op.
        request["MessageGroupId"] = str(message["data"].get("run_id") or message["workspace"])
        request["MessageDeduplicationId"] = str(delivery_id)
    try:
        _sns_client(sns_region(arn), settings.s3_endpoint_url).publish(**request)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        return Outcome(ok=False, error=_cut(f"SNS {code}: {exc}"))
    except BotoCoreError as exc:
        return Outcome(ok=False, error=_cut(f"{type(exc).__name__}: {exc}"))
    return Outcome(ok=True)


def _send_one(client: httpx.Client, settings: Settings, row: Row, secrets_: Sequence[str]) -> Outcome:
    started = time.perf_counter()
    message = event_message(settings, row)
    body = json.dumps(message, separators=(",", ":"), default=str).encode()
    try:
        if row["target_kind"] == "webhook":
            headers = {
                "Content-Type": "application/json", "User-Agent": USER_AGENT,
                "X-Tickweave-Event": row["event_type"], "X-Tickweave-Event-Id": str(row["event_id"]),
                "X-Tickweave-Delivery": str(row["id"]), "X-Tickweave-Attempt": str(row["attempts"]),
            }
            outcome = send_webhook(client, settings, row["target"], body, headers, secrets_)
        else:
            outcome = publish_sns(settings, row["target"], message, body, row["id"])
    except Exception as exc:  # a bug or an unexpected library error must not lose the claim's record
        log.exception("notification delivery %s raised", row["id"])
        outcome = Outcome(ok=False, error=_cut(f"{type(exc).__name__}: {exc}"))
    return Outcome(outcome.ok, outcome.retryable, outcome.http_status, outcome.error,
                   (time.perf_counter() - started) * 1000)


# --- the tick's step ------------------------------------------------------------------------------


@dataclass
class DeliverySummary:
    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    purged: int = 0


def lease_s(settings: Settings) -> float:
    """How long a claim is held: one round of sends (connect, write and read timeouts, all at
    once in threads), its records, and a margin."""
    return 3 * settings.notify_timeout_s + 30


def _timeout(settings: Settings) -> httpx.Timeout:
    import httpx

    return httpx.Timeout(settings.notify_timeout_s, connect=min(3.0, settings.notify_timeout_s))


def deliver_round(db: Database, settings: Settings, summary: DeliverySummary) -> int:
    """Claim one batch of due deliveries, send them at once (no transaction open), record each
    attempt. Returns how many were claimed."""
    batch = max(settings.notify_batch_size, 1)
    claimed = db.run_in_transaction(lambda conn: store.claim_due(conn, batch, lease_s(settings)))
    if not claimed:
        return 0
    summary.claimed += len(claimed)
    webhook_workspaces = sorted({str(r["workspace_id"]) for r in claimed if r["target_kind"] == "webhook"})

    def load_secrets(conn: Connection) -> dict[str, list[str]]:
        found = store.signing_secrets(conn, webhook_workspaces)
        for workspace_id in webhook_workspaces:
            if workspace_id not in found:  # its first webhook: the secret is made now
                found[workspace_id] = [store.ensure_secret(conn, workspace_id, new_secret())]
        return found

    keys = db.run_in_transaction(load_secrets) if webhook_workspaces else {}
    import httpx  # the first delivery pays for it, not the cold start

    with httpx.Client(timeout=_timeout(settings), follow_redirects=False) as client, \
            ThreadPoolExecutor(max_workers=len(claimed), thread_name_prefix="notify") as pool:
        outcomes = list(pool.map(
            lambda row: _send_one(client, settings, row, keys.get(str(row["workspace_id"]), [])), claimed
        ))
    # Recorded in id order: two ticks recording at once lock their rows in one order.
    sent = sorted(zip(claimed, outcomes, strict=True), key=lambda pair: pair[0]["id"])

    def record(conn: Connection) -> list[Row | None]:
        return [
            store.record_attempt(
                conn, row["id"], row["claim_token"], ok=o.ok, retryable=o.retryable, http_status=o.http_status,
                error=o.error, duration_ms=o.duration_ms, base_delay_s=settings.notify_retry_base_s,
                max_delay_s=settings.notify_retry_max_s, max_attempts=settings.notify_max_attempts,
                give_up_after_s=settings.notify_give_up_after_s,
            )
            for row, o in sent
        ]

    for result, (row, outcome) in zip(db.run_in_transaction(record), sent, strict=True):
        if result is None:
            continue  # the lease lapsed and another tick holds it now: its record, not ours
        if result["status"] == "delivered":
            summary.delivered += 1
        elif result["status"] == "failed":
            summary.failed += 1
        else:
            summary.retrying += 1
        level = logging.INFO if outcome.ok else logging.WARNING
        log_event(log, "notification.attempt", level=level, delivery_id=row["id"], event_type=row["event_type"],
                  workspace_id=row["workspace_id"], target_kind=row["target_kind"], attempt=row["attempts"],
                  status=result["status"], http_status=outcome.http_status, error=outcome.error)
    return len(claimed)


def deliver_due(
    db: Database, settings: Settings, *, remaining_s: Callable[[], float] | None = None, max_rounds: int = 10,
    deliveries: bool = True, old_events: bool = True,
) -> DeliverySummary:
    """The tick's delivery step: rounds of claimed deliveries while a round comes back full and
    the tick has time for another (a round takes at most the send timeout), then old events out.
    `deliveries` / `old_events` False: the tick found none due (store.tick_work), so none is looked for."""
    summary = DeliverySummary()
    for _ in range(max_rounds if deliveries else 0):
        if remaining_s is not None and remaining_s() < settings.notify_timeout_s + 5:
            break
        if deliver_round(db, settings, summary) < max(settings.notify_batch_size, 1):
            break
    if old_events and settings.notify_retention_days > 0:
        summary.purged = db.run_in_transaction(lambda conn: store.purge_old_events(
            conn, settings.notify_retention_days * 86_400, 500))
    return summary
