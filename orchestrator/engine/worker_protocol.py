"""Callbacks and heartbeats from workers, fenced by the token of the current attempt."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine import mapping
from orchestrator.engine.completion import AttemptResult, finish_attempt, log_finished, refusal
from orchestrator.engine.errors import EngineError, InvalidInput, Unauthorized
from orchestrator.engine.kept_threads import KeptThreads
from orchestrator.engine.orchestrations import on_run_finished
from orchestrator.engine.outputs import (
    OutputRejected,
    check_node_output,
    prepare_task_outputs,
    record_task_outputs,
)
from orchestrator.logs import log_event
from orchestrator.storage.tokens import TaskClaims, TokenInvalid, TokenKeyring
from orchestrator.store import completions as completion_store
from orchestrator.store import tasks as task_store
from orchestrator.store.dispatch import DispatchContext
from orchestrator.store.outputs import NewOutput

log = logging.getLogger(__name__)


class _OutputsNotPrepared(Exception):
    """Rolls back a callback transaction that accepted a success producing pipeline outputs, or
    feeding map nodes their items, before they were prepared: their S3 I/O happens outside the
    transaction, then it runs again."""

    def __init__(self, task: Row) -> None:
        super().__init__("pipeline outputs to prepare before the transaction")
        self.task = task


def read_token(keyring: TokenKeyring, token: str, task_id: uuid.UUID | None = None) -> TaskClaims:
    try:
        claims = keyring.read(token)
    except TokenInvalid as exc:
        raise Unauthorized(f"the worker token was refused ({exc.reason})", details={"reason": exc.reason}) from exc
    if task_id is not None and claims.task_id != str(task_id):
        raise Unauthorized("the worker token belongs to another task", details={"reason": "other_task"})
    return claims


@dataclass(frozen=True)
class CallbackInput:
    """One callback of a batch, as the worker sent it."""

    task_id: uuid.UUID
    token: str
    status: str
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class BatchAnswer:
    """A batch of callbacks recorded: one answer per callback, in the order sent (an
    EngineError refused that callback alone), and what the batch's one transaction claimed."""

    answers: list[AttemptResult | EngineError]
    claimed: list[Row] = field(default_factory=list)
    context: DispatchContext | None = None
    started_runs: list[uuid.UUID] = field(default_factory=list)
    # Answers recorded by the engine's own path (each with its own claims and run ends).
    by_engine: set[int] = field(default_factory=set)


def record_callback(
    db: Database, keyring: TokenKeyring, task_id: uuid.UUID, token: str, *, status: str,
    output: dict[str, Any] | None, error: dict[str, Any] | None, settings: Settings | None = None,
    claim_limit: int = 0, heard: list[tuple[str, str]] | None = None,
) -> AttemptResult:
    """Record a worker's outcome. A success's output reference is checked against the object
    (exists, size, sha256: one HEAD) before any transaction; a success of a task that produces
    pipeline outputs is checked against their schemas and persisted before the transaction that
    records it, which then only indexes them; an output that is not there, differs from what the
    callback reports or cannot become the output turns the success into a failed attempt
    carrying the reason.

    The common path is one statement on an autocommit connection (tw_complete_attempts: one
    round trip, one commit, the successors claimed with their dispatch context); what it hands
    back is recorded by `_record_in_engine`, as before it. `heard` collects (workspace, task
    name) of the valid token: the worker was heard from (engine.workers.WorkerSightings)."""
    claims = read_token(keyring, token, task_id)
    if heard is not None:
        heard.append((claims.workspace, claims.task_name))
    checked = _checked_outcome(db, claims, task_id, status, output, error, settings)
    if isinstance(checked, AttemptResult):
        return checked
    completion = db.run_statement(
        lambda conn: completion_store.complete_attempts(conn, [checked], claim_limit=claim_limit, single=True)
    )
    recorded = completion.recorded[0]
    if recorded.engine:
        return _record_in_engine(db, claims, checked, settings=settings, claim_limit=claim_limit)
    if not recorded.accepted:
        return _refused(db, checked)
    log_finished(recorded, checked)
    return AttemptResult(
        True, str(recorded.outcome), recorded.task_status, recorded.run_id, recorded.run_status,
        recorded.newly_ready, recorded.workspace_id, recorded.pipeline_id,
        claimed=completion.claimed, context=completion.context,
    )


