"""What a tick has to do, asked in one statement before it does anything.

An idle tick (once a minute, forever) used to send each step's own locking query in its own
transaction: 11 statements and 20 round trips to learn that nothing was due. This statement
asks every step's question at once, each an EXISTS on the partial or ordered index its step
claims from, so an idle tick is one round trip; a step runs when its answer is true.

Each condition is the step's own claim condition or wider (never narrower): a step answered
true may find nothing (its row was taken by another tick, or the condition here is wider), but
a step with work is never answered false. Work that appears after the question is the next
tick's, as work that appears after a step ran always was.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.db.connection import Connection


@dataclass(frozen=True)
class DueWork:
    schedules: bool  # store.schedules.claim_due
    expired_leases: bool  # store.tasks.lock_expired_leases
    expired_waits: bool  # store.tasks.lock_expired_waits
    stranded_maps: bool  # store.maps.lock_stranded_map_nodes
    queued_runs: bool  # store.runs.pipelines_with_queued_runs
    pipeline_triggers: bool  # store.orchestrations.take_pipeline_trigger
    expired_dead_letters: bool  # store.dead_letters.purge_expired
    ready_tasks: bool  # tw_claim_ready_tasks (store.tasks.claim_ready_tasks)
    due_deliveries: bool  # store.notifications.claim_due
    old_events: bool  # store.notifications.purge_old_events

    @property
    def idle(self) -> bool:
        return not any(vars(self).values())


def find_due_work(conn: Connection, *, dlq_retention_days: int, event_retention_s: float) -> DueWork:
    """Which of the tick's steps have something due now (`tw_now()`, the steps' clock).
    A retention of 0 keeps everything: its step is answered false without a look."""
    row = conn.execute(
        """SELECT EXISTS (SELECT 1 FROM schedules WHERE state = 'active' AND next_fire_at <= c.now) AS schedules,
             EXISTS (SELECT 1 FROM tasks WHERE status IN ('dispatched', 'running')
                                           AND lease_expires_at < c.now) AS expired_leases,
             EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting' AND wait_expires_at < c.now) AS expired_waits,
             EXISTS (SELECT 1 FROM tasks WHERE kind = 'map' AND status = 'ready') AS stranded_maps,
             EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND blocked_upstreams = 0) AS queued_runs,
             EXISTS (SELECT 1 FROM pipeline_triggers) AS pipeline_triggers,
             %(dlq_days)s > 0 AND EXISTS (
                 SELECT 1 FROM dead_letters
                 WHERE created_at < c.now - make_interval(days => %(dlq_days)s)) AS expired_dead_letters,
             EXISTS (SELECT 1 FROM tasks WHERE status = 'ready' AND available_at <= c.now) AS ready_tasks,
             EXISTS (SELECT 1 FROM notification_deliveries WHERE status IN ('pending', 'sending')
                                                             AND next_attempt_at <= c.now) AS due_deliveries,
             %(event_age)s > 0 AND EXISTS (
                 SELECT 1 FROM notification_events
                 WHERE created_at < c.now - make_interval(secs => %(event_age)s)) AS old_events
           FROM (SELECT tw_now() AS now) c""",
        {"dlq_days": dlq_retention_days, "event_age": event_retention_s},
    ).fetchone()
    assert row is not None
    return DueWork(**{name: bool(row[name]) for name in DueWork.__dataclass_fields__})
