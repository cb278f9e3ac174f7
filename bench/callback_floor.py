"""The callback's statement beside the writes it cannot do without: how far from its floor it is.

A deep DAG's callback must, whatever the code around it:
  1. end the task (fenced by attempt and claim token, from `dispatched` or `running`);
  2. end its attempt's record;
  3. claim its successor (from `pending`: its count of unfinished upstreams, its new attempt,
     claim token and lease);
  4. write the successor's attempt record;
and commit. `floor` does exactly these four writes in one PL/pgSQL function, one statement per
callback (one per batch of callbacks, set by set), with nothing else: no trigger rule, no run
counter carried, no limits, no dispatch context, no answer beyond the successor's key. It is
installed in the case's database only, never in the product's schema.

`tasks only` goes below the floor: the two task rows alone, without the attempt records. No
callback could be made so (every attempt has its record); it says what the records cost.

`statement` is the product's statement alone (`store.completions.complete_attempts`, as
`Engine.record_callback` and `record_callbacks` run it), with no token read and no dispatch: the
server's share of the lifecycle. The full lifecycle (the `lifecycle` and `batched` parts) adds
the client's work the protocol requires (token, storage grant, message).

Both run the same chains (the deep DAG: `runs` runs of `nodes` nodes, their roots dispatched
before timing), one connection, callbacks one at a time (autocommit) or `per_call` at a time in
a transaction. A chain's last callback ends its run, which is the engine's path (not the
statement's): it is left out of both. The ratio statement ÷ floor is printed per figure.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

from bench.measure import TALLY, Outcome, Result, counted_connect, counted_transaction
from bench.server import Server
from bench.suite import CHAIN, WORKSPACE, Suite, noop_engine
from orchestrator.db.connection import Connection
from orchestrator.store.completions import BatchForTheEngine, complete_attempts
from orchestrator.store.completions import Outcome as CallbackOutcome


def _floor_function(*, attempt_records: bool) -> str:
    """The four writes, for a batch of callbacks given as arrays (one callback: arrays of one),
    answering the successors claimed (their key, attempt and claim token). Without
    `attempt_records`, the two task rows alone."""
    attempt_ended = """
    ), attempt_ended AS (
        UPDATE task_attempts x SET status = 'succeeded', finished_at = now()
        FROM ended e WHERE x.task_id = e.id AND x.attempt = e.attempt AND x.status IN ('dispatched', 'running')"""
    attempt_started = """
    ), attempt_started AS (
        INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
        SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM claimed c"""
    return f"""
CREATE FUNCTION bench_callback_floor(p_ids uuid[], p_attempts integer[], p_tokens uuid[])
    RETURNS TABLE (id uuid, attempt integer, claim_token uuid)
    LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    WITH given AS (
        SELECT g.id, g.attempt, g.claim_token FROM unnest(p_ids, p_attempts, p_tokens) AS g(id, attempt, claim_token)
    ), ended AS (
        UPDATE tasks t SET status = 'succeeded', finished_at = now(), output = jsonb_build_object('key', 'k'),
                           lease_expires_at = NULL, claim_token = NULL
        FROM given g
        WHERE t.id = g.id AND t.attempt = g.attempt AND t.claim_token = g.claim_token
          AND t.status IN ('dispatched', 'running')
        RETURNING t.id, g.attempt{attempt_ended if attempt_records else ""}
    ), claimed AS (
        UPDATE tasks t SET unfinished_deps = t.unfinished_deps - 1, status = 'dispatched', attempt = t.attempt + 1,
                           claim_token = gen_random_uuid(), dispatched_at = now(),
                           lease_expires_at = now() + make_interval(secs => 2 * t.heartbeat_s)
        FROM task_edges s JOIN ended e ON s.upstream_task_id = e.id
        WHERE t.id = s.downstream_task_id AND t.status = 'pending'
        RETURNING t.id, t.attempt, t.claim_token, t.dispatched_at{attempt_started if attempt_records else ""}
    )
    SELECT c.id, c.attempt, c.claim_token FROM claimed c;
END
$$;
"""


FLOOR_FUNCTION = _floor_function(attempt_records=True)
# The two task rows alone: not a callback Tickweave could make (every attempt has its record);
# what the records cost.
TASKS_ONLY_FUNCTION = _floor_function(attempt_records=False)

Key = tuple[uuid.UUID, int, uuid.UUID]  # a dispatched task: id, attempt, claim token


@dataclass
class CallbackFloorCase:
    """`mode` statement | floor | tasks only over the deep DAG's chains, `per_call` callbacks per call."""

    server: Server
    suite: Suite
    mode: str = "statement"
    runs: int = 20
    nodes: int = 100
    per_call: int = 1
    claim_limit: int = 100
    clients: int = 1
    system: str = "tickweave"
    name: str = ""
    database: str = ""
    waiting: list[Key] = field(default_factory=list)
    run_enders: set[uuid.UUID] = field(default_factory=set)
    done: int = 0

    def __post_init__(self) -> None:
        what = {"statement": "callback statement alone", "floor": "floor: the four writes alone",
                "tasks only": "below the floor: the two task rows alone"}[self.mode]
        self.name = f"{what}, deep ({self.runs}x{self.nodes})"
        if self.per_call > 1:
            self.name += f", batches of {self.per_call}"

    def setup(self) -> None:
        self.database = f"bench_floor_{self.mode.replace(' ', '_')}_{self.per_call}"
        url = self.suite.copy(self.database)
        engine, _ = noop_engine(url, pool=1)
        try:
            for _ in range(self.runs):
                engine.trigger_run(WORKSPACE, CHAIN, dispatch_now=False)
            engine.dispatch_ready()  # the roots
        finally:
            engine.close()
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            if self.mode == "floor":
                conn.execute(FLOOR_FUNCTION)
            elif self.mode == "tasks only":
                conn.execute(TASKS_ONLY_FUNCTION)
            rows = conn.execute("SELECT id, attempt, claim_token FROM tasks WHERE status = 'dispatched' ORDER BY id")
            self.waiting = [(r["id"], r["attempt"], r["claim_token"]) for r in rows]
            # Each chain's last task: its callback alone ends the run, the engine's path (left out).
            # In a batch the statement records a run's end itself: there they are called back.
            self.run_enders = {r["id"] for r in conn.execute(
                "SELECT id FROM tasks WHERE node_id = (SELECT max(node_id) FROM tasks)")}
        if len(self.waiting) != self.runs or len(self.run_enders) != self.runs:
            raise RuntimeError(f"{len(self.waiting)} roots dispatched, {self.runs} expected")
        self.server.vacuum_analyze(self.database)

    def run(self) -> Outcome:
        done = 0
        with counted_connect(self.server.url(self.database)) as conn:
            while self.waiting:
                taken, self.waiting = self.waiting[:self.per_call], self.waiting[self.per_call:]
                if self.per_call == 1 and taken[0][0] in self.run_enders:
                    continue
                claimed = self._statement(conn, taken) if self.mode == "statement" else self._floor(conn, taken)
                done += len(taken)
                self.waiting += claimed
        self.done = done
        return Outcome(items=done)

    def _floor(self, conn: Connection, taken: list[Key]) -> list[Key]:
        query = "SELECT id, attempt, claim_token FROM bench_callback_floor(%s, %s, %s)"
        params = ([k[0] for k in taken], [k[1] for k in taken], [k[2] for k in taken])
        if len(taken) == 1:
            TALLY.add(autocommits=1)  # a write on the autocommit connection: its own commit
            rows = conn.execute(query, params).fetchall()
        else:
            with counted_transaction(conn):
                rows = conn.execute(query, params).fetchall()
        return [(r["id"], r["attempt"], r["claim_token"]) for r in rows]

    def _statement(self, conn: Connection, taken: list[Key]) -> list[Key]:
        outcomes = [CallbackOutcome(k[0], k[1], k[2], True, True, {"key": "k"}) for k in taken]
        if len(taken) == 1:
            TALLY.add(autocommits=1)
            completion = complete_attempts(conn, outcomes, claim_limit=self.claim_limit, single=True)
        else:
            try:
                with counted_transaction(conn):
                    completion = complete_attempts(conn, outcomes, claim_limit=self.claim_limit, single=False,
                                                   catch=False)
            except BatchForTheEngine:
                # a chain's last task in the batch (its run ends): recorded outcome by outcome
                with counted_transaction(conn):
                    completion = complete_attempts(conn, outcomes, claim_limit=self.claim_limit, single=False)
        return [(c["id"], c["attempt"], c["claim_token"]) for c in completion.claimed]

    def teardown(self) -> None:
        try:
            # every callback counted was recorded (fenced writes that matched nothing count nothing)
            with psycopg.connect(self.server.url(self.database)) as conn:
                row = conn.execute("SELECT count(*) FROM tasks WHERE status = 'succeeded'").fetchone()
            if self.done and (row is None or row[0] != self.done):
                raise RuntimeError(f"{row[0] if row else 0} tasks succeeded, {self.done} callbacks counted")
        finally:
            self.server.drop(self.database)


def _server_ms(r: Result) -> float | None:
    return None if r.server_cpu_s is None else r.per_item(r.server_cpu_s * 1000)


def report(results: list[Result]) -> str:
    """Each case beside the floor of the same callbacks per call: its rate and server CPU as
    multiples of the floor's."""
    head = ("| callbacks | case | tasks/s | server CPU ms/task | client CPU ms/task | rate ÷ floor's "
            "| server CPU ÷ floor's |\n|---|---|---|---|---|---|---|")
    rows = []
    for batched in (False, True):
        group = [r for r in results if ("batches" in r.case) == batched]
        floor = next((r for r in group if r.case.startswith("floor")), None)
        for r in group:
            ms, floor_ms = _server_ms(r), None if floor is None else _server_ms(floor)
            rows.append("| {} | {} | {:,.0f} | {} | {:.3f} | {} | {} |".format(
                "in batches" if batched else "one at a time", r.case.split(",")[0], r.rate,
                "-" if ms is None else f"{ms:.3f}", r.per_item(r.client_cpu_s * 1000),
                "-" if floor is None or not floor.rate else f"{r.rate / floor.rate:.2f}",
                "-" if ms is None or not floor_ms else f"{ms / floor_ms:.2f}"))
    return head + "\n" + "\n".join(rows)
