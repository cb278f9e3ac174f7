"""Finishing an attempt and advancing the DAG, in the transaction that records the outcome.

Lock order (docs/reliability.md): a run's task rows before its run row; a finisher locks its own
task, then its successors in id order (wave by wave), then the run row; a statement that locks
many tasks (cancel, a stopping failure's skip, a repair's lock of the whole run) takes them in id
order. Two paths that still meet in opposite orders deadlock; Postgres then aborts one, and
`Database.run_in_transaction` replays it whole: nothing catches a deadlock halfway.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.db.connection import Connection, Row
from orchestrator.engine import mapping
from orchestrator.engine.orchestrations import on_run_finished
from orchestrator.logs import log_event
from orchestrator.store import runs as run_store
from orchestrator.store import tasks as task_store
from orchestrator.store.completions import Outcome, Recorded
from orchestrator.store.dispatch import DispatchContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptResult:
    accepted: bool
    outcome: str  # succeeded | failed | retrying | duplicate | stale_attempt | already_finished | not_active
    task_status: str | None
    run_id: uuid.UUID | None = None
    run_status: str | None = None
    newly_ready: int = 0
    workspace_id: str | None = None
    pipeline_id: str | None = None
    started_runs: list[uuid.UUID] = field(default_factory=list)  # orchestration runs it released
    # Successors claimed in the finishing transaction (one commit per callback, not two); the
    # caller dispatches them after commit.
    claimed: list[Row] = field(default_factory=list)
    # An item of a map node with max_concurrency left the workers: a place under that limit is
    # free, though nothing became newly ready (its siblings were ready all along).
    frees_map_slot: bool = False
    # The dispatch context of `claimed`, when the statement that claimed them read it too.
    context: DispatchContext | None = None
    # The failure was dead-lettered here (a worker's task out of attempts, or not retryable).
    dead_lettered: bool = False


def finish_attempt(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID, *,
    succeeded: bool, output: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
    retryable: bool = True, attempt_status: str | None = None,
    on_succeeded: Callable[[Connection, Row], None] | None = None,
) -> AttemptResult:
    """Record the outcome of the current attempt; refused (state unchanged) for any other attempt.

    `on_succeeded` runs after the guarded update accepted a success and before anything
    follows from it (output persistence); raising rolls the whole transaction back.
    """
    row = task_store.finish_attempt(
        conn, task_id, attempt, claim_token, succeeded=succeeded, output=output, error=error,
        retryable=retryable,
    )
    if row is None:
        return refusal(conn, task_id, attempt, claim_token, succeeded)
    if succeeded and on_succeeded is not None:
        on_succeeded(conn, row)

    task_store.record_attempt_end(
        conn, task_id, attempt, attempt_status or ("succeeded" if succeeded else "failed"), error
    )
    # status: succeeded | failed (attempts used up, or not retryable: dead-lettered below) | ready
    # (a retry is scheduled); the same line as log_finished's
    log_event(log, "task.finished", level=logging.INFO if succeeded else logging.WARNING,
              workspace_id=row["workspace_id"], pipeline_id=row["pipeline_id"], run_id=row["run_id"],
              task_id=task_id, attempt=attempt, status=row["status"],
              attempt_status=attempt_status or ("succeeded" if succeeded else "failed"),
              error_code=None if error is None else (error.get("code") or error.get("type")))
    frees = row.get("map_max_concurrency") is not None
    if row["status"] == "ready":  # a retry was scheduled; the run is unaffected
        return AttemptResult(True, "retrying", "ready", row["run_id"], frees_map_slot=frees)
    # A worker's attempt that failed for good is dead-lettered (a person's decision or a map
    # node's settle, the other ways to fail, are not).
    result = settle_terminal(conn, row, dead_letter=row["status"] == "failed")
    return dataclasses.replace(result, frees_map_slot=frees) if frees else result


def log_finished(recorded: Recorded, outcome: Outcome) -> None:
    """finish_attempt's log line, for an outcome recorded by tw_complete_attempts."""
    log_event(log, "task.finished", level=logging.INFO if outcome.succeeded else logging.WARNING,
              workspace_id=recorded.workspace_id, pipeline_id=recorded.pipeline_id, run_id=recorded.run_id,
              task_id=recorded.task_id, attempt=outcome.attempt, status=recorded.task_status,
              attempt_status="succeeded" if outcome.succeeded else "failed",
              error_code=None if outcome.error is None else (outcome.error.get("code") or outcome.error.get("type")))


