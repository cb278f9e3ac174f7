"""What operators do to runs and tasks: cancel, redrive, decide human steps, work the
dead-letter queue. Each is one transaction whose guards make racing requests safe: of two
decisions on one gate, or a cancel racing a callback, exactly one lands."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.completion import AttemptResult, propagate, resolve_ready_maps, settle_terminal
from orchestrator.engine.errors import Conflict, InvalidInput, NotFound
from orchestrator.engine.orchestrations import on_run_finished
from orchestrator.logs import log_event
from orchestrator.store import dead_letters as dlq_store
from orchestrator.store import runs as run_store
from orchestrator.store import tasks as task_store

log = logging.getLogger(__name__)


def cancel_run(db: Database, workspace_id: str, run_id: uuid.UUID, *, actor: str) -> Row:
    def work(conn: Connection) -> Row:
        run = run_store.run_state(conn, workspace_id, run_id)
        if run is None:
            raise NotFound(f"run '{run_id}' not found")
        if run["status"] not in ("pending", "running"):
            raise Conflict(f"run '{run_id}' is {run['status']}; only pending or running runs can be cancelled")
        if not cancel_run_in(conn, run_id, f"cancelled by {actor}", workspace_id=workspace_id,
                             pipeline_id=str(run["pipeline_id"])):
            raise Conflict(f"run '{run_id}' finished while it was being cancelled")
        return run

    return db.run_in_transaction(work)


def cancel_run_in(
    conn: Connection, run_id: uuid.UUID, reason: str, *, workspace_id: str, pipeline_id: str
) -> bool:
    """The one cancel path (the API, `overlap: cancel_other`, a cancelled backfill): every
    unfinished task of the run and the run itself are cancelled (tasks first, in id order, then
    the run), and what follows a run's end runs in this transaction: runs of its orchestration
    waiting for it are cancelled too. False when the run had already ended."""
    if not run_store.cancel_run(conn, run_id, reason):
        return False
    on_run_finished(conn, run_id)
    log_event(log, "run.finished", workspace_id=workspace_id, pipeline_id=pipeline_id, run_id=run_id,
              status="cancelled", reason=reason)
    return True


def redrive_run(db: Database, workspace_id: str, run_id: uuid.UUID) -> int:
    """Re-run a failed run's failed, skipped and cancelled tasks; succeeded outputs stay."""

    def work(conn: Connection) -> int:
        if run_store.run_state(conn, workspace_id, run_id) is None:
            raise NotFound(f"run '{run_id}' not found")
        task_store.lock_tasks_of_run(conn, run_id)
        run = run_store.lock_run(conn, workspace_id, run_id)
        assert run is not None  # runs are never deleted
        if run["status"] != "failed":
            raise Conflict(f"run '{run_id}' is {run['status']}; only a failed run can be retried")
        reset = _redrive_locked(conn, run_id, ("failed",))
        log_event(log, "run.redriven", workspace_id=workspace_id, pipeline_id=run["pipeline_id"], run_id=run_id,
                  tasks_reset=len(reset))
        return len(reset)

    return db.run_in_transaction(work)


def _redrive_locked(conn: Connection, run_id: uuid.UUID, from_statuses: tuple[str, ...]) -> list[uuid.UUID]:
    """Reset the run's unsuccessful tasks and resume the run (its tasks and row already locked).

    In a run still settling a stopping failure, a failure handler may already be ready, waiting
    or out with a worker on the failures being reset: one not started goes back to pending with
    them; one out with a worker refuses the repair until it finishes."""
    stuck = task_store.map_nodes_expanded_on_resets(conn, run_id)
    if stuck:
        first = stuck[0]
        raise Conflict(
            f"map node '{first['node_id']}' ({first['version']}) ran its items on the outcome of "
            f"'{first['upstream']}', which the retry would run again; its items cannot wait for a new outcome: "
            "trigger a new run instead",
            details=[{"task_id": str(r["id"]), "node": r["node_id"], "upstream": r["upstream"]} for r in stuck],
        )
    reset = task_store.reset_unsuccessful_tasks(conn, run_id)
    _refuse_if_started(task_store.started_downstream(conn, reset))
    task_store.reopen_downstream(conn, reset)
    dlq_store.close_for_tasks(conn, reset)
    _resume(conn, run_id, from_statuses)
    return reset


