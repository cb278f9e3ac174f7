"""The multi-pipeline layer: orchestrations, what follows a run's completion, later triggers.

- An **orchestration** is a set of runs created together in one transaction, in topological
  order of the pipelines' `depends`. A run with upstream runs in the set waits (`pending`,
  `blocked_upstreams` > 0); each upstream run that completes takes one off under the run's row
  lock, so the last of several upstreams completing at once releases it exactly once. A
  released run reads its upstream outputs from the orchestration's own runs.
- A run that ends calls `on_run_finished` in the same transaction: its orchestration's waiting
  runs are released (or fail, when they needed it to succeed), and dependants outside the
  orchestration are decided for a **later trigger**. The decision is taken under the
  dependant's pipeline row lock, so of two upstreams completing at once, the second sees the
  first's committed outputs and exactly one of them triggers the dependant.
- Later triggers are an outbox: the dependant's run is created by `process_pipeline_triggers`
  after the upstream's transaction commits (eagerly by the engine, the tick as the safety net),
  so a dependant that cannot start never rolls back the upstream's callback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.errors import Conflict, EngineError, InvalidInput, NotFound, TooLarge
from orchestrator.graph import topological_order
from orchestrator.model import PipelineDefinition
from orchestrator.store import orchestrations as orchestration_store
from orchestrator.store import outputs as output_store
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import runs as run_store

log = logging.getLogger(__name__)

INCLUDE_VALUES = ("none", "upstream", "downstream")
# An orchestration is created in one transaction; beyond this a request is refused (413).
MAX_ORCHESTRATION_PIPELINES = 1000


@dataclass(frozen=True)
class Orchestration:
    id: uuid.UUID
    created: bool
    runs: list[Row] = field(default_factory=list)


class _IdempotencyRace(Exception):
    pass


# --- planning ------------------------------------------------------------------------------


def pipeline_set(
    edges: Sequence[Row], known: set[str], *, root: str | None, include: str, listed: Sequence[str] | None
) -> set[str]:
    """The pipelines of an orchestration: the root with its upstream or downstream closure, or a list.

    Upstream closure follows every `depends` (a data-only `trigger: none` dependency still has
    to produce what is read); downstream closure follows only dependants that are triggered
    (`on_success`, `on_complete`).
    """
    if listed is not None:
        return set(listed)
    assert root is not None
    upstreams: dict[str, list[str]] = {}
    dependants: dict[str, list[str]] = {}
    for edge in edges:
        upstreams.setdefault(str(edge["pipeline_id"]), []).append(str(edge["upstream_pipeline_id"]))
        if edge["trigger"] != "none":
            dependants.setdefault(str(edge["upstream_pipeline_id"]), []).append(str(edge["pipeline_id"]))
    follow = upstreams if include == "upstream" else dependants
    found = {root}
    frontier = [root]
    while frontier:
        for nxt in follow.get(frontier.pop(), []):
            if nxt in known and nxt not in found:
                found.add(nxt)
                frontier.append(nxt)
    return found


def trigger_orchestration(
    db: Database, settings: Settings, workspace_id: str, *, root: str | None, include: str,
    pipeline_ids: Sequence[str] | None, versions: list[str] | None, params: dict[str, Any], trigger: str,
    triggered_by: str | None, idempotency_key: str | None,
) -> Orchestration:
    """Create the runs of an orchestration (all of them, in one transaction)."""
    from orchestrator.engine.runs import check_same_request, check_versions, create_run, request_fingerprint

    check_versions(versions)
    fingerprint = None if idempotency_key is None else request_fingerprint({
        "root": root, "include": include if pipeline_ids is None else "list",
        "pipelines": None if pipeline_ids is None else list(pipeline_ids), "versions": versions, "params": params,
    })
    if pipeline_ids is not None:
        if not pipeline_ids:
            raise InvalidInput("pipelines must list at least one pipeline id")
        if len(set(pipeline_ids)) != len(pipeline_ids):
            raise InvalidInput("pipelines lists a pipeline more than once")
    mode = "list" if pipeline_ids is not None else include

    def work(conn: Connection) -> Orchestration:
        if idempotency_key is not None:
            orchestration_store.release_expired_orchestration_key(
                conn, workspace_id, idempotency_key, settings.idempotency_ttl_s
            )
            earlier = orchestration_store.find_orchestration_by_key(conn, workspace_id, idempotency_key)
            if earlier is not None:
                check_same_request(earlier, fingerprint, idempotency_key, "orchestration")
                return Orchestration(earlier["id"], False, orchestration_store.runs_of_orchestration(conn, earlier["id"]))
        pipelines, edges = orchestration_store.workspace_graph(conn, workspace_id)
        known = {str(p["id"]) for p in pipelines}
        wanted = list(pipeline_ids) if pipeline_ids is not None else [str(root)]
        missing = [p for p in wanted if p not in known]
        if missing:
            raise NotFound(
                f"pipeline{'s' if len(missing) > 1 else ''} not found: {', '.join(repr(p) for p in missing)}",
                details={"pipelines": missing},
            )
        members = pipeline_set(edges, known, root=root, include=include, listed=pipeline_ids)
        if len(members) > MAX_ORCHESTRATION_PIPELINES:
            raise TooLarge(
                f"the orchestration would have {len(members)} pipelines; the limit is {MAX_ORCHESTRATION_PIPELINES}"
            )
        inner: dict[str, list[tuple[str, str]]] = {p: [] for p in members}
        for edge in edges:
            down, up = str(edge["pipeline_id"]), str(edge["upstream_pipeline_id"])
            if down in members and up in members:
                inner[down].append((up, str(edge["trigger"])))
        try:
            order = topological_order({p: [u for u, _ in ups] for p, ups in inner.items()})
        except ValueError as exc:  # the saved graph is kept acyclic; this guards the invariant
            raise Conflict(f"the pipelines cannot be ordered: {exc}") from exc
        orchestration_id = uuid.uuid4()
        if not orchestration_store.insert_orchestration(
            conn, orchestration_id=orchestration_id, workspace_id=workspace_id, root_pipeline_id=root,
            include=mode, pipelines=order, versions=versions, params=params, idempotency_key=idempotency_key,
            triggered_by=triggered_by, request_sha256=fingerprint,
        ):
            raise _IdempotencyRace()
        run_ids: dict[str, uuid.UUID] = {}
        run_versions: dict[str, list[str]] = {}
        run_edges: list[tuple[uuid.UUID, uuid.UUID, str, str]] = []
        for pipeline_id in order:
            current = pipeline_store.get_current(conn, workspace_id, pipeline_id)
            if current is None:  # not deletable today; a guard, not a path
                raise NotFound(f"pipeline '{pipeline_id}' not found")
            ups = inner[pipeline_id]
            if versions is not None:
                these: list[str] | None = versions
            elif ups:
                # Versions propagate: a downstream run takes its upstream runs' versions.
                these = list(dict.fromkeys(v for up, _ in ups for v in run_versions[up]))
            else:
                these = None
            run_id = create_run(
                conn, settings, workspace_id, current, versions=these, params=params, trigger=trigger,
                triggered_by=triggered_by, orchestration_id=orchestration_id, blocked_upstreams=len(ups),
            )
            assert run_id is not None  # no idempotency key or slot on an orchestration's runs
            run_ids[pipeline_id] = run_id
            run_versions[pipeline_id] = these or list(PipelineDefinition.model_validate(current["definition"]).versions)
            run_edges.extend((run_id, run_ids[up], up, trig) for up, trig in ups)
        orchestration_store.insert_run_dependencies(conn, run_edges)
        # A root that could not start (a missing hydrated output) fails its dependants now.
        for run in orchestration_store.runs_of_orchestration(conn, orchestration_id):
            if run["status"] in ("failed", "cancelled"):
                on_run_finished(conn, run["id"])
        return Orchestration(orchestration_id, True, orchestration_store.runs_of_orchestration(conn, orchestration_id))

    try:
        return db.run_in_transaction(work)
    except _IdempotencyRace:
        assert idempotency_key is not None
        with db.connection() as conn:
            earlier = orchestration_store.find_orchestration_by_key(conn, workspace_id, idempotency_key)
            if earlier is None:
                raise Conflict("a concurrent request with the same Idempotency-Key failed; retry") from None
            check_same_request(earlier, fingerprint, idempotency_key, "orchestration")
            return Orchestration(earlier["id"], False, orchestration_store.runs_of_orchestration(conn, earlier["id"]))


def get_orchestration(db: Database, workspace_id: str, orchestration_id: uuid.UUID) -> tuple[Row, list[Row]]:
    with db.connection() as conn:
        row = orchestration_store.get_orchestration(conn, workspace_id, orchestration_id)
        if row is None:
            raise NotFound(f"orchestration '{orchestration_id}' not found")
        return row, orchestration_store.runs_of_orchestration(conn, orchestration_id)


# --- inputs --------------------------------------------------------------------------------


def required_outputs(definition: PipelineDefinition) -> list[tuple[str, str]]:
    """(upstream pipeline, output) pairs a pipeline's runs read."""
    return [(dep.pipeline, output) for dep in definition.depends for output in dep.outputs]


