"""The run lifecycle as a Hypothesis state machine on the real Postgres.

Random DAGs (fan-out, joins, `on_failure`, the four trigger rules, approval and manual steps,
retries, pipeline and workspace `max_active_tasks`, `max_active_runs`, and optionally an
orchestration of two pipelines where `b` depends on `a`'s declared output) are driven by rules
interleaved at random: triggers (with and without an idempotency key), orchestrations, ticks,
claims, worker callbacks (success, retryable and final failure), heartbeats, duplicate, stale
and forged callbacks, lease expiry and other moves of the database clock, dispatches failing,
cancel, redrive, dead-letter retry, approvals, manual steps, new pipeline versions and
pause/resume.

Mapped nodes (issue 19) are in the random DAGs: a task node may get `map:`, over `params.items`
(every pipeline has a list of 0..6 items in its params, and a trigger may give another) or over
an upstream task's output (`<upstream>.items`; the machine's worker writes a list of random
width there, or sometimes something that is not a list, so the map node fails with
map_over_invalid), with a random `tolerated_failures`. The children are ordinary tasks for every
rule (claims, callbacks, leases, cancel, redrive, the dead-letter queue).

After every step:
- the invariant checker (orchestrator/store/invariants.py) finds nothing;
- no task was claimed while an upstream its trigger rule needs was unfinished or unsatisfied
  (recorded inside the claiming transaction, for every claim whoever made it);
- every run still has the pipeline version it pinned, and exactly that version's tasks;
- a refused callback (stale, duplicate, forged), a stale heartbeat and a decision on a step that
  is not waiting were refused and changed nothing at all; an accepted callback had the outcome
  the retry policy says;
- every attempt is recorded once and closed once (one open attempt row, the current one, for an
  active task); a succeeded task that produces a pipeline output has it indexed, and only an
  accepted attempt's is; a run starts each dependant at most once by later trigger, and never
  a paused one;
- a map node is never claimed (no attempt, claim token or lease), a child is claimed only while
  its map node is pending (expanded) and its map node's trigger rule held; an expanded map node
  has exactly the items staged for it (the list the worker wrote, or the params), each child its
  own item; a settled one agrees with its children: its output counts are theirs and its width,
  it succeeded iff its failed children are within tolerated_failures (computed here by
  MapSpec.tolerated), and it was skipped iff some were skipped; one failed unexpanded failed
  because its list was not one (map_over_invalid); a mapped failure handler (`one_failed`,
  `all_done`) never has items skipped (a stopping failure does not skip an unmapped one).
At the end the machine drives everything to quiescence (ticks, successful callbacks, except that
item 1 of every map fails for good on its first attempt, every human step approved), and every
run must be terminal with clean books and every map node settled (consistently, as above).

One fresh database (cloned from the migrated template) per example. Bounded by default (about
a minute on two cores); `--hypothesis-profile=long` for a soak (see conftest_hypothesis.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from infra.postgres import create_database, drop_database, with_database
from infra.s3 import MotoServer
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.db.migrate import load_migrations
from orchestrator.dispatch.base import DispatchError
from orchestrator.engine import mapping
from orchestrator.engine.completion import AttemptResult, finish_attempt
from orchestrator.engine.errors import Conflict, InvalidInput
from orchestrator.engine.keys import set_workspace_task_limit
from orchestrator.engine.service import Engine
from orchestrator.model.pipeline import MapSpec
from orchestrator.storage.s3 import ensure_bucket, put_json_object
from orchestrator.store import maps as map_store
from orchestrator.store import runs as run_store
from orchestrator.store import tasks as task_store
from orchestrator.store.invariants import check_books
from tests.db_fixtures import TEMPLATE_DB

from .conftest_hypothesis import is_long, lifecycle_settings

WORKSPACE = "acme"
TERMINAL = frozenset({"succeeded", "failed", "skipped", "cancelled"})
FAILED = frozenset({"failed"})
ACTIVE = frozenset({"dispatched", "running"})
RUN_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_SQL = "('succeeded', 'failed', 'skipped', 'cancelled')"
TRIGGER_RULES = ("all_success", "all_done", "none_failed", "one_failed")
PICK = st.integers(min_value=0, max_value=1_000)
REFUSED_OUTCOMES = {"duplicate", "stale_attempt", "already_finished", "not_active"}

# SWITCH (issue 19, `map.max_concurrency`): the claim bounds a map node's active children from
# migration 0017_map_concurrency.sql on. With it the machine draws max_concurrency None or 1..3 and
# the checker (map_concurrency_limit) holds every claim to it after every step; without it a bound
# would only make that check fire, so the machine draws none. Set False by hand to leave it out.
MAP_CONCURRENCY_ENFORCED = any((m.version, m.name) == (17, "map_concurrency") for m in load_migrations())
MAX_ITEMS = 6
# What the worker of a task that map nodes map over writes: {"items": [...]} of that many items,
# or a value that has no list there (the map node fails with map_over_invalid).
ITEM_SHAPES: st.SearchStrategy[int | str] = st.sampled_from([0, 1, 2, 3, MAX_ITEMS, 2, "string", "no_key"])


def items_list(width: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{k}" for k in range(width)]


def worker_output(shape: int | str) -> Any:
    """The output value a worker writes for a task mapped over (see ITEM_SHAPES)."""
    if shape == "string":
        return {"items": "a.csv"}
    if shape == "no_key":
        return {"files": ["a.csv"]}
    assert isinstance(shape, int)
    return {"items": items_list(shape, "w")}


def drain_outcome(delivery: Delivery) -> tuple[str, int | str]:
    """How a worker answers while the machine drains (outcome, items): it succeeds, except that
    item 1 of a map fails for good on its first attempt (so maps end with failures within and
    beyond tolerated_failures); a task mapped over writes 0..3 items or, now and then, no list.
    The delivery's label decides, so that an example replays alike."""
    shapes: tuple[int | str, ...] = (0, 1, 2, 3, 2, "string")
    shape = shapes[zlib.crc32(delivery.label.encode()) % len(shapes)]
    return ("final" if delivery.map_index == 1 and delivery.attempt == 1 else "succeeded"), shape


def staged_items(targets: list[dict[str, Any]], value: Any) -> list[mapping.StagedItems]:
    """What the worker protocol stages for each map node mapping over a task whose output is
    `value` (mapping.prepare_items, without the read from the bucket)."""
    staged = []
    for target in targets:
        items, problem = mapping.extract_items(value, list(target.get("path") or []), str(target.get("over")))
        staged.append(mapping.StagedItems(uuid.UUID(str(target["parent"])), items, problem))
    return staged


def task_label(run: str, node_id: str, map_index: int | None, version: str, attempt: int) -> str:
    """r0:p.n1@v1#2, or r0:p.n1[3]@v1#2 for item 3 of a mapped node (labels order deliveries: unique)."""
    item = f"[{map_index}]" if map_index is not None and map_index >= 0 else ""
    return f"{run}.{node_id}{item}@{version}#{attempt}"


# --- definitions -----------------------------------------------------------------------------