def _refuse_if_started(started: list[Row]) -> None:
    if started:
        names = ", ".join(f"'{r['node_id']}' ({r['version']})" for r in started[:5])
        raise Conflict(
            f"downstream tasks {names} already started on the failure being retried; retry after they finish",
            details=[{"task_id": str(r["id"]), "node": r["node_id"], "status": r["status"]} for r in started],
        )


def _resume(conn: Connection, run_id: uuid.UUID, from_statuses: tuple[str, ...]) -> None:
    """After tasks of a run went back to pending or ready: every pending task's dependency
    counters recounted from its upstreams (so no upstream is counted twice, and failures that
    were retried no longer count), those with nothing left to wait for decided by their trigger
    rule, skips propagated, and the run reopened with its counters recounted. A run left with
    nothing to do ends here."""
    task_store.recount_pending_tasks(conn, run_id)
    decided = task_store.decide_pending_tasks(conn, run_id)
    propagate(conn, [r["id"] for r in decided if r["status"] == "skipped"], "skipped")
    reopened = run_store.reopen_run(conn, run_id, from_statuses)
    maps = [r["id"] for r in decided if r["status"] == "ready" and r["kind"] == "map"]
    if reopened is not None and maps:
        # Map nodes with nothing left to wait for expand (or settle) against the reopened run's
        # counters, which the expansion and the settle count on.
        resolve_ready_maps(conn, maps)
        reopened = run_store.run_counters(conn, run_id)
    if reopened is not None and reopened["unfinished_tasks"] == 0:
        ended = run_store.finish_tasks_of_run(conn, run_id, finished=[], failed=0, error=None)
        if ended is not None and ended["status"] in ("succeeded", "failed"):
            on_run_finished(conn, run_id)


def decide(
    db: Database, workspace_id: str, task_id: uuid.UUID, *, kind: str, succeeded: bool, actor: str,
    comment: str | None,
) -> AttemptResult:
    """Approve/reject an approval gate, or complete a manual step; only the first decision lands."""
    decision = {"decision": ("approve" if succeeded else "reject") if kind == "approval" else
                ("success" if succeeded else "failure"), "by": actor, "comment": comment}

    def work(conn: Connection) -> AttemptResult:
        row = task_store.decide_waiting(
            conn, workspace_id, task_id, kind, succeeded=succeeded, output=decision,
            error=None if succeeded else {"code": "rejected" if kind == "approval" else "manual_failure",
                                          "message": comment or "", "by": actor},
        )
        if row is None:
            task = task_store.get_task(conn, workspace_id, task_id)
            if task is None:
                raise NotFound(f"task '{task_id}' not found")
            if task["kind"] != kind:
                raise Conflict(f"task '{task_id}' is a {task['kind']} node, not a {kind} step")
            raise Conflict(f"task '{task_id}' is {task['status']}, not waiting for a decision")
        log_event(log, "task.decided", workspace_id=workspace_id, pipeline_id=row["pipeline_id"],
                  run_id=row["run_id"], task_id=task_id, kind=kind, decision=decision["decision"],
                  status=row["status"], actor=actor)
        return settle_terminal(conn, row)

    return db.run_in_transaction(work)


def expire_waits(db: Database, limit: int) -> int:
    """Human steps past their timeout: rejected (`on_timeout: reject`), or escalated and kept waiting."""

    def work(conn: Connection) -> int:
        rows = task_store.lock_expired_waits(conn, limit)
        for row in rows:
            if row["on_timeout"] == "escalate":
                task_store.escalate_wait(conn, row["id"])
                log_event(log, "task.wait_escalated", level=logging.WARNING, workspace_id=row["workspace_id"],
                          task_id=row["id"], kind=row["kind"], timeout_s=row["timeout_s"])
                continue
            decided = task_store.decide_waiting(
                conn, row["workspace_id"], row["id"], row["kind"], succeeded=False, output=None,
                error={"code": "timeout", "message": f"no decision within timeout_s={row['timeout_s']}"},
            )
            if decided is not None:
                log_event(log, "task.wait_timed_out", level=logging.WARNING, workspace_id=row["workspace_id"],
                          pipeline_id=decided["pipeline_id"], run_id=decided["run_id"], task_id=row["id"],
                          kind=row["kind"], status=decided["status"], timeout_s=row["timeout_s"])
                settle_terminal(conn, decided)
        return len(rows)

    return db.run_in_transaction(work)