def record_callbacks(
    db: Database, keyring: TokenKeyring, callbacks: Sequence[CallbackInput], *, settings: Settings | None = None,
    claim_limit: int = 0, heard: list[tuple[str, str]] | None = None, output_checks: OutputChecks | None = None,
) -> BatchAnswer:
    """Record a batch of callbacks: each is checked and fenced on its own (a forged token, an
    invalid body or a stale attempt refuses that callback alone); the accepted ones are recorded
    by one statement in one transaction, which also follows the runs they ended; those the
    statement hands back are then recorded one by one by the engine's path. The objects the
    successes name are checked before it, several at a time with `output_checks` (one after the
    other without)."""
    answers: list[AttemptResult | EngineError | None] = [None] * len(callbacks)
    reported: list[tuple[int, TaskClaims, completion_store.Outcome]] = []
    for index, callback in enumerate(callbacks):
        try:
            claims = read_token(keyring, callback.token, callback.task_id)
            if heard is not None:
                heard.append((claims.workspace, claims.task_name))
            reported.append((index, claims, _reported_outcome(claims, callback.task_id, callback.status,
                                                              callback.output, callback.error)))
        except EngineError as exc:
            answers[index] = exc
    # The objects the successes name, checked before any transaction (as a single callback's);
    # a success whose object is not what it says is recorded as a failed attempt, in the order sent.
    found: list[Exception | None] = [None] * len(reported)
    if settings is not None:
        checks = [_object_to_check(claims, outcome, settings) for _, claims, outcome in reported]
        found = (output_checks or _ONE_AT_A_TIME).run(settings, checks)
    pending: list[tuple[int, TaskClaims, completion_store.Outcome]] = []
    for (index, claims, outcome), failure in zip(reported, found, strict=True):
        if isinstance(failure, OutputRejected):
            answers[index] = _reject(db, outcome.task_id, claims, failure)
        elif isinstance(failure, EngineError):
            answers[index] = failure
        else:
            pending.append((index, claims, outcome))
    batch = BatchAnswer(answers=[])
    if pending:

        def work(conn: Connection, *, catch: bool) -> tuple[completion_store.Completion, list[uuid.UUID]]:
            completion = completion_store.complete_attempts(
                conn, [outcome for _, _, outcome in pending], claim_limit=claim_limit, single=False, catch=catch
            )
            started: list[uuid.UUID] = []
            for run_id, run_status in completion.ended_runs:
                log_event(log, "run.finished", level=logging.INFO if run_status == "succeeded" else logging.WARNING,
                          run_id=run_id, status=run_status)
                started.extend(on_run_finished(conn, run_id))
            return completion, started

        # A batch of successes is recorded without a subtransaction per outcome (migration 0028);
        # if one of them is the engine's after all (a map node made ready, an output), the batch
        # is recorded again with one per outcome. A failure may be final (the engine's): such a
        # batch takes the blocks at once.
        try:
            completion, batch.started_runs = db.run_in_transaction(
                partial(work, catch=not all(outcome.succeeded for _, _, outcome in pending)))
        except completion_store.BatchForTheEngine:
            completion, batch.started_runs = db.run_in_transaction(partial(work, catch=True))
        batch.claimed, batch.context = completion.claimed, completion.context
        ended = dict(completion.ended_runs)
        for (index, claims, outcome), recorded in zip(pending, completion.recorded, strict=True):
            if recorded.engine:
                answers[index] = _record_in_engine(db, claims, outcome, settings=settings, claim_limit=claim_limit)
                batch.by_engine.add(index)
            elif not recorded.accepted:
                answers[index] = _refused(db, outcome)
            else:
                log_finished(recorded, outcome)
                answers[index] = AttemptResult(
                    True, str(recorded.outcome), recorded.task_status, recorded.run_id,
                    ended.get(recorded.run_id) if recorded.run_id is not None else None, recorded.newly_ready,
                    recorded.workspace_id, recorded.pipeline_id,
                )
    batch.answers = [a for a in answers if a is not None]
    assert len(batch.answers) == len(callbacks)
    return batch