def resolve_inputs(
    conn: Connection, run: Row, definition: PipelineDefinition, local_runs: dict[str, uuid.UUID] | None = None
) -> str | None:
    """Record where each upstream output the run reads comes from; the reason it cannot start, or None."""
    needs = required_outputs(definition)
    if not needs:
        return None
    local = local_runs or {}
    found = output_store.resolve_run_inputs(conn, run, [(p, o, local.get(p)) for p, o in needs])
    have = {(str(r["upstream_pipeline_id"]), str(r["output"]), str(r["version"])) for r in found}
    missing = [
        (p, o, v) for v in run["versions"] for p, o in needs if (p, o, v) not in have
    ]
    if not missing:
        return None
    shown = "; ".join(f"pipeline '{p}' output '{o}' version '{v}'" for p, o, v in missing[:10])
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    return f"upstream output missing, no succeeded execution has it: {shown}{more}"


# --- what follows a run's end --------------------------------------------------------------


def on_run_finished(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """Everything that follows runs ending, in the transaction that ended them.

    Returns the runs it started (their ready tasks are the caller's to dispatch eagerly).
    """
    started: list[uuid.UUID] = []
    ended: list[uuid.UUID] = [run_id]
    while ended:
        current = ended.pop()
        run = run_store.run_outcome(conn, current)
        if run is None:
            continue
        status = str(run["status"])
        for released in orchestration_store.release_downstream_runs(conn, current, status == "succeeded"):
            if released["doomed"]:
                verb = "was cancelled" if status == "cancelled" else "did not succeed"
                if orchestration_store.fail_run_before_start(
                    conn, released["id"], "cancelled" if status == "cancelled" else "failed",
                    f"upstream run {current} of pipeline '{run['pipeline_id']}' {verb}",
                ):
                    ended.append(released["id"])
            elif released["blocked_upstreams"] == 0:
                outcome = _start_released(conn, released)
                if outcome is None:
                    ended.append(released["id"])
                else:
                    started.extend(outcome)
        if status in ("succeeded", "failed"):
            _decide_later_triggers(conn, run)
    return started


def _start_released(conn: Connection, released: Row) -> list[uuid.UUID] | None:
    """Resolve a released run's inputs and start it (queued behind max_active_runs if need be).

    None when it cannot start: it failed, and its own dependants follow.
    """
    from orchestrator.engine.runs import start_queued_runs

    run = run_store.run_outcome(conn, released["id"])
    assert run is not None
    version = pipeline_store.get_version(conn, run["workspace_id"], run["pipeline_id"], int(run["pipeline_version"]))
    assert version is not None
    definition = PipelineDefinition.model_validate(version["definition"])
    local = {str(r["upstream_pipeline_id"]): r["upstream_run_id"]
             for r in orchestration_store.orchestration_upstream_runs(conn, run["id"])}
    problem = resolve_inputs(conn, run, definition, local)
    if problem is not None:
        orchestration_store.fail_run_before_start(conn, run["id"], "failed", problem)
        return None
    return start_queued_runs(conn, str(run["workspace_id"]), str(run["pipeline_id"]))


def _decide_later_triggers(conn: Connection, run: Row) -> None:
    """Queue runs of the dependants outside the run's orchestration whose inputs are all there."""
    succeeded = run["status"] == "succeeded"
    workspace_id = str(run["workspace_id"])
    triggers = tuple(orchestration_store.claim_later_triggers(conn, run["id"], succeeded))
    if not triggers:
        return
    dependants = [str(r["pipeline_id"]) for r in orchestration_store.dependants_of(conn, workspace_id, run["pipeline_id"], triggers)]
    if not dependants:
        return
    members: set[str] = set()
    if run["orchestration_id"] is not None:
        orchestration = orchestration_store.get_orchestration(conn, workspace_id, run["orchestration_id"])
        members = set(orchestration["pipelines"]) if orchestration else set()
    versions = list(run["versions"])
    for dependant in dependants:  # id order: concurrent deciders lock pipelines in one order
        if dependant in members:
            continue
        pipeline_store.lock_pipeline(conn, workspace_id, dependant)
        needs = [(str(d["upstream_pipeline_id"]), str(o))
                 for d in orchestration_store.dependencies_of(conn, workspace_id, dependant) for o in d["outputs"]]
        available = output_store.available_outputs(conn, workspace_id, needs, versions)
        absent = [(p, o, v) for v in versions for p, o in needs if (p, o, v) not in available]
        if absent:
            log.info(
                "run %s of %s does not trigger %s: upstream outputs not yet persisted: %s",
                run["id"], run["pipeline_id"], dependant, absent[:5],
            )
            continue
        orchestration_store.add_pipeline_trigger(conn, workspace_id, dependant, run["id"], str(run["pipeline_id"]), versions)


def process_pipeline_triggers(db: Database, settings: Settings, limit: int) -> list[uuid.UUID]:
    """Create the runs of pending later triggers (each in its own transaction); their ids."""
    from orchestrator.engine.runs import create_run

    created: list[uuid.UUID] = []
    for _ in range(limit):
        def work(conn: Connection) -> tuple[bool, uuid.UUID | None]:
            taken = orchestration_store.take_pipeline_trigger(conn)
            if taken is None:
                return False, None
            current = pipeline_store.get_current(conn, taken["workspace_id"], taken["pipeline_id"])
            if current is None or current["paused"]:
                return True, None
            try:
                with conn.transaction():  # a savepoint: a refusal still consumes the trigger
                    run_id = create_run(
                        conn, settings, str(taken["workspace_id"]), current, versions=list(taken["versions"]),
                        params={}, trigger="pipeline", triggered_by=None,
                        trigger_source_execution_id=taken["source_run_id"],
                        trigger_source_pipeline_id=str(taken["source_pipeline_id"]),
                    )
            except EngineError as exc:
                log.warning(
                    "later trigger of %s by run %s refused: %s", taken["pipeline_id"], taken["source_run_id"], exc
                )
                return True, None
            return True, run_id

        more, run_id = db.run_in_transaction(work)
        if not more:
            break
        if run_id is not None:
            created.append(run_id)
    return created


def lineage(conn: Connection, run_id: uuid.UUID) -> dict[str, Any]:
    """The upstream executions whose outputs a run consumed, and the runs it started."""
    return {
        "upstream": output_store.run_inputs(conn, run_id),
        "downstream": orchestration_store.downstream_runs(conn, run_id),
    }