def list_dead_letters(
    db: Database, workspace_id: str, *, pipeline_id: str | None, include_retried: bool, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    with db.connection() as conn:
        return dlq_store.list_dead_letters(
            conn, workspace_id, pipeline_id=pipeline_id, include_retried=include_retried, limit=limit, before=before
        )


def retry_dead_letter(db: Database, workspace_id: str, entry_id: uuid.UUID) -> Row:
    """A new attempt for a dead-lettered task (failed, with this entry open); its run resumes.

    In a run that failed, or is failing (a stopping failure stands), this is a redrive of the
    run's unsuccessful tasks. Otherwise (the task's failure was tolerated by `on_failure:
    continue`) only the task is revived, and its downstream tasks that were decided on its
    failure or not started yet go back to pending: every counter is recounted, so the retried
    task is never counted twice. Refused while a downstream task that consumed the failure is
    out with a worker.
    """

    def work(conn: Connection) -> Row:
        entry = dlq_store.mark_retried(conn, workspace_id, entry_id)
        if entry is None:
            if dlq_store.get_entry(conn, workspace_id, entry_id) is None:
                raise NotFound(f"dead letter '{entry_id}' not found")
            raise Conflict(f"dead letter '{entry_id}' was already retried")
        run_id = entry["run_id"]
        task_store.lock_tasks_of_run(conn, run_id)
        run = run_store.lock_run(conn, workspace_id, run_id)
        assert run is not None  # runs are never deleted
        if run["status"] == "cancelled":
            raise Conflict(f"run '{run_id}' was cancelled; its tasks cannot be retried")
        if run["status"] == "pending":
            raise Conflict(f"run '{run_id}' has not started; its tasks cannot be retried")
        if run["status"] == "failed" or run["failed_tasks"] > 0:
            _redrive_locked(conn, run_id, (str(run["status"]),))
        else:
            _refuse_if_started(task_store.started_downstream(conn, [entry["task_id"]]))
            if dlq_store.revive_task(conn, entry["task_id"]) is None:
                raise Conflict(f"task '{entry['task_id']}' is no longer failed")
            task_store.reopen_downstream(conn, [entry["task_id"]])
            _resume(conn, run_id, ("running", "succeeded"))
        log_event(log, "dead_letter.retried", workspace_id=workspace_id, pipeline_id=entry["pipeline_id"],
                  run_id=run_id, task_id=entry["task_id"], dead_letter_id=entry["id"])
        return entry

    return db.run_in_transaction(work)


def purge_dead_letters(db: Database, workspace_id: str, older_than_days: Any) -> int:
    if not isinstance(older_than_days, int) or isinstance(older_than_days, bool) or older_than_days < 0:
        raise InvalidInput("older_than_days must be a whole number of days, 0 or more")
    with db.transaction() as conn:
        return dlq_store.purge_older_than(conn, workspace_id, older_than_days)


def get_dead_letter(db: Database, workspace_id: str, entry_id: uuid.UUID) -> Row:
    with db.connection() as conn:
        entry = dlq_store.get_entry(conn, workspace_id, entry_id)
    if entry is None:
        raise NotFound(f"dead letter '{entry_id}' not found")
    return entry


def purge_expired_dead_letters(db: Database, retention_days: int, limit: int) -> int:
    """The tick's retention step: one bounded batch of entries past `retention_days` (0: none)."""
    if retention_days <= 0 or limit <= 0:
        return 0
    with db.transaction() as conn:
        purged = dlq_store.purge_expired(conn, retention_days, limit)
    if purged:
        log_event(log, "dead_letters.purged", count=purged, retention_days=retention_days)
    return purged