def _checked_outcome(
    db: Database, claims: TaskClaims, task_id: uuid.UUID, status: str, output: dict[str, Any] | None,
    error: dict[str, Any] | None, settings: Settings | None,
) -> completion_store.Outcome | AttemptResult:
    """The outcome a callback reports, checked (InvalidInput for a malformed one); a success
    whose object is not what it says is recorded as a failed attempt here (the AttemptResult)."""
    outcome = _reported_outcome(claims, task_id, status, output, error)
    check = _object_to_check(claims, outcome, settings)
    if check is not None and settings is not None:
        # No transaction is open yet: a success is only recorded for an object that is there
        # and is what the callback says (downstream would otherwise die on its NoSuchKey).
        try:
            check_node_output(settings, *check)
        except OutputRejected as exc:
            return _reject(db, task_id, claims, exc)
    return outcome


def _reported_outcome(
    claims: TaskClaims, task_id: uuid.UUID, status: str, output: dict[str, Any] | None, error: dict[str, Any] | None,
) -> completion_store.Outcome:
    """The outcome as reported, its shape checked against the token (InvalidInput); the object
    it names is not looked at here."""
    if status not in ("succeeded", "failed"):
        raise InvalidInput("status must be 'succeeded' or 'failed'")
    succeeded = status == "succeeded"
    retryable = True
    if not succeeded:
        retryable = bool((error or {}).get("retryable", True))
    if succeeded and (not output or not isinstance(output.get("key"), str)):
        raise InvalidInput("a succeeded callback needs output.key (the object the worker wrote)")
    if succeeded and output is not None and claims.storage is not None and output["key"] != claims.storage.output_key:
        raise InvalidInput("output.key must be the key the token grants", details={"expected": claims.storage.output_key})
    return completion_store.Outcome(
        task_id, claims.attempt, uuid.UUID(claims.claim_token), succeeded, retryable,
        output if succeeded else None, None if succeeded else error,
    )


def _object_to_check(
    claims: TaskClaims, outcome: completion_store.Outcome, settings: Settings | None,
) -> tuple[str, dict[str, Any]] | None:
    """(bucket, output) of the object a success names, when it is to be checked (a token with a
    storage grant, an orchestrator with storage settings); None otherwise."""
    if outcome.succeeded and outcome.output is not None and claims.storage is not None and settings is not None:
        return claims.storage.bucket, outcome.output
    return None


# HeadObject checks of one batch's outputs in flight at once (the orchestrator's S3 client keeps
# storage.s3.CLIENT_POOL_CONNECTIONS connections, more than this).
OUTPUT_CHECKS_AT_ONCE = 16


class OutputChecks:
    """The HeadObject checks of a batch's outputs (`check_node_output`), run `at_once` at a time
    (1: one after the other, on the calling thread).

    Each check is one round trip to S3: milliseconds on AWS, where a batch of 100 checked one
    after the other waited for 100 of them before its one transaction. The threads are started
    at the first batch with two checks or more and kept (KeptThreads); `Engine.close` stops them.
    """

    def __init__(self, at_once: int = OUTPUT_CHECKS_AT_ONCE) -> None:
        self.at_once = at_once
        self._threads = KeptThreads(at_once, "tickweave-output-check")

    def close(self) -> None:
        self._threads.close()

    def run(self, settings: Settings, checks: Sequence[tuple[str, dict[str, Any]] | None]) -> list[Exception | None]:
        """For each (bucket, output) given (None: nothing to check), None if the object is what
        the output says, else the OutputRejected or InvalidInput that says why. Any other error
        (S3 unreachable, throttled past its retries) is raised, the first in the order given,
        once every check has ended."""
        wanted = [k for k, check in enumerate(checks) if check is not None]
        found: list[Exception | None] = [None] * len(checks)
        if len(wanted) < 2 or self.at_once < 2:
            for k in wanted:
                found[k] = _output_check(settings, checks[k])
            return found
        pool = self._threads.pool()
        futures = [(k, pool.submit(_output_check, settings, checks[k])) for k in wanted]
        failures: list[BaseException] = []
        for k, future in futures:
            try:
                found[k] = future.result()
            except BaseException as exc:  # raised below, once every check has ended
                failures.append(exc)
        if failures:
            raise failures[0]
        return found


# Without the engine's checks (a caller that passes none): one after the other, no threads.
_ONE_AT_A_TIME = OutputChecks(at_once=1)


def _output_check(settings: Settings, check: tuple[str, dict[str, Any]] | None) -> Exception | None:
    if check is None:
        return None
    try:
        check_node_output(settings, *check)
    except (OutputRejected, InvalidInput) as exc:
        return exc
    return None


def _refused(db: Database, outcome: completion_store.Outcome) -> AttemptResult:
    with db.connection() as conn:
        return refusal(conn, outcome.task_id, outcome.attempt, outcome.claim_token, outcome.succeeded)


