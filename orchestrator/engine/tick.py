"""One tick: fire due schedules, expire lapsed leases, start queued runs, claim ready tasks,
dispatch them; each step its own short
transactions, bounded by a batch size and a deadline (the Lambda's remaining time).

The tick first asks in one statement which steps have anything due (store.tick_work), and runs
those: an idle tick is that one round trip. A step also runs when an earlier step of the same
tick did work, since that work may have made some of its rows due (a schedule's run has ready
tasks, a lease expiry ends a run and frees room for a queued one, writes a notification)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database
from orchestrator.engine.completion import finish_attempt, resolve_ready_maps
from orchestrator.engine.dispatcher import Dispatcher, record_not_started
from orchestrator.engine.notifications import deliver_due
from orchestrator.engine.operations import expire_waits, purge_expired_dead_letters
from orchestrator.engine.orchestrations import process_pipeline_triggers
from orchestrator.engine.scheduling import fire_due_schedules, start_queued
from orchestrator.logs import log_event
from orchestrator.store import maps as map_store
from orchestrator.store import tasks as task_store
from orchestrator.store.tick_work import DueWork, find_due_work

log = logging.getLogger(__name__)

# A tick starts no new batch with less than this left of its deadline: one batch (100 repairs,
# or one claim and its dispatch) takes well under it, and the answer still has time to leave.
DEADLINE_MARGIN_S = 2.0


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
    # The time the tick had (seconds left of its deadline when it began; None: no deadline),
    # and the steps its deadline stopped before their work was done (the next tick goes on).
    deadline_s: float | None = None
    deadline_stopped: list[str] = field(default_factory=list)
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
            "deadline_s": None if self.deadline_s is None else round(self.deadline_s, 3),
            "deadline_stopped": list(self.deadline_stopped),
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
                record_not_started(conn, settings, row)  # growing delay; fails only after the give-up time
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


def remaining_time(
    *, context: Any = None, max_s: float | None = None, clock: Callable[[], float] = time.monotonic,
) -> Callable[[], float] | None:
    """A tick's deadline, as seconds left: the Lambda's remaining time when `context` has one (the
    invocation's context, or Mangum's `aws.context` for a tick over HTTP), capped at `max_s` from
    now when given (an HTTP caller waits only so long: API Gateway answers 504 after 30 s, though
    the function may run on). None: no deadline."""
    lambda_ms = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(lambda_ms) and max_s is None:
        return None
    ends = None if max_s is None else clock() + max_s

    def remaining() -> float:
        left = float("inf") if ends is None else ends - clock()
        if callable(lambda_ms):
            left = min(left, float(lambda_ms()) / 1000.0)
        return left

    return remaining


def run_tick(
    db: Database, settings: Settings, dispatcher: Dispatcher, *, batch_size: int,
    remaining_s: Callable[[], float] | None = None,
) -> TickSummary:
    summary = TickSummary()
    started = time.perf_counter()
    if remaining_s is not None:
        summary.deadline_s = remaining_s()

    def time_left() -> bool:
        return remaining_s is None or remaining_s() > DEADLINE_MARGIN_S

    due: DueWork = db.run_statement(lambda conn: find_due_work(
        conn, dlq_retention_days=settings.dlq_retention_days if settings.dlq_purge_batch > 0 else 0,
        event_retention_s=max(settings.notify_retention_days, 0) * 86_400))

    def worked() -> bool:
        """Whether a step of this tick has done anything yet (see the module's docstring)."""
        return bool(summary.scheduled_runs or summary.slots_skipped or summary.schedules_fired or summary.expired
                    or summary.waits_expired or summary.maps_resolved or summary.queued_runs_started
                    or summary.pipeline_triggered_runs or summary.claimed)

    def drain(step: str, batch: Callable[[], int], full: int) -> int:
        """Batches of one step, each its own transactions, while a batch comes back full (there
        may be more) and the deadline allows another: a backlog of 5,000 expired leases heals in
        one tick, not fifty. Every batch moves its rows out of the step's reach (expired, decided,
        started, deleted), so the loop ends when the backlog does."""
        done = 0
        while True:
            if not time_left():
                summary.deadline_stopped.append(step)
                return done
            count = batch()
            done += count
            if count < full:
                return done

    # 1. due schedules, batch after batch while a batch comes back full
    def schedules_batch() -> int:
        fired = fire_due_schedules(db, settings, batch_size)
        summary.scheduled_runs += fired.runs
        summary.slots_skipped += fired.skipped
        return fired.schedules

    if due.schedules:
        summary.schedules_fired = drain("schedules", schedules_batch, batch_size)
    t_schedules = time.perf_counter()
    summary.durations_ms["schedules"] = (t_schedules - started) * 1000

    # 2. lapsed leases and human-step timeouts, then queued runs that now have room
    if due.expired_leases or worked():
        summary.expired = drain("expire_leases", lambda: expire_leases(db, settings, batch_size), batch_size)
    if due.expired_waits or worked():
        summary.waits_expired = drain("expire_waits", lambda: expire_waits(db, batch_size), batch_size)
    if due.stranded_maps or worked():
        summary.maps_resolved = drain("resolve_maps", lambda: resolve_stranded_maps(db, batch_size), batch_size)
    # Pipelines with queued runs, page after page in key order (a page whose pipelines are all
    # at their limit starts nothing, and the next page still gets its turn).
    queued_after: list[tuple[str, str] | None] = [None]

    def queued_batch() -> int:
        started_runs, queued_after[0] = start_queued(db, batch_size, after=queued_after[0])
        summary.queued_runs_started += len(started_runs)
        return batch_size if queued_after[0] is not None else 0

    if due.queued_runs or worked():
        drain("queued_runs", queued_batch, batch_size)
    # Later triggers decided by upstream runs that ended; normally created right after the
    # upstream's callback, this is the safety net (an engine that stopped in between). A batch
    # with a refused trigger (paused pipeline) counts as short: the rest wait for the next tick.
    if due.pipeline_triggers or worked():
        summary.pipeline_triggered_runs = drain(
            "pipeline_triggers", lambda: len(process_pipeline_triggers(db, settings, batch_size)), batch_size)
    summary.durations_ms["expire_leases"] = (time.perf_counter() - t_schedules) * 1000
    # Dead letters past their retention, batch after batch (oldest first).
    t_purge = time.perf_counter()
    if due.expired_dead_letters:
        summary.dead_letters_purged = drain(
            "dlq_retention",
            lambda: purge_expired_dead_letters(db, settings.dlq_retention_days, settings.dlq_purge_batch),
            max(settings.dlq_purge_batch, 1),
        )
    summary.durations_ms["dlq_retention"] = (time.perf_counter() - t_purge) * 1000

    claim_ms = dispatch_ms = 0.0
    # Claim in batches until nothing is ready or time runs short; a batch smaller than the
    # limit means the ready set is drained.
    while (due.ready_tasks or worked()) and time_left():
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
    notified = deliver_due(db, settings, remaining_s=remaining_s, deliveries=due.due_deliveries or worked(),
                           old_events=due.old_events)
    summary.notifications_delivered = notified.delivered
    summary.notifications_retrying = notified.retrying
    summary.notifications_failed = notified.failed
    summary.durations_ms["notifications"] = (time.perf_counter() - t_notify) * 1000
    summary.durations_ms["total"] = (time.perf_counter() - started) * 1000
    busy = summary.scheduled_runs or summary.expired or summary.waits_expired or summary.claimed \
        or summary.queued_runs_started or summary.slots_skipped or summary.pipeline_triggered_runs \
        or summary.dead_letters_purged or notified.claimed or summary.deadline_stopped
    # An idle tick (once a minute, forever) logs at DEBUG only.
    log_event(log, "tick.finished", level=logging.INFO if busy else logging.DEBUG, **summary.to_dict())
    return summary
