"""One tick: fire due schedules, expire lapsed leases, start queued runs, claim ready tasks,
dispatch them; each step its own short
transactions, bounded by a batch size and a deadline (the Lambda's remaining time)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database
from orchestrator.engine.completion import finish_attempt, resolve_ready_maps, settle_terminal
from orchestrator.engine.dispatcher import Dispatcher
from orchestrator.engine.notifications import deliver_due
from orchestrator.engine.operations import expire_waits, purge_expired_dead_letters
from orchestrator.engine.orchestrations import process_pipeline_triggers
from orchestrator.engine.scheduling import fire_due_schedules, start_queued
from orchestrator.logs import log_event
from orchestrator.store import maps as map_store
from orchestrator.store import tasks as task_store

log = logging.getLogger(__name__)


@dataclass
class TickSummary:
    schedules_fired: int = 0
    scheduled_runs: int = 0
    slots_skipped: int = 0
    queued_runs_started: int = 0
    pipeline_triggered_runs: int = 0
    expired: int = 0
    waits_expired: int = 0
    maps_resolved: int = 0
    dead_letters_purged: int = 0
    claimed: int = 0
    dispatched: int = 0
    dispatch_failed: int = 0
    batches: int = 0
    notifications_delivered: int = 0
    notifications_retrying: int = 0
    notifications_failed: int = 0
    durations_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedules_fired": self.schedules_fired, "scheduled_runs": self.scheduled_runs,
            "slots_skipped": self.slots_skipped, "queued_runs_started": self.queued_runs_started,
            "pipeline_triggered_runs": self.pipeline_triggered_runs,
            "expired": self.expired, "waits_expired": self.waits_expired, "maps_resolved": self.maps_resolved,
            "dead_letters_purged": self.dead_letters_purged,
            "claimed": self.claimed, "dispatched": self.dispatched,
            "dispatch_failed": self.dispatch_failed, "batches": self.batches,
            "notifications_delivered": self.notifications_delivered,
            "notifications_retrying": self.notifications_retrying,
            "notifications_failed": self.notifications_failed,
            "durations_ms": {k: round(v, 2) for k, v in self.durations_ms.items()},
        }


def expire_leases(db: Database, settings: Settings, limit: int) -> int:
    """Tasks whose lease lapsed. One never started by a worker (no heartbeat: the dispatch was
    lost, or the tick died between claim and dispatch) is a delivery failure and keeps its
    attempt; one that was running failed that attempt (its worker died or hung), and retries
    or is dead-lettered."""

    def work(conn: Connection) -> int:
        expired = task_store.lock_expired_leases(conn, limit)
        for row in expired:
            log_event(log, "task.lease_expired", level=logging.WARNING, task_id=row["id"], attempt=row["attempt"],
                      status=row["status"], timed_out=bool(row["timed_out"]))
            if row["status"] == "dispatched" and not row["timed_out"]:
                lost = task_store.record_dispatch_failure(
                    conn, row["id"], row["attempt"], row["claim_token"], base_delay_s=0,
                    max_failures=settings.max_dispatch_failures,
                    error={"code": "not_started", "message": "no worker started the task before its lease expired",
                           "retryable": True},
                )
                if lost is not None and lost["status"] == "failed":
                    settle_terminal(conn, lost, dead_letter=True)
                continue
            code = "timeout" if row["timed_out"] else "lease_expired"
            message = (
                f"the attempt exceeded timeout_s={row['timeout_s']}" if row["timed_out"]
                else "no heartbeat or callback before the lease expired"
            )
            finish_attempt(
                conn, row["id"], row["attempt"], row["claim_token"], succeeded=False,
                error={"code": code, "message": message, "retryable": True}, retryable=True,
                attempt_status="expired",
            )
        return len(expired)

    return db.run_in_transaction(work)


def resolve_stranded_maps(db: Database, limit: int) -> int:
    """Map nodes left ready by a path that did not resolve them (every path that makes one ready
    resolves it in its own transaction; this is the safety net, like the later triggers')."""

    def work(conn: Connection) -> int:
        ids = map_store.lock_stranded_map_nodes(conn, limit)
        resolve_ready_maps(conn, ids)
        return len(ids)

    return db.run_in_transaction(work)


def run_tick(
    db: Database, settings: Settings, dispatcher: Dispatcher, *, batch_size: int,
    remaining_s: Callable[[], float] | None = None,
) -> TickSummary:
    summary = TickSummary()
    started = time.perf_counter()

    def time_left() -> bool:
        return remaining_s is None or remaining_s() > 2.0

    # 1. due schedules, batch after batch while a batch comes back full
    while time_left():
        fired = fire_due_schedules(db, settings, batch_size)
        summary.schedules_fired += fired.schedules
        summary.scheduled_runs += fired.runs
        summary.slots_skipped += fired.skipped
        if fired.schedules < batch_size:
            break
    t_schedules = time.perf_counter()
    summary.durations_ms["schedules"] = (t_schedules - started) * 1000

    # 2. lapsed leases and human-step timeouts, then queued runs that now have room
    summary.expired = expire_leases(db, settings, batch_size)
    summary.waits_expired = expire_waits(db, batch_size)
    summary.maps_resolved = resolve_stranded_maps(db, batch_size)
    summary.queued_runs_started = len(start_queued(db, batch_size))
    # Later triggers decided by upstream runs that ended; normally created right after the
    # upstream's callback, this is the safety net (an engine that stopped in between).
    summary.pipeline_triggered_runs = len(process_pipeline_triggers(db, settings, batch_size))
    summary.durations_ms["expire_leases"] = (time.perf_counter() - t_schedules) * 1000
    # Dead letters past their retention, one bounded batch a tick (a backlog drains over ticks).
    t_purge = time.perf_counter()
    summary.dead_letters_purged = purge_expired_dead_letters(db, settings.dlq_retention_days, settings.dlq_purge_batch)
    summary.durations_ms["dlq_retention"] = (time.perf_counter() - t_purge) * 1000

    claim_ms = dispatch_ms = 0.0
    # Claim in batches until nothing is ready or time runs short; a batch smaller than the
    # limit means the ready set is drained.
    while time_left():
        t0 = time.perf_counter()
        limit = dispatcher.claim_limit(batch_size)
        if limit == 0:
            break  # every worker is busy: the rest waits for the next tick or callback
        with db.transaction() as conn:
            claimed = task_store.claim_ready_tasks(conn, limit)
        t1 = time.perf_counter()
        claim_ms += (t1 - t0) * 1000
        if not claimed:
            break
        summary.batches += 1
        summary.claimed += len(claimed)
        result = dispatcher.dispatch(claimed)
        dispatch_ms += (time.perf_counter() - t1) * 1000
        summary.dispatched += result.sent
        summary.dispatch_failed += result.failed
        if len(claimed) < limit:
            break
    summary.durations_ms["claim"] = claim_ms
    summary.durations_ms["dispatch"] = dispatch_ms
    # 5. Notifications due (outbox rows written by the transactions above and before), after the
    # dispatches: a tick short of time starts tasks first; a round of sends fits its deadline.
    t_notify = time.perf_counter()
    notified = deliver_due(db, settings, remaining_s=remaining_s)
    summary.notifications_delivered = notified.delivered
    summary.notifications_retrying = notified.retrying
    summary.notifications_failed = notified.failed
    summary.durations_ms["notifications"] = (time.perf_counter() - t_notify) * 1000
    summary.durations_ms["total"] = (time.perf_counter() - started) * 1000
    busy = summary.scheduled_runs or summary.expired or summary.waits_expired or summary.claimed \
        or summary.queued_runs_started or summary.slots_skipped or summary.pipeline_triggered_runs \
        or summary.dead_letters_purged or notified.claimed
    # An idle tick (once a minute, forever) logs at DEBUG only.
    log_event(log, "tick.finished", level=logging.INFO if busy else logging.DEBUG, **summary.to_dict())
    return summary