def _record_in_engine(
    db: Database, claims: TaskClaims, checked: completion_store.Outcome, *, settings: Settings | None,
    claim_limit: int,
) -> AttemptResult:
    """The outcome recorded by the engine in Python: pipeline outputs, map items, final
    failures, maps among the successors, the end of a run."""
    task_id, succeeded, retryable = checked.task_id, checked.succeeded, checked.retryable
    output, error = checked.output, checked.error

    # Whether a task produces pipeline outputs is learnt from the guarded finish itself (no read
    # on the path of every callback): the first transaction that accepts such a success rolls
    # back, the S3 reads and writes happen with no transaction open, and a second transaction
    # records the success and indexes what was written. Row locks are never held across S3.
    prepared: list[NewOutput] | None = None
    # The same for a task that map nodes map over: its output is read and each map node's list
    # taken from it with no transaction open; the transaction keeps the lists (mapping).
    items: list[mapping.StagedItems] | None = None

    def persist(conn: Connection, row: Row) -> None:
        needs_outputs = bool(row["output_names"]) and settings is not None
        needs_items = bool(row.get("map_targets"))
        if (needs_outputs and prepared is None) or (needs_items and items is None and settings is not None):
            raise _OutputsNotPrepared(dict(row))
        if needs_outputs and prepared is not None:
            record_task_outputs(conn, row, prepared)
        if needs_items:
            mapping.stage_items(conn, row["id"], items if items is not None else mapping.missing_items(row))

    def work(conn: Connection) -> AttemptResult:
        result = finish_attempt(
            conn, task_id, claims.attempt, uuid.UUID(claims.claim_token), succeeded=succeeded,
            output=output, error=error, retryable=retryable, on_succeeded=persist,
        )
        if (claim_limit and result.accepted and (result.newly_ready or result.frees_map_slot)
                and result.run_id is not None):
            # Eager continuation inside this transaction: the successors it made ready are
            # claimed before commit and dispatched after it (a crash in between is healed by
            # lease expiry, as for the tick's claim).
            claimed = task_store.claim_ready_tasks(conn, claim_limit, run_id=result.run_id)
            result = dataclasses.replace(result, claimed=claimed)
        return result

    try:
        return db.run_in_transaction(work)
    except _OutputsNotPrepared as needed:
        task = needed.task
    assert settings is not None  # only raised when there are settings to reach the bucket
    try:
        # The attempt was current a moment ago but may not be by the time the next transaction
        # runs (its lease expires, a newer attempt is accepted): the objects written here are
        # keyed by this attempt, so they never replace the accepted attempt's, and an attempt
        # refused below leaves them unindexed.
        prepared = prepare_task_outputs(db, settings, task, output)
        items = mapping.prepare_items(settings, task, output)
        return db.run_in_transaction(work)
    except OutputRejected as exc:
        return _reject(db, task_id, claims, exc)


def _reject(db: Database, task_id: uuid.UUID, claims: TaskClaims, rejected: OutputRejected) -> AttemptResult:
    """The success a callback reported, recorded as a failed attempt with the reason (fenced like
    any outcome: refused for an attempt that is no longer current)."""

    def reject(conn: Connection) -> AttemptResult:
        return finish_attempt(
            conn, task_id, claims.attempt, uuid.UUID(claims.claim_token), succeeded=False,
            error=rejected.error, retryable=rejected.retryable,
        )

    return db.run_in_transaction(reject)


def record_heartbeat(
    db: Database, keyring: TokenKeyring, token: str, *, progress: float | None, message: str | None,
    heard: list[tuple[str, str]] | None = None,
) -> tuple[bool, str, uuid.UUID]:
    """(accepted, task status or refusal reason, task id)."""
    claims = read_token(keyring, token)
    if heard is not None:
        heard.append((claims.workspace, claims.task_name))
    task_id = uuid.UUID(claims.task_id)
    with db.transaction() as conn:
        row = task_store.mark_running(conn, task_id, claims.attempt, uuid.UUID(claims.claim_token), progress, message)
        if row is not None:
            return True, str(row["status"]), task_id
        fence = task_store.get_fence(conn, task_id)
    if fence is None:
        return False, "not_found", task_id
    if int(fence["attempt"]) != claims.attempt:
        return False, "stale_attempt", task_id
    return False, f"task is {fence['status']}", task_id