def settle_terminal(conn: Connection, row: Row, *, dead_letter: bool = False) -> AttemptResult:
    """What follows a task reaching a terminal state (`row` is the updated task row).

    failed with `dead_letter` (the failure of a worker's attempt or delivery, which the caller
    knows; the status does not say): dead-lettered. failed under `on_failure: stop`: every task
    of the run not yet started is skipped (one statement), except the failure handlers
    (`one_failed`, `all_done`), which still run; the run fails once the attempts still out with
    workers and those handlers settle (at once when there are none). Otherwise the successors
    advance. The run's unfinished count takes every task that became terminal here, and its
    failed task count every failure.
    """
    task_id: uuid.UUID = row["id"]
    status = str(row["status"])
    run_id: uuid.UUID = row["run_id"]
    failed = status == "failed"
    dead_lettered = failed and dead_letter
    if dead_lettered:
        task_store.insert_dead_letter(conn, task_id)
        log_event(log, "task.dead_lettered", level=logging.WARNING, workspace_id=row["workspace_id"],
                  pipeline_id=row["pipeline_id"], run_id=run_id, task_id=task_id, attempt=row["attempt"])
    stop = failed and row["on_failure"] == "stop"
    advanced = propagate(conn, [task_id], "failed" if failed else "succeeded")
    finished = [task_id, *advanced.skipped]
    newly_ready, released = advanced.ready, advanced.released
    if stop:
        unstarted = task_store.skip_unstarted_tasks(conn, run_id)
        more = propagate(conn, unstarted, "skipped")
        finished += [*unstarted, *more.skipped]
        newly_ready += more.ready
        released += more.released
    run = run_store.finish_tasks_of_run(
        conn, run_id, finished=finished, released=released, failed=1 if stop else 0, failures=1 if failed else 0,
        error=f"node '{row['node_id']}' (version {row['version']}) {status}" if stop else None,
    )
    started: list[uuid.UUID] = []
    if run is not None and run["previous_status"] == "running" and run["status"] in ("succeeded", "failed"):
        # The run ended here: its orchestration's waiting runs and its later triggers follow,
        # in this transaction (see orchestrations.on_run_finished).
        log_event(log, "run.finished", level=logging.INFO if run["status"] == "succeeded" else logging.WARNING,
                  workspace_id=row["workspace_id"], pipeline_id=row["pipeline_id"], run_id=run_id,
                  status=run["status"], by_task=task_id)
        started = on_run_finished(conn, run_id)
    return AttemptResult(
        True, status, status, run_id, None if run is None else str(run["status"]), newly_ready,
        row["workspace_id"], row["pipeline_id"], started, dead_lettered=dead_lettered,
    )


@dataclass
class Propagated:
    skipped: list[uuid.UUID] = field(default_factory=list)  # tasks skipped by their rule
    ready: int = 0  # tasks made ready
    released: int = 0  # run counts carried to slots of joins no longer pending (migration 0027)


def propagate(conn: Connection, task_ids: list[uuid.UUID], outcome: str) -> Propagated:
    """Advance the successors of tasks that finished with one `outcome`; successors skipped by
    their trigger rule propagate in turn. One statement per wave, whatever its width (a stopping
    failure in a 100,000-task run skips its tasks in one statement and advances their
    successors in another). Map nodes made ready are expanded or settled here (see
    resolve_ready_maps)."""
    done = Propagated()
    frontier, result = task_ids, outcome
    while frontier:
        advanced = task_store.advance_successors(conn, frontier, result)
        frontier = [r["id"] for r in advanced.rows if r["status"] == "skipped"]
        result = "skipped"
        done.skipped += frontier
        done.released += advanced.released
        done.ready += sum(1 for r in advanced.rows if r["status"] == "ready" and r["kind"] != "map")
        done.ready += resolve_ready_maps(
            conn, [r["id"] for r in advanced.rows if r["status"] == "ready" and r["kind"] == "map"])
    return done


def resolve_ready_maps(conn: Connection, ids: list[uuid.UUID]) -> int:
    """Map nodes that became ready, resolved in the transaction that made them ready: expanded
    into their children, or, once their children are done, settled; what follows a settle (its
    successors, the run's counters, the run's end) is settle_terminal's, as for any task.
    Returns the tasks made ready (children, and successors of settled map nodes)."""
    ready = 0
    for resolution in mapping.resolve(conn, ids):
        ready += resolution.made_ready
        if resolution.settled is not None:
            ready += settle_terminal(conn, resolution.settled).newly_ready
        elif resolution.skipped is not None:
            row = resolution.skipped
            more = propagate(conn, [row["id"]], "skipped")
            ready += more.ready
            _count_finished(conn, row, [row["id"], *more.skipped], more.released)
    return ready


def _count_finished(conn: Connection, row: Row, finished: list[uuid.UUID], released: int) -> None:
    """Tasks that ended without a failure of their own (a skipped map node and what it skipped)
    counted against the run, which may end here."""
    run = run_store.finish_tasks_of_run(conn, row["run_id"], finished=finished, released=released, failed=0,
                                        error=None)
    if run is not None and run["previous_status"] == "running" and run["status"] in ("succeeded", "failed"):
        log_event(log, "run.finished", level=logging.INFO if run["status"] == "succeeded" else logging.WARNING,
                  workspace_id=row["workspace_id"], pipeline_id=row["pipeline_id"], run_id=row["run_id"],
                  status=run["status"], by_task=row["id"])
        on_run_finished(conn, row["run_id"])


def refusal(
    conn: Connection, task_id: uuid.UUID, attempt: int, claim_token: uuid.UUID, succeeded: bool
) -> AttemptResult:
    """Tell a refused caller why: a repeat of a recorded outcome, another attempt, or a finished task."""
    fence = task_store.get_fence(conn, task_id)
    if fence is None:
        return AttemptResult(False, "not_found", None)
    status = str(fence["status"])
    recorded = task_store.attempt_outcome(conn, task_id, attempt, claim_token)
    if recorded is not None and recorded["status"] in (("succeeded",) if succeeded else ("failed", "expired")):
        return AttemptResult(False, "duplicate", status)
    if int(fence["attempt"]) != attempt or (fence["claim_token"] is not None and fence["claim_token"] != claim_token):
        return AttemptResult(False, "stale_attempt", status)
    if status in task_store.TERMINAL:
        return AttemptResult(False, "already_finished", status)
    return AttemptResult(False, "not_active", status)
