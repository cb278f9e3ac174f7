"""Workers' outcomes recorded in one statement (tw_complete_attempts, migration 0020).

One call records one outcome (a callback: autocommit, so the statement is its own transaction
and the callback costs one round trip and one commit) or many (a batch of callbacks, inside the
caller's transaction). Each outcome is fenced by its attempt and claim token; the function does
the common path whole (finish, attempt record, successors, their claim and dispatch context,
the run's counters) and hands back, unchanged, what the engine must decide in Python (see the
migration's header)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row
from orchestrator.store.dispatch import DispatchContext, parse_dispatch_context

# What the callback's statement raises for an outcome the engine must record (migrations 0020, 0028).
FOR_THE_ENGINE = "TW001"


@dataclass(frozen=True)
class Outcome:
    """What a worker reported for one attempt (its token already read and checked)."""

    task_id: uuid.UUID
    attempt: int
    claim_token: uuid.UUID
    succeeded: bool
    retryable: bool = True
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recorded:
    """One outcome's answer. `engine`: nothing of it changed; the engine records it. Not
    `accepted` and not `engine`: refused by the fence (the caller asks why)."""

    task_id: uuid.UUID
    accepted: bool
    engine: bool = False
    position: int = 0  # its index in the outcomes recorded
    outcome: str | None = None  # succeeded | retrying
    task_status: str | None = None
    run_id: uuid.UUID | None = None
    run_status: str | None = None  # only when recorded alone
    workspace_id: str | None = None
    pipeline_id: str | None = None
    node_id: str | None = None
    version: str | None = None
    newly_ready: int = 0


@dataclass
class Completion:
    recorded: list[Recorded]  # one per outcome, in the order given
    claimed: list[Row] = field(default_factory=list)
    context: DispatchContext | None = None
    ended_runs: list[tuple[uuid.UUID, str]] = field(default_factory=list)  # (run, status), batches only


class BatchForTheEngine(Exception):
    """A batch recorded with `catch=False` met an outcome the engine must record: nothing of it
    was recorded (the statement failed, and so did the caller's transaction, which the caller
    rolls back). Record the batch again with `catch=True`."""


def complete_attempts(
    conn: Connection, outcomes: Sequence[Outcome], *, claim_limit: int, single: bool, catch: bool = True
) -> Completion:
    """Record `outcomes` (task ids distinct or not: a repeat is refused by the fence) and claim
    at most `claim_limit` of the successors they make ready. `single`: one outcome on an
    autocommit connection; the end of its run is the engine's. Otherwise the caller's
    transaction; runs that ended are returned for the caller to follow before it commits.
    `catch=False` (a batch): recorded without a subtransaction per outcome (migration 0028),
    raising BatchForTheEngine if one outcome is the engine's; `catch=True` answers `engine` for
    that outcome alone and records the others."""
    items = [
        {"task_id": str(o.task_id), "attempt": o.attempt, "claim_token": str(o.claim_token), "ok": o.succeeded,
         "retryable": o.retryable, "output": o.output, "error": o.error}
        for o in outcomes
    ]
    if single and (len(outcomes) != 1 or not conn.autocommit
                   or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE):
        raise ValueError("`single` records one outcome alone, on an autocommit connection outside a transaction")
    try:
        row = conn.execute(
            "SELECT tw_complete_attempts(%s::jsonb, %s::int, %s::boolean, %s::boolean) AS r",
            (Jsonb(items), claim_limit, single, catch),
        ).fetchone()
    except psycopg.DatabaseError as exc:
        if exc.sqlstate != FOR_THE_ENGINE:
            raise
        if single:
            # One outcome alone is recorded without a catching block (migration 0028): an outcome
            # for the engine ends the statement, which rolls back whole on the autocommit connection.
            return Completion(recorded=[Recorded(outcomes[0].task_id, False, engine=True, position=0)])
        if not catch:
            raise BatchForTheEngine() from exc
        raise
    assert row is not None
    answer = row["r"]
    return Completion(
        recorded=sorted((_recorded(r) for r in answer["results"]), key=lambda r: r.position),
        claimed=[_claimed_row(c) for c in answer["claimed"]],
        context=None if answer["context"] is None else parse_dispatch_context(answer["context"]),
        ended_runs=[(uuid.UUID(e["run_id"]), str(e["status"])) for e in answer["ended_runs"]],
    )


def _recorded(r: dict[str, Any]) -> Recorded:
    task_id, position = uuid.UUID(r["task_id"]), int(r["position"])
    if r.get("engine"):
        return Recorded(task_id, False, engine=True, position=position)
    if not r["accepted"]:
        return Recorded(task_id, False, position=position)
    return Recorded(
        task_id, True, position=position, outcome=r["outcome"], task_status=r["task_status"], run_id=uuid.UUID(r["run_id"]),
        run_status=r.get("run_status"), workspace_id=r["workspace_id"], pipeline_id=r["pipeline_id"],
        node_id=r["node_id"], version=r["version"], newly_ready=int(r["newly_ready"]),
    )


def _claimed_row(c: dict[str, Any]) -> Row:
    """A claimed task as tw_claim_ready_tasks returns it (typed as psycopg would load it)."""
    row = dict(c)
    for name in ("id", "run_id", "claim_token"):
        row[name] = uuid.UUID(c[name])
    for name in ("dispatched_at", "lease_expires_at"):
        row[name] = None if c[name] is None else datetime.fromisoformat(c[name])
    return row