@st.composite
def node_lists(draw: st.DrawFn, max_nodes: int, need_task: bool = False) -> list[dict[str, Any]]:
    """A random DAG: each node depends on up to three earlier ones (fan-out and joins); about a
    third of the task nodes are mapped (with `need_task`, n0 is an unmapped task: an output's source)."""
    count = draw(st.integers(min_value=1, max_value=max_nodes))
    nodes: list[dict[str, Any]] = []
    for i in range(count):
        node: dict[str, Any] = {"id": f"n{i}"}
        if i:
            node["depends"] = draw(st.lists(st.sampled_from([f"n{j}" for j in range(i)]), unique=True,
                                            max_size=min(i, 3)))
        kind = draw(st.sampled_from(["task", "task", "task", "task", "approval", "manual"]))
        if need_task and i == 0:
            kind = "task"
        if kind == "task":
            node["task"] = "echo"
            node["retry"] = {"max_attempts": draw(st.integers(1, 3)), "backoff": "fixed",
                             "base_delay_s": draw(st.sampled_from([0, 5]))}
            node["heartbeat_s"] = draw(st.sampled_from([5, 30]))
            if draw(st.booleans()):
                node["timeout_s"] = 20
            if not (need_task and i == 0) and draw(st.integers(0, 2)) == 0:
                # a mapped node: over the params, or over an upstream task's (unmapped) output
                sources = [d for d in node.get("depends", []) if "task" in nodes[int(d[1:])]
                           and "map" not in nodes[int(d[1:])]]
                over = draw(st.sampled_from(["params.items", *(f"{s}.items" for s in sources)]))
                node["map"] = {"over": over, "tolerated_failures": draw(st.sampled_from([0, 1, "50%"]))}
                if MAP_CONCURRENCY_ENFORCED:
                    node["map"]["max_concurrency"] = draw(st.sampled_from([None, 1, 2, 3]))
        else:
            node["kind"] = kind
            if kind == "approval" and draw(st.booleans()):
                node["approval"] = {"timeout_s": 60, "on_timeout": draw(st.sampled_from(["reject", "escalate"]))}
        node["on_failure"] = draw(st.sampled_from(["stop", "continue"]))
        node["trigger_rule"] = draw(st.sampled_from(TRIGGER_RULES))
        nodes.append(node)
    return nodes


@dataclass(frozen=True)
class World:
    definitions: dict[str, dict[str, Any]]  # in creation order (an upstream before its dependant)
    workspace_limit: int | None


def _concurrency(draw: st.DrawFn) -> dict[str, int]:
    concurrency: dict[str, int] = {}
    tasks = draw(st.sampled_from([None, None, 1, 2, 3]))
    runs = draw(st.sampled_from([None, None, 1, 2]))
    if tasks is not None:
        concurrency["max_active_tasks"] = tasks
    if runs is not None:
        concurrency["max_active_runs"] = runs
    return concurrency


def _params(draw: st.DrawFn) -> dict[str, Any]:
    """A pipeline's params: the list its nodes mapped over `params.items` map over by default."""
    return {"items": items_list(draw(st.integers(0, MAX_ITEMS)))}


@st.composite
def worlds(draw: st.DrawFn) -> World:
    versions = draw(st.sampled_from([["v1"], ["v1", "v2"]]))
    definitions: dict[str, dict[str, Any]] = {
        "p": {"id": "p", "versions": versions, "nodes": draw(node_lists(5)), "concurrency": _concurrency(draw),
              "params": _params(draw)},
    }
    if draw(st.booleans()):
        # a declares `out` from a task node; b reads it (orchestrations, later triggers, hydration)
        definitions["a"] = {"id": "a", "versions": versions, "nodes": draw(node_lists(3, need_task=True)),
                            "outputs": {"out": {"from": "n0"}}, "concurrency": _concurrency(draw),
                            "params": _params(draw)}
        definitions["b"] = {"id": "b", "versions": versions, "nodes": draw(node_lists(3)),
                            "depends": [{"pipeline": "a", "outputs": ["out"],
                                         "trigger": draw(st.sampled_from(["on_success", "on_complete", "none"]))}],
                            "concurrency": _concurrency(draw), "params": _params(draw)}
    return World(definitions, draw(st.sampled_from([None, None, 2, 4])))


# --- the worker side -------------------------------------------------------------------------


@dataclass
class Delivery:
    """One claim of one task: what a worker (or a test playing one) holds."""

    task_id: uuid.UUID
    attempt: int
    claim_token: uuid.UUID
    label: str
    token: str | None = None  # set when the dispatch reached the transport
    outcome: str | None = None  # the callback we sent and had accepted: succeeded | retryable | final
    map_index: int = -1  # a map node's child: its item's index


class Transport:
    """Keeps every dispatch (the test plays the worker). While `down`, every send fails: a whole
    step's dispatches fail together, so which ones fail does not depend on the order in which the
    dispatcher's threads send them (examples must replay exactly for Hypothesis to shrink them)."""

    name = "local"

    def __init__(self, machine: LifecycleMachine) -> None:
        self.machine = machine
        self.down = False
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self.down:
                raise DispatchError("connection refused (transport down)")
            self.machine.delivered(message)

    def close(self) -> None:
        pass


def _no_grant(settings: Any, **kwargs: Any) -> None:
    return None


# --- the machine -----------------------------------------------------------------------------


@dataclass
class Context:
    admin_url: str
    moto: MotoServer
    bucket: str


# Database time moves only when the machine says: a second per step and the rules' explicit
# moves, however long a step takes for real. (Real time flowing under leases of seconds and retry
# delays would make an example behave differently when Hypothesis replays it to shrink it.)
STEP_SECONDS = 1


def step(method: Callable[..., Any]) -> Callable[..., Any]:
    """A rule: the clock moves a second, the transport is down if a rule said so. The machine
    counts as healthy only when every step completed, so that teardown does not pile a
    quiescence failure on top of the step that failed."""

    @functools.wraps(method)
    def wrapper(self: LifecycleMachine, *args: Any, **kwargs: Any) -> Any:
        self.healthy = False
        self.transport.down = self.down_steps > 0
        self.down_steps = max(0, self.down_steps - 1)
        self.shift_clock(STEP_SECONDS)
        result = method(self, *args, **kwargs)
        self.healthy = True
        return result

    return wrapper


def named(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """A rule listed under another name (Hypothesis prints the function's name in a repro)."""
    wrapped = step(method)
    wrapped.__name__ = wrapped.__qualname__ = name
    return wrapped


def checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """An invariant (reads only; the clock stands still)."""

    @functools.wraps(method)
    def wrapper(self: LifecycleMachine, *args: Any, **kwargs: Any) -> Any:
        self.healthy = False
        result = method(self, *args, **kwargs)
        self.healthy = True
        return result

    return wrapper


class LifecycleMachine(RuleBasedStateMachine):
    ctx: Context  # set by the test before running
    current: LifecycleMachine | None = None  # the machine the claim hook reports to

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.db_name = f"tickweave_sm_{uuid.uuid4().hex[:12]}"
        create_database(self.ctx.admin_url, self.db_name, template=TEMPLATE_DB)
        self.url = with_database(self.ctx.admin_url, self.db_name)
        self.settings = Settings(database_url=self.url, local_worker=None,
                                 s3_endpoint_url=self.ctx.moto.endpoint_url, bucket=self.ctx.bucket)
        self.transport = Transport(self)
        self.engine = Engine(self.settings, Database(self.url, max_size=4), transports={"local": self.transport})
        # no storage grants: the test writes outputs itself
        self.engine.dispatcher._issue_grant = _no_grant  # type: ignore[method-assign]
        self.engine.create_api_key(WORKSPACE, "admin", raw_key="acme-admin-key")
        self.down_steps = 0
        with self.engine.db.connection() as conn:
            (now,) = conn.execute("SELECT date_trunc('second', now()) AS t").fetchall()
        self.clock: datetime = now["t"]
        self.shift_clock(0)
        self.definitions: dict[str, dict[str, Any]] = {}
        self.versions: dict[tuple[str, int], set[str]] = {}  # (pipeline, version) -> node ids
        self.concurrency: dict[str, dict[str, int]] = {}
        self.deliveries: dict[tuple[uuid.UUID, int], Delivery] = {}
        self.claim_problems: list[str] = []
        self.child_claim_problems: list[str] = []  # children of map nodes, reported apart
        self.runs: dict[uuid.UUID, tuple[str, int, str]] = {}  # run -> (pipeline, pinned version, label)
        # (pipeline, key) -> (run, versions, params) of the trigger that created it
        self.idempotent: dict[tuple[str, str], tuple[uuid.UUID, list[str] | None, dict[str, Any]]] = {}
        # task -> the output value of its accepted success, for each task map nodes map over
        self.produced: dict[uuid.UUID, Any] = {}
        self.orchestrations: dict[str, uuid.UUID] = {}
        self.paused: set[str] = set()  # the pause state is constant during any other step
        self.paused_triggered: list[uuid.UUID] = []
        LifecycleMachine.current = self

    # -- bookkeeping ----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        note(message)
        if ": refused" not in message and any(message.startswith(w) for w in (
                "redrive", "retry dead letter", "cancel", "decide", "orchestration", "callback", "update")):
            event(message.split(" ")[0] + (" ok" if "refused" not in message else " refused"))

    def run_label(self, run_id: uuid.UUID) -> str:
        known = self.runs.get(run_id)
        return known[2] if known else f"run {str(run_id)[:8]}"

    def label_runs(self, conn: Connection) -> None:
        """Name runs r0, r1, ... in the order they appear (deterministic, unlike their ids)."""
        for row in conn.execute("SELECT id, pipeline_id, pipeline_version, trigger FROM runs "
                                "ORDER BY created_at, pipeline_id, id").fetchall():
            if row["id"] not in self.runs:
                self.runs[row["id"]] = (row["pipeline_id"], int(row["pipeline_version"]),
                                        f"r{len(self.runs)}:{row['pipeline_id']}")
                if row["trigger"] == "pipeline" and row["pipeline_id"] in self.paused:
                    # (raised by sync_runs, not inside the engine transaction this may run in)
                    self.paused_triggered.append(row["id"])

    def sync_runs(self) -> None:
        """Learn runs created by the engine itself (later triggers) and check the pinned versions."""
        with self.engine.db.connection() as conn:
            self.label_runs(conn)
            rows = conn.execute(
                """SELECT r.id, r.pipeline_id, r.pipeline_version, r.versions,
                          COALESCE(array_agg(DISTINCT t.node_id) FILTER (WHERE t.id IS NOT NULL), '{}') AS nodes,
                          count(t.id) FILTER (WHERE t.map_parent_id IS NULL) AS tasks
                   FROM runs r LEFT JOIN tasks t ON t.run_id = r.id GROUP BY r.id
                   ORDER BY r.created_at, r.pipeline_id, r.id"""
            ).fetchall()
        if self.paused_triggered:
            raise broken("paused_pipeline_triggered")("later triggers started runs of paused pipelines: " + ", ".join(
                self.run_label(r) for r in self.paused_triggered))
        for row in rows:
            known = self.runs[row["id"]]
            assert (row["pipeline_id"], int(row["pipeline_version"])) == known[:2], (
                f"{known[2]} pinned version {known[1]} of {known[0]}, now says {row['pipeline_version']}")
            want = self.versions[(row["pipeline_id"], int(row["pipeline_version"]))]
            assert set(row["nodes"]) == want and row["tasks"] == len(want) * len(row["versions"]), (
                f"{known[2]} has tasks of nodes {sorted(row['nodes'])}; its version {known[1]} has {sorted(want)}")

    def shift_clock(self, seconds: float) -> None:
        """Database time (tw_now(), for every connection) becomes the machine's clock plus
        `seconds`, from now on flowing only by the milliseconds a step takes."""
        self.clock += timedelta(seconds=seconds)
        with self.engine.db.connection() as conn:
            conn.execute(
                """INSERT INTO tw_clock (singleton, "offset") VALUES (true, %s::timestamptz - now())
                   ON CONFLICT (singleton) DO UPDATE SET "offset" = EXCLUDED."offset" """,
                (self.clock,),
            )

    def query(self, statement: str, *params: Any) -> list[Row]:
        with self.engine.db.connection() as conn:
            return conn.execute(statement, params).fetchall()

    def snapshot(self) -> dict[str, str]:
        """A digest of every table: a refused callback must leave all of them as they were."""
        with self.engine.db.connection() as conn:
            tables = [r["tablename"] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename").fetchall()]
            digests = {}
            for table in tables:
                (row,) = conn.execute(
                    f"SELECT md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) AS h FROM {table} x"
                ).fetchall()
                digests[table] = str(row["h"])
        return digests

    # -- the claim hook ---------------------------------------------------------------------------

    def claimed(self, conn: Connection, rows: list[Row]) -> None:
        """Inside the claiming transaction: every claimed task's upstreams, as they are now. A map
        node's child has no upstream of its own: it is judged by its map node (which must be
        pending, expanded) and that node's upstreams other than its children."""
        if not rows:
            return
        self.label_runs(conn)
        ids = [r["id"] for r in rows]
        found = conn.execute(
            """SELECT t.id, t.attempt, t.claim_token, t.node_id, t.version, t.kind, t.trigger_rule, t.run_id,
                      t.map_index, t.map_parent_id, r.status AS run_status, p.status AS parent_status,
                      p.map_width AS parent_width, p.trigger_rule AS parent_rule,
                      COALESCE(jsonb_agg(jsonb_build_object('node', u.node_id, 'status', u.status,
                                                            'on_failure', u.on_failure))
                               FILTER (WHERE u.id IS NOT NULL), '[]'::jsonb) AS ups
               FROM tasks t JOIN runs r ON r.id = t.run_id
               LEFT JOIN tasks p ON p.id = t.map_parent_id
               LEFT JOIN task_edges e ON e.downstream_task_id = COALESCE(t.map_parent_id, t.id)
               LEFT JOIN tasks u ON u.id = e.upstream_task_id AND u.map_parent_id IS NULL
               WHERE t.id = ANY(%s) GROUP BY t.id, r.status, p.id""",
            (ids,),
        ).fetchall()
        for row in found:
            label = task_label(self.run_label(row["run_id"]), row["node_id"], row["map_index"], row["version"],
                               row["attempt"])
            self.deliveries[(row["id"], int(row["attempt"]))] = Delivery(
                row["id"], int(row["attempt"]), row["claim_token"], label, map_index=int(row["map_index"]))
            if row["map_parent_id"] is None:
                problem = claim_problem(row["kind"], row["trigger_rule"], row["run_status"], row["ups"])
            elif row["parent_status"] != "pending" or row["parent_width"] is None:
                problem = (f"its map node was {row['parent_status']} "
                           f"({'unexpanded' if row['parent_width'] is None else 'expanded'})")
            else:
                problem = claim_problem(row["kind"], row["parent_rule"], row["run_status"], row["ups"])
            if problem is not None:
                rule = row["trigger_rule"] if row["map_parent_id"] is None else f"map node {row['parent_rule']}"
                (self.claim_problems if row["map_parent_id"] is None else self.child_claim_problems).append(
                    f"{label} ({rule}) was claimed while {problem}; upstreams: "
                    + ", ".join(f"{u['node']}={u['status']}/{u['on_failure']}" for u in row["ups"]))

    def delivered(self, message: dict[str, Any]) -> None:
        key = (uuid.UUID(message["task_id"]), int(message["attempt"]))
        delivery = self.deliveries.get(key)
        if delivery is None:  # a claim that did not go through claim_ready_tasks: learn it from the token
            claims = self.engine.keyring.read(message["token"])
            index = int((message.get("map") or {}).get("index", -1))
            delivery = Delivery(key[0], key[1], uuid.UUID(claims.claim_token), task_label(
                "?", str(message.get("node")), index, str(message.get("version")), key[1]), map_index=index)
            self.deliveries[key] = delivery
        delivery.token = message["token"]

    # -- calling back -----------------------------------------------------------------------------

    def fence(self, task_id: uuid.UUID) -> Row:
        (row,) = self.query(
            "SELECT id, status, attempt, claim_token, max_attempts, output_names, map_targets FROM tasks WHERE id = %s",
            task_id)
        return row

    def current_deliveries(self) -> list[Delivery]:
        """Deliveries whose attempt is the task's current, active one."""
        rows = self.query("SELECT id, attempt, claim_token FROM tasks WHERE status IN ('dispatched', 'running')")
        current = []
        for row in rows:
            delivery = self.deliveries.get((row["id"], int(row["attempt"])))
            if delivery is not None and delivery.claim_token == row["claim_token"]:
                current.append(delivery)
        return sorted(current, key=lambda d: d.label)

    def callback(self, delivery: Delivery, outcome: str, *, claim_token: uuid.UUID | None = None,
                 items: int | str = 2) -> AttemptResult:
        """What a worker sends: through the worker protocol with the dispatch's token, or (a
        delivery claimed by the test itself, or a forged claim token) finish_attempt directly.

        A task that map nodes map over (`map_targets`) writes worker_output(items) as its output.
        Through the worker protocol the engine reads it back from the bucket (mapping.prepare_items)
        and stages each map node's list; finish_attempt directly stages them in its transaction
        as the worker protocol does (its `on_succeeded` hook, mapping.stage_items)."""
        fence = self.fence(delivery.task_id)
        targets: list[dict[str, Any]] = fence["map_targets"] or []
        ok = outcome == "succeeded"
        output: dict[str, Any] | None = None
        value: Any = None
        if ok:
            key = f"test/{delivery.task_id}/{delivery.attempt}/output.json"
            if fence["output_names"] or targets:  # the server reads what a pipeline output or a map's list is in
                value = worker_output(items) if targets else {"rows": 1}
                size, sha = put_json_object(self.settings, key, value)
                output = {"key": key, "size": size, "sha256": sha}
            else:
                output = {"key": key}
        error = None if ok else {"message": "boom", "code": "e1", "retryable": outcome == "retryable"}
        if delivery.token is not None and claim_token is None:
            result = self.engine.record_callback(delivery.task_id, delivery.token,
                                                 status="succeeded" if ok else "failed", output=output, error=error)
        else:
            # Only the worker protocol persists pipeline outputs: a success of a task that produces
            # them is only ever sent with a token (see can_call_back).
            def stage(conn: Connection, row: Row) -> None:
                mapping.stage_items(conn, row["id"], staged_items(row["map_targets"] or [], value))

            def work(conn: Connection) -> AttemptResult:
                return finish_attempt(conn, delivery.task_id, delivery.attempt, claim_token or delivery.claim_token,
                                      succeeded=ok, output=output, error=error, retryable=outcome != "final",
                                      on_succeeded=stage if targets else None)

            result = self.engine.db.run_in_transaction(work)
        if targets and result.accepted and result.outcome == "succeeded":
            self.produced[delivery.task_id] = value
        return result

    def can_call_back(self, delivery: Delivery, outcome: str) -> bool:
        """A delivery claimed by the test (no token) is finished through finish_attempt, which does
        not persist pipeline outputs: it may fail, but only succeed when it produces none."""
        return delivery.token is not None or outcome != "succeeded" or not self.fence(delivery.task_id)["output_names"]

    def expect_refused(self, delivery: Delivery, outcome: str, why: str, *, claim_token: uuid.UUID | None = None) -> None:
        before = self.snapshot()
        result = self.callback(delivery, outcome, claim_token=claim_token)
        self.log(f"{why} callback {outcome} of {delivery.label}: {result.outcome}")
        assert not result.accepted, f"{why} callback of {delivery.label} was accepted: {result}"
        assert result.outcome in REFUSED_OUTCOMES, result
        after = self.snapshot()
        changed = sorted(t for t in before if before[t] != after.get(t))
        assert not changed, f"a refused ({result.outcome}) {why} callback of {delivery.label} changed {changed}"

    # -- setup ------------------------------------------------------------------------------------

    @initialize(world=worlds())
    @step
    def create_world(self, world: World) -> None:
        if world.workspace_limit is not None:
            set_workspace_task_limit(self.engine.db, WORKSPACE, world.workspace_limit)
        for pipeline_id, definition in world.definitions.items():
            saved = self.engine.create_pipeline(WORKSPACE, definition)
            self.definitions[pipeline_id] = definition
            self.concurrency[pipeline_id] = definition.get("concurrency", {})
            self.versions[(pipeline_id, saved.version)] = {n["id"] for n in definition["nodes"]}
        self.log(f"workspace limit {world.workspace_limit}; pipelines {world.definitions}")
        first = self.engine.trigger_run(WORKSPACE, "p")  # something to work on from the first step
        self.sync_runs()
        self.log(f"trigger p: {self.run_label(first.id)}")

    def pipeline(self, pick: int) -> str:
        names = list(self.definitions)
        return names[pick % len(names)]

    def run_id(self, pick: int, statuses: tuple[str, ...] | None = None) -> uuid.UUID | None:
        rows = self.query("SELECT id, status FROM runs ORDER BY created_at, pipeline_id, id")
        chosen = [r["id"] for r in rows if statuses is None or r["status"] in statuses] or [r["id"] for r in rows]
        return chosen[pick % len(chosen)] if chosen else None

    # -- rules: starting work ---------------------------------------------------------------------

    def _trigger(self, pick: int, key: str | None, versions: list[str] | None, now: bool, width: int | None) -> None:
        """A run, with the pipeline's params or (width) a list of that many items of its own."""
        pipeline_id = self.pipeline(pick)
        earlier = None if key is None else self.idempotent.get((pipeline_id, key))
        params = {} if width is None else {"items": items_list(width, "t")}
        try:
            result = self.engine.trigger_run(WORKSPACE, pipeline_id, versions=versions, params=params,
                                             idempotency_key=key, dispatch_now=now)
        except InvalidInput as exc:
            # The key was first sent with other versions or params: refused as another request
            self.log(f"trigger {pipeline_id} versions={versions} width={width} key={key}: refused ({exc.message})")
            assert earlier is not None and earlier[1:] != (versions, params), f"refused: {exc.message}"
            return
        self.sync_runs()
        self.log(f"trigger {pipeline_id} versions={versions} width={width} key={key} dispatch_now={now}: "
                 f"{self.run_label(result.id)} created={result.created}")
        if earlier is None:
            assert result.created, result
            if key is not None:
                self.idempotent[(pipeline_id, key)] = (result.id, versions, params)
        else:  # within the key's time to live (the clock never moves a day here)
            assert (result.id, result.created) == (earlier[0], False), result

    _trigger_args: dict[str, st.SearchStrategy[Any]] = {"pick": PICK, "key": st.sampled_from([None, None, "k1", "k2"]),
                     "versions": st.sampled_from([None, None, ["v1"], ["v2"], ["v1", "v2"]]), "now": st.booleans(),
                     "width": st.sampled_from([None, None, 0, 1, 3, MAX_ITEMS])}
    # Rules are picked uniformly: the common moves are listed twice.
    trigger = rule(**_trigger_args)(named("trigger", _trigger))  # type: ignore[call-overload]
    trigger_another = rule(**_trigger_args)(named("trigger_another", _trigger))  # type: ignore[call-overload]

    @precondition(lambda self: "b" in self.definitions)
    @rule(key=st.sampled_from([None, "o1"]), now=st.booleans())
    @step
    def trigger_orchestration(self, key: str | None, now: bool) -> None:
        result = self.engine.trigger_orchestration(WORKSPACE, root="b", include="upstream", idempotency_key=key,
                                                   dispatch_now=now)
        self.sync_runs()
        self.log(f"orchestration a -> b key={key} dispatch_now={now}: created={result.created}, runs "
                 + ", ".join(f"{self.run_label(r['id'])}={r['status']}" for r in result.runs))
        if key is not None:
            assert self.orchestrations.setdefault(key, result.id) == result.id
        assert sorted(r["pipeline_id"] for r in result.runs) == ["a", "b"]

    def _tick(self) -> None:
        summary = self.engine.tick()
        self.sync_runs()
        self.log(f"tick: {summary.to_dict()}")

    tick = rule()(named("tick", _tick))
    tick_again = rule()(named("tick_again", _tick))

    @rule(pick=PICK, whole=st.booleans())
    @step
    def dispatch_ready(self, pick: int, whole: bool) -> None:
        run_id = None if whole else self.run_id(pick, ("running",))
        summary = self.engine.dispatch_ready(run_id)
        self.log(f"dispatch_ready {'all' if run_id is None else self.run_label(run_id)}: {summary}")

    @rule(limit=st.integers(1, 3))
    @step
    def claim_without_dispatch(self, limit: int) -> None:
        """A claim whose dispatch never happens (a tick that died after its commit)."""
        with self.engine.db.transaction() as conn:
            rows = task_store.claim_ready_tasks(conn, limit)
        self.log(f"claim {limit} without dispatch: {[self.deliveries[(r['id'], int(r['attempt']))].label for r in rows]}")

    @rule(steps=st.integers(1, 4))
    @step
    def transport_down(self, steps: int) -> None:
        self.down_steps = steps
        self.log(f"every dispatch of the next {steps} steps fails")

    # -- rules: workers ---------------------------------------------------------------------------

    def _worker_callback(self, pick: int, outcome: str, items: int | str) -> None:
        current = [d for d in self.current_deliveries() if self.can_call_back(d, outcome)]
        if not current:
            return
        delivery = current[pick % len(current)]
        fence = self.fence(delivery.task_id)
        result = self.callback(delivery, outcome, items=items)
        mapped_over = f" (items {items})" if outcome == "succeeded" and fence["map_targets"] else ""
        self.log(f"callback {outcome} of {delivery.label}{mapped_over}: {result.outcome} (run {result.run_status})")
        assert result.accepted, f"the current attempt's callback was refused: {result}"
        if outcome == "succeeded":
            assert result.outcome == "succeeded", result
        elif outcome == "retryable" and delivery.attempt < fence["max_attempts"]:
            assert result.outcome == "retrying", (result, dict(fence))
        else:
            # a worker's failure for good is dead-lettered
            assert result.outcome == "failed" and result.dead_lettered, (result, dict(fence))
        delivery.outcome = outcome
        self.sync_runs()

    _callback_args: dict[str, st.SearchStrategy[Any]] = {
        "pick": PICK, "outcome": st.sampled_from(["succeeded", "succeeded", "retryable", "final"]), "items": ITEM_SHAPES}
    worker_callback = rule(**_callback_args)(named("worker_callback", _worker_callback))  # type: ignore[call-overload]
    another_worker_callback = rule(**_callback_args)(named("another_worker_callback", _worker_callback))  # type: ignore[call-overload]

    @rule(pick=PICK)
    @step
    def heartbeat(self, pick: int) -> None:
        current = self.current_deliveries()
        if not current:
            return
        delivery = current[pick % len(current)]
        status: str | None
        if delivery.token is not None:
            accepted, status, _ = self.engine.record_heartbeat(delivery.token, progress=0.5, message="working")
        else:
            with self.engine.db.transaction() as conn:
                row = task_store.mark_running(conn, delivery.task_id, delivery.attempt, delivery.claim_token, 0.5, None)
            accepted, status = row is not None, None if row is None else row["status"]
        self.log(f"heartbeat of {delivery.label}: {accepted} {status}")
        assert accepted and status == "running", (accepted, status)

    @rule(pick=PICK, outcome=st.sampled_from(["succeeded", "retryable", "final"]))
    @step
    def stale_callback(self, pick: int, outcome: str) -> None:
        """A callback of an attempt that is no longer the task's current one."""
        current = {(d.task_id, d.attempt) for d in self.current_deliveries()}
        stale = sorted((d for key, d in self.deliveries.items() if key not in current), key=lambda d: d.label)
        if not stale:
            return
        self.expect_refused(stale[pick % len(stale)], outcome, "stale")

    @rule(pick=PICK)
    @step
    def duplicate_callback(self, pick: int) -> None:
        """The same callback again, as a worker retrying after a lost answer."""
        sent = sorted((d for d in self.deliveries.values() if d.outcome is not None), key=lambda d: d.label)
        if not sent:
            return
        delivery = sent[pick % len(sent)]
        self.expect_refused(delivery, delivery.outcome or "succeeded", "duplicate")

    @rule(pick=PICK)
    @step
    def stale_heartbeat(self, pick: int) -> None:
        """A heartbeat of an attempt that is no longer current: refused, nothing changes."""
        current = {(d.task_id, d.attempt) for d in self.current_deliveries()}
        stale = sorted((d for key, d in self.deliveries.items() if key not in current and d.token is not None),
                       key=lambda d: d.label)
        if not stale:
            return
        delivery = stale[pick % len(stale)]
        before = self.snapshot()
        accepted, status, _ = self.engine.record_heartbeat(delivery.token or "", progress=0.9, message="late")
        self.log(f"stale heartbeat of {delivery.label}: {accepted} {status}")
        assert not accepted, f"a stale heartbeat of {delivery.label} was accepted ({status})"
        changed = sorted(t for t, h in self.snapshot().items() if before.get(t) != h)
        assert not changed, f"a refused heartbeat of {delivery.label} changed {changed}"

    @rule(pick=PICK, outcome=st.sampled_from(["succeeded", "final"]))
    @step
    def forged_callback(self, pick: int, outcome: str) -> None:
        """The current attempt's number with another claim token."""
        current = self.current_deliveries()
        if not current:
            return
        self.expect_refused(current[pick % len(current)], outcome, "forged", claim_token=uuid.uuid4())

    @rule(extra=st.sampled_from([1, 30]))
    @step
    def expire_leases(self, extra: int) -> None:
        """Every worker goes silent: the clock moves past every lease, and a tick expires them."""
        (row,) = self.query("SELECT EXTRACT(EPOCH FROM max(lease_expires_at) - tw_now()) AS s FROM tasks "
                            "WHERE status IN ('dispatched', 'running')")
        if row["s"] is None:
            return
        self.shift_clock(max(0.0, float(row["s"])) + extra)
        summary = self.engine.tick()
        self.sync_runs()
        self.log(f"leases expired (+{float(row['s']) + extra:.0f}s), tick: {summary.to_dict()}")

    @rule(seconds=st.sampled_from([3, 11, 31, 65, 310]))
    @step
    def advance_clock(self, seconds: int) -> None:
        self.shift_clock(seconds)
        self.log(f"clock +{seconds}s")

    # -- rules: operators -------------------------------------------------------------------------

    @rule(pick=PICK)
    @step
    def cancel(self, pick: int) -> None:
        run_id = self.run_id(pick, ("pending", "running"))
        if run_id is None:
            return
        try:
            self.engine.cancel_run(WORKSPACE, run_id, actor="test")
            self.log(f"cancel {self.run_label(run_id)}: cancelled")
        except Conflict as exc:
            self.log(f"cancel {self.run_label(run_id)}: refused ({exc.message})")
        self.sync_runs()

    @rule(pick=PICK)
    @step
    def redrive(self, pick: int) -> None:
        run_id = self.run_id(pick, ("failed",))
        if run_id is None:
            return
        try:
            count = self.engine.redrive_run(WORKSPACE, run_id)
            self.log(f"redrive {self.run_label(run_id)}: {count} tasks reset")
        except Conflict as exc:
            self.log(f"redrive {self.run_label(run_id)}: refused ({exc.message})")
        self.sync_runs()

    @rule(pick=PICK, retried=st.booleans())
    @step
    def retry_dead_letter(self, pick: int, retried: bool) -> None:
        listed = self.engine.list_dead_letters(WORKSPACE, include_retried=retried, limit=200)
        if not listed:
            return
        index = {r["id"]: int(r["map_index"]) for r in self.query(
            "SELECT id, map_index FROM tasks WHERE id = ANY(%s)", [e["task_id"] for e in listed])}
        entries = sorted(listed, key=lambda e: (self.run_label(e["run_id"]), e["node_id"], index[e["task_id"]],
                                                e["version"], e["created_at"]))
        entry = entries[pick % len(entries)]
        item = f"[{index[entry['task_id']]}]" if index[entry["task_id"]] >= 0 else ""
        what = f"dead letter of {self.run_label(entry['run_id'])}.{entry['node_id']}{item}@{entry['version']}"
        try:
            self.engine.retry_dead_letter(WORKSPACE, entry["id"])
            self.log(f"retry {what}: retried")
            assert entry["retried_at"] is None, f"{what} was retried twice"
        except Conflict as exc:
            self.log(f"retry {what}: refused ({exc.message})")
        self.sync_runs()

    @rule(pick=PICK, approve=st.sampled_from([True, True, False]), wrong_kind=st.booleans())
    @step
    def decide(self, pick: int, approve: bool, wrong_kind: bool) -> None:
        """Approve or reject an approval, complete a manual step; the wrong kind is refused."""
        waiting = self.query(
            """SELECT t.id, t.kind, t.node_id, t.version, t.run_id FROM tasks t JOIN runs r ON r.id = t.run_id
               WHERE t.status = 'waiting' ORDER BY r.created_at, r.pipeline_id, t.version, t.position""")
        if not waiting:
            return
        task = waiting[pick % len(waiting)]
        label = f"{self.run_label(task['run_id'])}.{task['node_id']}@{task['version']}"
        self.decide_refused_elsewhere(pick)
        if wrong_kind:
            other = "manual" if task["kind"] == "approval" else "approval"
            before = self.snapshot()
            with pytest.raises(Conflict):
                self.engine.decide(WORKSPACE, task["id"], kind=other, succeeded=True, actor="test")
            assert self.snapshot() == before, f"a refused decision on {label} changed the database"
            self.log(f"decide {label} as {other}: refused")
            return
        result = self.engine.decide(WORKSPACE, task["id"], kind=task["kind"], succeeded=approve, actor="test")
        self.log(f"decide {label} ({task['kind']}) {'yes' if approve else 'no'}: {result.outcome} "
                 f"(run {result.run_status})")
        assert result.accepted
        self.sync_runs()

    def decide_refused_elsewhere(self, pick: int) -> None:
        """A decision on a human step that is not waiting (decided, skipped, cancelled, or still
        pending) is refused and changes nothing."""
        others = self.query(
            """SELECT t.id, t.kind, t.node_id, t.version, t.run_id, t.status FROM tasks t JOIN runs r ON r.id = t.run_id
               WHERE t.kind IN ('approval', 'manual') AND t.status <> 'waiting'
               ORDER BY r.created_at, r.pipeline_id, t.version, t.position""")
        if not others:
            return
        task = others[pick % len(others)]
        before = self.snapshot()
        with pytest.raises(Conflict):
            self.engine.decide(WORKSPACE, task["id"], kind=task["kind"], succeeded=True, actor="late")
        changed = sorted(t for t, h in self.snapshot().items() if before.get(t) != h)
        assert not changed, f"a refused decision on a {task['status']} {task['kind']} step changed {changed}"

    @rule(pick=PICK, nodes=st.data())
    @step
    def new_pipeline_version(self, pick: int, nodes: st.DataObject) -> None:
        """A new definition; runs in flight keep the version they pinned. Its concurrency limits
        stay (lowering a limit below what is out with workers is not what this machine tests)."""
        pipeline_id = self.pipeline(pick)
        definition = dict(self.definitions[pipeline_id])
        definition["nodes"] = nodes.draw(node_lists(5 if pipeline_id == "p" else 3, need_task=pipeline_id == "a"))
        if pipeline_id == "b":
            definition["depends"] = [{**definition["depends"][0],
                                      "trigger": nodes.draw(st.sampled_from(["on_success", "on_complete", "none"]))}]
        saved = self.engine.update_pipeline(WORKSPACE, pipeline_id, definition)
        self.definitions[pipeline_id] = definition
        self.versions[(pipeline_id, saved.version)] = {n["id"] for n in definition["nodes"]}
        self.log(f"update {pipeline_id}: version {saved.version} changed={saved.changed} nodes={definition['nodes']}")

    @rule(pick=PICK, paused=st.booleans())
    @step
    def pause(self, pick: int, paused: bool) -> None:
        pipeline_id = self.pipeline(pick)
        self.engine.set_paused(WORKSPACE, pipeline_id, paused)
        (self.paused.add if paused else self.paused.discard)(pipeline_id)
        self.log(f"{'pause' if paused else 'resume'} {pipeline_id}")

    # -- after every step -------------------------------------------------------------------------

    @invariant()
    @checked
    def books_are_clean(self) -> None:
        with self.engine.db.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            violations = check_books(conn)  # one snapshot, as find_violations reads it
        if violations:
            first = violations[0].check
            raise broken(first)("the books are broken:\n" + "\n".join(
                f"  [{v.check}] {self.run_label(uuid.UUID(v.run_id)) if v.run_id else ''} {v.message}"
                for v in violations))
        if self.claim_problems:
            raise broken("claimed_too_early")("claimed too early:\n" + "\n".join(self.claim_problems))
        if self.child_claim_problems:
            raise broken("map_child_claimed_too_early")("map nodes' children claimed too early:\n"
                                                        + "\n".join(self.child_claim_problems))

    @invariant()
    @checked
    def attempts_outputs_and_triggers_hold(self) -> None:
        """Beyond the checker: every attempt is recorded once and closed once; a succeeded task
        that produces pipeline outputs has them indexed, and only an accepted attempt's are; a run
        ending starts each dependant at most once (later triggers), after it ended."""
        attempts = self.query(
            """SELECT t.run_id, t.node_id, t.version, t.status, t.attempt,
                      COALESCE(max(a.attempt), 0) AS last_attempt,
                      count(a.attempt) FILTER (WHERE a.status IN ('dispatched', 'running')) AS open_attempts,
                      COALESCE(bool_or(a.attempt = t.attempt AND a.claim_token = t.claim_token
                                       AND a.status = t.status), false) AS current_open
               FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id
               WHERE t.kind <> 'map'  -- a map node's attempt counts its settles (maps_hold)
               GROUP BY t.id
               HAVING COALESCE(max(a.attempt), 0) <> t.attempt
                   OR count(a.attempt) FILTER (WHERE a.status IN ('dispatched', 'running'))
                      <> CASE WHEN t.status IN ('dispatched', 'running') THEN 1 ELSE 0 END
                   OR (t.status IN ('dispatched', 'running') AND NOT COALESCE(bool_or(
                          a.attempt = t.attempt AND a.claim_token = t.claim_token AND a.status = t.status), false))""")
        if attempts:
            raise broken("attempt_history")("the attempt history disagrees with the task:\n" + "\n".join(
                f"  {self.run_label(r['run_id'])}.{r['node_id']}@{r['version']} {r['status']} attempt {r['attempt']}: "
                f"last attempt row {r['last_attempt']}, {r['open_attempts']} open, current one open={r['current_open']}"
                for r in attempts))
        outputs = self.query(
            """SELECT t.run_id, t.node_id, t.version, t.status, n AS output, 'missing' AS problem
               FROM tasks t CROSS JOIN LATERAL unnest(t.output_names) AS n
               WHERE t.status = 'succeeded' AND NOT EXISTS (
                   SELECT 1 FROM pipeline_outputs o WHERE o.task_id = t.id AND o.version = t.version AND o.output = n)
               UNION ALL
               SELECT t.run_id, t.node_id, t.version, t.status, o.output, 'indexed for a task not succeeded'
               FROM pipeline_outputs o JOIN tasks t ON t.id = o.task_id WHERE t.status <> 'succeeded'""")
        if outputs:
            raise broken("pipeline_outputs")("pipeline outputs disagree with their tasks:\n" + "\n".join(
                f"  {self.run_label(r['run_id'])}.{r['node_id']}@{r['version']} ({r['status']}) output {r['output']}: "
                f"{r['problem']}" for r in outputs))
        triggered = self.query(
            """SELECT r.trigger_source_execution_id AS source, r.pipeline_id, count(*) AS runs,
                      min(s.status) AS source_status
               FROM runs r LEFT JOIN runs s ON s.id = r.trigger_source_execution_id
               WHERE r.trigger = 'pipeline'
               GROUP BY r.trigger_source_execution_id, r.pipeline_id
               HAVING count(*) > 1 OR r.trigger_source_execution_id IS NULL""")
        if triggered:
            raise broken("later_triggers")("later triggers fired more than once:\n" + "\n".join(
                f"  {self.run_label(r['source']) if r['source'] else 'no source'} -> {r['pipeline_id']}: "
                f"{r['runs']} runs (source {r['source_status']})" for r in triggered))

    @invariant()
    @checked
    def maps_hold(self) -> None:
        """Beyond the checker's map checks: a map node is never claimed; an expanded one has the
        items staged for it (what the worker wrote, or its params), each child its own; a settled
        one agrees with its children and its tolerated_failures (see the module docstring)."""
        claimed = self.query(
            """SELECT t.run_id, t.node_id, t.version, t.status, count(a.attempt) AS attempts,
                      t.claim_token IS NOT NULL AS token, t.lease_expires_at IS NOT NULL AS lease
               FROM tasks t LEFT JOIN task_attempts a ON a.task_id = t.id
               WHERE t.kind = 'map'
               GROUP BY t.id
               HAVING count(a.attempt) > 0 OR t.claim_token IS NOT NULL OR t.lease_expires_at IS NOT NULL""")
        if claimed:
            raise broken("map_node_claimed")("map nodes were claimed:\n" + "\n".join(
                f"  {self.run_label(r['run_id'])}.{r['node_id']}@{r['version']} {r['status']}: {r['attempts']} "
                f"attempts, claim token {r['token']}, lease {r['lease']}" for r in claimed))
        nodes = self.map_nodes()
        # A failure handler (one_failed, all_done) still runs after a stopping failure (an unmapped
        # one is not skipped): a mapped one runs its items, none skipped. (A run that failed as it
        # started, its upstream output missing, skips every task, handlers too: no task failed.)
        handlers = [n for n in nodes if n["trigger_rule"] in ("one_failed", "all_done") and n["skipped_only"]
                    and n["run_stopped"]]
        if handlers:
            raise broken("map_handler_children_skipped")("mapped failure handlers had items skipped:\n" + "\n".join(
                f"  {self.run_label(n['run_id'])}.{n['node_id']}@{n['version']} ({n['trigger_rule']}) {n['status']}: "
                f"{n['skipped_only']} of {n['map_width']} items skipped" for n in handlers))
        problems = [f"  {self.run_label(node['run_id'])}.{node['node_id']}@{node['version']} {node['status']} "
                    f"(width {node['map_width']}): {problem}"
                    for node in nodes for problem in self.map_node_problems(node)]
        if problems:
            raise broken("map_node_inconsistent")("map nodes disagree with their items or children:\n"
                                                  + "\n".join(problems))

    def map_nodes(self) -> list[Row]:
        """Every map node with its children's counts and what was staged for it."""
        return self.query(
            f"""SELECT p.id, p.run_id, p.node_id, p.version, p.status, p.map_width, p.map_spec, p.params, p.output,
                       p.error, m.parent_task_id IS NOT NULL AS staged, m.source_task_id, m.items, m.problem,
                       count(c.id) AS children,
                       count(c.id) FILTER (WHERE c.status = 'succeeded') AS succeeded,
                       count(c.id) FILTER (WHERE c.status = 'failed') AS failed,
                       count(c.id) FILTER (WHERE c.status IN ('skipped', 'cancelled')) AS skipped,
                       count(c.id) FILTER (WHERE c.status = 'skipped') AS skipped_only, p.trigger_rule,
                       EXISTS (SELECT 1 FROM tasks f WHERE f.run_id = p.run_id AND f.status = 'failed'
                                                       AND f.on_failure = 'stop') AS run_stopped,
                       count(c.id) FILTER (WHERE c.status NOT IN {TERMINAL_SQL}) AS open,
                       count(c.id) FILTER (WHERE c.map_item IS DISTINCT FROM m.items -> c.map_index) AS wrong_items,
                       count(c.id) FILTER (WHERE c.kind <> 'task' OR c.on_failure <> 'continue'
                                            OR c.trigger_rule <> 'all_success') AS odd_children
                FROM tasks p LEFT JOIN tasks c ON c.map_parent_id = p.id
                LEFT JOIN map_items m ON m.parent_task_id = p.id
                WHERE p.kind = 'map'
                GROUP BY p.id, m.parent_task_id
                ORDER BY p.created_at, p.node_id, p.version""")

    def map_node_problems(self, node: Row) -> list[str]:
        spec = node["map_spec"]
        status, width = node["status"], node["map_width"]
        problems: list[str] = []
        # What must have been staged: the list at the path in the params, or in the output the
        # worker of the source wrote (its accepted success; a source succeeds once per repair).
        if node["staged"]:
            if node["source_task_id"] is None:
                value: Any = node["params"]
            elif node["source_task_id"] in self.produced:
                value = self.produced[node["source_task_id"]]
            else:
                return [f"items staged from a task whose success the machine never sent: {node['source_task_id']}"]
            items, problem = mapping.extract_items(value, list(spec["path"]), str(spec["over"]))
            if (node["items"], node["problem"] is None) != (items, problem is None):
                problems.append(f"staged {node['items']!r} (problem {node['problem']!r}) from {value!r}: "
                                f"want {items!r} (problem {problem!r})")
        if width is not None:
            if not node["staged"] or node["items"] is None or len(node["items"]) != width:
                problems.append(f"expanded to {width} children, the staged list is {node['items']!r}")
            if node["children"] != width or node["wrong_items"] or node["odd_children"]:
                problems.append(f"{node['children']} children, {node['wrong_items']} without their own item, "
                                f"{node['odd_children']} not plain tasks with on_failure continue")
        elif node["children"]:
            problems.append(f"unexpanded with {node['children']} children")
        if status in ("succeeded", "failed") and width is not None:
            output = node["output"] if isinstance(node["output"], dict) else {}
            counts = {k: node[k] for k in ("succeeded", "failed", "skipped")}
            if output.get("count") != width or {k: output.get(k) for k in counts} != counts:
                problems.append(f"its output {output} does not count its children {counts} (width {width})")
            tolerated = MapSpec(over=spec["over"], tolerated_failures=spec["tolerated_failures"]).tolerated(width)
            want = ("skipped" if node["skipped"] else
                    "succeeded" if node["failed"] <= tolerated else "failed")
            if status != want:
                problems.append(f"{node['failed']} of {width} children failed, {node['skipped']} skipped, "
                                f"tolerated_failures {spec['tolerated_failures']!r} allows {tolerated}: want {want}")
        elif status == "skipped" and width is not None and not node["skipped"]:
            problems.append(f"skipped, yet none of its children was: {counts_of(node)}")
        elif status == "failed" and width is None:
            code = (node["error"] or {}).get("code")
            if code != "map_over_invalid" or node["problem"] is None:
                problems.append(f"failed unexpanded with {node['error']!r}; staged problem {node['problem']!r}")
        elif status == "succeeded" and width is None:
            problems.append("succeeded without being expanded")
        return problems

    # -- the end ----------------------------------------------------------------------------------

    def drive_to_quiescence(self) -> None:
        """Resume everything, approve every human step, move the clock past every delay, tick and
        let every worker succeed, until no run is pending or running (bounded)."""
        for pipeline_id in self.definitions:
            self.engine.set_paused(WORKSPACE, pipeline_id, False)
        self.paused.clear()
        self.transport.down = False
        self.down_steps = 0
        for round_ in range(60):
            self.shift_clock(400)
            # Within a round the clock stands still: approve, tick and answer every worker (those of
            # the tasks each callback claimed too) until nothing moves; a map's children under a
            # max_active_tasks of 1 go one per callback, many runs one per tick.
            answered: set[tuple[uuid.UUID, int]] = set()
            for _ in range(500):
                moved = False
                for task in self.query("SELECT id, kind FROM tasks WHERE status = 'waiting'"):
                    with contextlib.suppress(Conflict):  # decided meanwhile (another decision made it moot)
                        self.engine.decide(WORKSPACE, task["id"], kind=task["kind"], succeeded=True, actor="drain")
                        moved = True
                self.engine.tick()
                while pending := [d for d in self.current_deliveries()
                                  if (d.task_id, d.attempt) not in answered and self.can_call_back(d, "succeeded")]:
                    for delivery in pending:  # (one claimed by the test, never dispatched, lapses next round)
                        answered.add((delivery.task_id, delivery.attempt))
                        outcome, shape = drain_outcome(delivery)
                        result = self.callback(delivery, outcome, items=shape)
                        assert result.accepted, (
                            f"draining: the current attempt of {delivery.label} was refused: {result}")
                        moved = True
                if not moved:
                    break
            self.sync_runs()
            self.books_are_clean()
            open_runs = self.query("SELECT id, status FROM runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")
            if not open_runs:
                self.log(f"quiescent after {round_ + 1} rounds")
                self.maps_hold()
                self.settled_maps_counted()
                return
        stuck = self.query(
            """SELECT r.id AS run_id, r.status AS run_status, r.unfinished_tasks, r.blocked_upstreams,
                      t.node_id, t.version, t.status, t.available_at - tw_now() AS due_in
               FROM runs r LEFT JOIN tasks t ON t.run_id = r.id
               WHERE r.status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY r.created_at, t.position""")
        raise AssertionError("runs never finished:\n" + "\n".join(
            f"  {self.run_label(s['run_id'])} {s['run_status']} unfinished={s['unfinished_tasks']} "
            f"blocked={s['blocked_upstreams']}: {s['node_id']}@{s['version']} {s['status']} due in {s['due_in']}"
            for s in stuck))

    def settled_maps_counted(self) -> None:
        """At quiescence every map node is settled (succeeded, failed, skipped or cancelled), and
        every expanded one that succeeded or failed has its width in its output's count."""
        for node in self.map_nodes():
            label = f"{self.run_label(node['run_id'])}.{node['node_id']}@{node['version']}"
            assert node["status"] in TERMINAL, f"quiescent, yet {label} is {node['status']}"
            if node["status"] in ("succeeded", "failed") and node["map_width"] is not None:
                assert node["output"]["count"] == node["map_width"] == node["children"], (label, node["output"])
            event(f"map node {node['status']}"
                  + ("" if node["map_width"] is None else f" (width {'0' if node['map_width'] == 0 else '1+'})"))

    def teardown(self) -> None:
        try:
            if self.healthy and self.definitions:
                self.drive_to_quiescence()
        finally:
            LifecycleMachine.current = None
            self.engine.close()
            drop_database(self.ctx.admin_url, self.db_name)


def counts_of(node: Row) -> dict[str, int]:
    return {k: int(node[k]) for k in ("children", "succeeded", "failed", "skipped", "open")}


def claim_problem(kind: str, trigger_rule: str, run_status: str, ups: list[dict[str, Any]]) -> str | None:
    """Why a task must not have been claimed now, or None. (docs/reliability.md: a task is decided
    when its last dependency finishes; `all_success` needs no upstream skipped and counts only a
    tolerated failure as done, `none_failed` no upstream failed, `one_failed` one failed,
    `all_done` anything; after a stopping failure only `one_failed`/`all_done` handlers start.)"""
    if kind != "task":
        return f"it is a {kind} step (never dispatched)"
    if run_status not in ("running", "failed"):
        return f"its run is {run_status}"
    if run_status == "failed" and trigger_rule not in ("all_done", "one_failed"):
        return "its run had failed (only one_failed and all_done steps start after a stopping failure)"
    if not ups:
        return None  # a root: trigger rules apply to upstreams, and it has none
    open_ups = [u["node"] for u in ups if u["status"] not in TERMINAL]
    if open_ups:
        return f"upstreams {open_ups} had not finished"
    failed = [u for u in ups if u["status"] in FAILED]
    skipped = [u["node"] for u in ups if u["status"] in ("skipped", "cancelled")]
    if trigger_rule == "all_success":
        if skipped:
            return f"upstreams {skipped} were skipped or cancelled"
        stopping = [u["node"] for u in failed if u["on_failure"] == "stop"]
        if stopping:
            return f"upstreams {stopping} failed with on_failure: stop"
    elif trigger_rule == "none_failed" and failed:
        return f"upstreams {[u['node'] for u in failed]} failed"
    elif trigger_rule == "one_failed" and not failed:
        return "no upstream failed"
    return None


_BROKEN: dict[str, type[AssertionError]] = {}


def broken(check: str) -> type[AssertionError]:
    """An AssertionError subclass per broken invariant: Hypothesis tells failures apart by
    exception type and place, so each invariant gets its own minimal example instead of the
    first one found hiding the others."""
    if check not in _BROKEN:
        _BROKEN[check] = type(f"Broken_{check}", (AssertionError,), {})
    return _BROKEN[check]


# --- the test --------------------------------------------------------------------------------


@pytest.mark.timeout(0 if is_long() else 1200)
@pytest.mark.parametrize("joins", ["as_configured", "all_in_slots"])
def test_run_lifecycle_state_machine(pg_admin_url: str, template_db_url: str, moto_server: MotoServer,
                                     monkeypatch: pytest.MonkeyPatch, joins: str) -> None:
    if joins == "all_in_slots":
        # Every join of two upstreams or more counted through two slots (migration 0027): the
        # machine's small DAGs then take slots through every rule, repair and race it plays.
        monkeypatch.setattr(run_store, "JOIN_SLOTS_FROM", 2)
        monkeypatch.setattr(run_store, "JOIN_SLOT_SIZE", 1_000_000)
        # and every map of two items or more through two slots: maps drawn without
        # max_concurrency (a capped map's items are the engine's, counted on the map node's row;
        # the other case draws caps)
        monkeypatch.setattr(sys.modules[__name__], "MAP_CONCURRENCY_ENFORCED", False)
    slotted_joins = 0
    insert_edges = run_store.insert_edges

    def counted_edges(conn: Connection, run_id: uuid.UUID, edges: Any, **kwargs: Any) -> None:
        nonlocal slotted_joins
        insert_edges(conn, run_id, edges, **kwargs)
        slotted_joins += conn.execute("SELECT count(DISTINCT task_id) AS n FROM join_slots WHERE run_id = %s",
                                      (run_id,)).fetchone()["n"]

    monkeypatch.setattr(run_store, "insert_edges", counted_edges)
    # (the maps whose items are counted through slots)
    slotted_maps = 0
    insert_children = map_store.insert_children

    def counted_children(conn: Connection, parent_id: uuid.UUID, first: int, last: int, *, width: int) -> int:
        nonlocal slotted_maps
        inserted = insert_children(conn, parent_id, first, last, width=width)
        slotted_maps += conn.execute("SELECT count(*) > 0 AS n FROM join_slots WHERE task_id = %s",
                                     (parent_id,)).fetchone()["n"]
        return inserted

    monkeypatch.setattr(map_store, "insert_children", counted_children)
    bucket = f"lifecycle-{uuid.uuid4().hex[:10]}"
    ensure_bucket(Settings(database_url="", s3_endpoint_url=moto_server.endpoint_url, bucket=bucket))
    LifecycleMachine.ctx = Context(admin_url=pg_admin_url, moto=moto_server, bucket=bucket)

    original = task_store.claim_ready_tasks

    def observed_claim(conn: Connection, *args: Any, **kwargs: Any) -> list[Row]:
        rows = original(conn, *args, **kwargs)
        if LifecycleMachine.current is not None:
            LifecycleMachine.current.claimed(conn, rows)
        return rows

    monkeypatch.setattr(task_store, "claim_ready_tasks", observed_claim)
    run_state_machine_as_test(LifecycleMachine, settings=lifecycle_settings())
    if joins == "all_in_slots":
        assert slotted_joins > 0, "no run had a join counted through slots"
        assert slotted_maps > 0, "no map had its items counted through slots"
