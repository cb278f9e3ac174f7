"""Run creation (a task per node and data version, with dependency counts) and run reads."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Database, Row
from orchestrator.engine.completion import resolve_ready_maps
from orchestrator.engine.errors import Conflict, IdempotencyKeyReused, InvalidInput, NotFound, TooLarge
from orchestrator.logs import log_event
from orchestrator.model import PipelineDefinition
from orchestrator.model.pipeline import MAX_TASKS_PER_RUN as MAX_TASKS_PER_RUN  # the limit callers name here
from orchestrator.model.versions import MAX_VERSIONS, version_list_problems
from orchestrator.store import maps as map_store
from orchestrator.store import pipelines as pipeline_store
from orchestrator.store import runs as run_store
from orchestrator.store import tasks as task_store

log = logging.getLogger(__name__)

MAX_VERSIONS_PER_RUN = MAX_VERSIONS


@dataclass(frozen=True)
class TriggeredRun:
    id: uuid.UUID
    created: bool  # False when an Idempotency-Key matched an earlier run


def build_tasks(
    definition: PipelineDefinition, versions: list[str], run_params: dict[str, Any], settings: Settings
) -> tuple[list[run_store.NewTask], list[tuple[uuid.UUID, uuid.UUID]]]:
    """Tasks for every (node, version) and the edges between tasks of the same version.

    A node's params are the pipeline's params, overridden by the node's, overridden by the
    trigger's: the person starting a run has the last word, as with a command-line flag.
    """
    tasks: list[run_store.NewTask] = []
    edges: list[tuple[uuid.UUID, uuid.UUID]] = []
    produces: dict[str, list[str]] = {}
    for name, output in definition.outputs.items():
        produces.setdefault(output.from_, []).append(name)
    for version in versions:
        ids = {node.id: uuid.uuid4() for node in definition.nodes}
        # The map nodes that map over each node's output, and the path each reads (its items are
        # read when that node succeeds: orchestrator.engine.mapping).
        map_targets: dict[str, list[dict[str, Any]]] = {}
        for node in definition.nodes:
            if node.map is not None:
                source, path = node.map.source()
                if source != "params":
                    map_targets.setdefault(source, []).append(
                        {"parent": str(ids[node.id]), "node": node.id, "over": node.map.over, "path": path}
                    )
        for position, node in enumerate(definition.nodes):
            # A human step's timeout is its wait for a decision (approval.timeout_s for approvals).
            timeout_s = node.timeout_s
            on_timeout = None
            if node.kind == "approval":
                approval = node.approval
                timeout_s = approval.timeout_s if approval else None
                on_timeout = approval.on_timeout if approval else "reject"
            elif node.kind == "manual":
                on_timeout = "reject"
            tasks.append(
                run_store.NewTask(
                    id=ids[node.id], node_id=node.id, version=version, position=position,
                    kind="map" if node.map is not None else node.kind,
                    task_name=node.task, params={**definition.params, **node.params, **run_params},
                    transport=settings.transport_for(node.task or ""), priority=node.priority,
                    max_attempts=node.retry.max_attempts, retry=node.retry.model_dump(mode="json"),
                    timeout_s=timeout_s, heartbeat_s=node.heartbeat_s, on_failure=node.on_failure,
                    trigger_rule=node.trigger_rule, unfinished_deps=len(node.depends), on_timeout=on_timeout,
                    output_names=produces.get(node.id),
                    map_spec=None if node.map is None else node.map.normalized(),
                    map_max_concurrency=None if node.map is None else node.map.max_concurrency,
                    map_targets=map_targets.get(node.id),
                )
            )
            edges.extend((ids[dep], ids[node.id]) for dep in node.depends)
    return tasks, edges


def check_versions(versions: Sequence[object] | None, path: str = "versions") -> None:
    """Refuse a caller's list of version names (None: the pipeline's own versions) with every
    problem and its path, e.g. `versions[1]: '..' is not a valid version name: ...`.

    The one rule for data-version names (orchestrator.model.versions), also applied to the
    `versions` of pipeline definitions; every entry point calls this before writing anything.
    """
    if versions is None:
        return
    problems = version_list_problems(versions, path)
    if problems:
        # Bounded: a list of 1000 bad names must not make a megabyte of error.
        shown = "; ".join(f"{where}: {message}" for where, message in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InvalidInput(
            shown + more, details=[{"path": where, "message": message} for where, message in problems[:100]]
        )


def request_fingerprint(request: dict[str, Any]) -> str:
    """sha256 of a request's canonical JSON (sorted keys, no spaces): what an Idempotency-Key
    is bound to. Built from the validated request, so `{}` and `{"params": {}}` are the same."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_same_request(earlier: Row, fingerprint: str | None, key: str, what: str) -> None:
    """Refuse (422) an Idempotency-Key sent again with another request than the one it created
    `what` for. A row from before fingerprints were kept (none stored) is taken as a match."""
    stored = earlier.get("request_sha256")
    if stored is None or fingerprint is None or stored == fingerprint:
        return
    raise IdempotencyKeyReused(
        f"the Idempotency-Key {key!r} was already used for {what} {earlier['id']} with a different request "
        "body; send the same body to get that result again, or use a new key for a new request",
        details={"idempotency_key": key, "id": earlier["id"]},
    )


def trigger_run(
    db: Database, settings: Settings, workspace_id: str, pipeline_id: str, *,
    versions: list[str] | None, params: dict[str, Any], trigger: str, triggered_by: str | None,
    idempotency_key: str | None, scheduled_at: datetime | None = None,
) -> TriggeredRun:
    check_versions(versions)
    fingerprint = (
        None if idempotency_key is None else request_fingerprint({"versions": versions, "params": params})
    )

    def work(conn: Connection) -> TriggeredRun:
        current = pipeline_store.get_current(conn, workspace_id, pipeline_id)
        if current is None:
            raise NotFound(f"pipeline '{pipeline_id}' not found")
        if idempotency_key is not None:
            run_store.release_expired_idempotency_key(
                conn, workspace_id, pipeline_id, idempotency_key, settings.idempotency_ttl_s
            )
            earlier = run_store.find_by_idempotency_key(conn, workspace_id, pipeline_id, idempotency_key)
            if earlier is not None:
                check_same_request(earlier, fingerprint, idempotency_key, "run")
                return TriggeredRun(earlier["id"], created=False)
        run_id = create_run(
            conn, settings, workspace_id, current, versions=versions, params=params, trigger=trigger,
            triggered_by=triggered_by, idempotency_key=idempotency_key, scheduled_at=scheduled_at,
            request_sha256=fingerprint,
        )
        if run_id is None:
            # The same key committed by a concurrent request between our check and insert.
            raise _IdempotencyRace()
        return TriggeredRun(run_id, created=True)

    try:
        return db.run_in_transaction(work)
    except _IdempotencyRace:
        with db.connection() as conn:
            assert idempotency_key is not None
            earlier = run_store.find_by_idempotency_key(conn, workspace_id, pipeline_id, idempotency_key)
        if earlier is None:
            raise Conflict("a concurrent request with the same Idempotency-Key failed; retry") from None
        check_same_request(earlier, fingerprint, idempotency_key, "run")
        return TriggeredRun(earlier["id"], created=False)


class _IdempotencyRace(Exception):
    pass


def create_run(
    conn: Connection, settings: Settings, workspace_id: str, current: Row, *, versions: list[str] | None,
    params: dict[str, Any], trigger: str, triggered_by: str | None, idempotency_key: str | None = None,
    scheduled_at: datetime | None = None, schedule_id: uuid.UUID | None = None, queue_limit: int | None = None,
    orchestration_id: uuid.UUID | None = None, blocked_upstreams: int = 0,
    trigger_source_execution_id: uuid.UUID | None = None, trigger_source_pipeline_id: str | None = None,
    request_sha256: str | None = None,
) -> uuid.UUID | None:
    """Insert a run of the pipeline version in `current` with its tasks and edges.

    The run is queued (`pending`, roots held back) when `concurrency.max_active_runs` (or
    `queue_limit`, from overlap: buffer_one) is reached or older runs are already queued: FIFO.
    Counting happens under the pipeline row's lock, so racing triggers cannot both squeeze in.
    A run of an orchestration with `blocked_upstreams` waits (`pending`) for its upstream runs.
    A run that reads upstream pipeline outputs has them resolved (hydrated) now; when one is
    missing the run fails before any task starts, naming the pipeline, output and version.
    Returns None when the idempotency key or the schedule slot was taken.
    """
    from orchestrator.engine.orchestrations import resolve_inputs
    from orchestrator.store import orchestrations as orchestration_store

    pipeline_id = str(current["id"])
    definition = PipelineDefinition.model_validate(current["definition"])
    limits = [n for n in (definition.concurrency.max_active_runs, queue_limit) if n is not None]
    limit = min(limits) if limits else None
    status = "running"
    # The pipeline row is held until commit (FOR UPDATE to count its runs, else FOR KEY SHARE),
    # so a delete either sees this run among the active ones or commits first and refuses it.
    if limit is not None:
        locked = pipeline_store.lock_pipeline(conn, workspace_id, pipeline_id)
        live = locked is not None and locked["deleted_at"] is None
    else:
        live = pipeline_store.hold_live(conn, workspace_id, pipeline_id)
    if not live:
        raise NotFound(f"pipeline '{pipeline_id}' not found (it was deleted)")
    if limit is not None:
        open_runs = run_store.open_runs(conn, workspace_id, pipeline_id)
        running = sum(1 for r in open_runs if r["status"] == "running")
        if running >= limit or any(r["status"] == "pending" and not r["blocked_upstreams"] for r in open_runs):
            status = "pending"
    if blocked_upstreams:
        status = "pending"
    run_versions = versions or list(definition.versions)
    if len(run_versions) * len(definition.nodes) > MAX_TASKS_PER_RUN:
        raise TooLarge(
            f"{len(run_versions)} versions x {len(definition.nodes)} nodes is over the limit of "
            f"{MAX_TASKS_PER_RUN} tasks per run; trigger fewer versions per run"
        )
    tasks, edges = build_tasks(definition, run_versions, params, settings)
    new_run = run_store.NewRun(
        id=uuid.uuid4(), workspace_id=workspace_id, pipeline_id=pipeline_id,
        pipeline_version=int(current["version"]), trigger=trigger, triggered_by=triggered_by,
        idempotency_key=idempotency_key, params=params, versions=run_versions, scheduled_at=scheduled_at,
        schedule_id=schedule_id, status=status, max_active_runs=limit, orchestration_id=orchestration_id,
        blocked_upstreams=blocked_upstreams, trigger_source_execution_id=trigger_source_execution_id,
        trigger_source_pipeline_id=trigger_source_pipeline_id, request_sha256=request_sha256,
    )
    if run_store.insert_run(conn, new_run, len(tasks)) is None:
        return None
    run_store.insert_tasks(conn, new_run, tasks)
    run_store.insert_edges(conn, new_run.id, edges, map_nodes={t.id for t in tasks if t.kind == "map"})
    if status == "running" and any(t.kind == "map" and t.unfinished_deps == 0 for t in tasks):
        # A map over params at the root: expanded as the run starts.
        resolve_ready_maps(conn, map_store.ready_map_nodes_of_run(conn, new_run.id))
    log_event(log, "run.created", workspace_id=workspace_id, pipeline_id=pipeline_id, run_id=new_run.id,
              trigger=trigger, status=status, tasks=len(tasks), scheduled_at=scheduled_at)
    if not blocked_upstreams and definition.depends:
        problem = resolve_inputs(
            conn, {"id": new_run.id, "workspace_id": workspace_id, "versions": run_versions}, definition
        )
        if problem is not None:
            orchestration_store.fail_run_before_start(conn, new_run.id, "failed", problem)
    return new_run.id


def start_queued_runs(conn: Connection, workspace_id: str, pipeline_id: str) -> list[uuid.UUID]:
    """Start queued runs of a pipeline, oldest first, while their limit allows."""
    pipeline_store.lock_pipeline(conn, workspace_id, pipeline_id)
    open_runs = run_store.open_runs(conn, workspace_id, pipeline_id)
    running = sum(1 for r in open_runs if r["status"] == "running")
    started: list[uuid.UUID] = []
    for run in open_runs:
        if run["status"] != "pending" or run["blocked_upstreams"]:
            continue  # running, or waiting for its orchestration's upstream runs (not queued)
        if run["max_active_runs"] is not None and running >= run["max_active_runs"]:
            break  # FIFO: a later run does not overtake the head of the queue
        if run_store.start_queued_run(conn, run["id"]):
            resolve_ready_maps(conn, map_store.ready_map_nodes_of_run(conn, run["id"]))
            started.append(run["id"])
            running += 1
    return started


def get_run(db: Database, workspace_id: str, run_id: uuid.UUID) -> tuple[Row, list[Row]]:
    """A run with its lineage (upstream outputs read, runs it started) and persisted outputs, and
    every task (map items included, each after its map node)."""
    from orchestrator.engine.orchestrations import lineage
    from orchestrator.store import outputs as output_store

    with db.connection() as conn:
        run = run_store.get_run(conn, workspace_id, run_id)
        if run is None:
            raise NotFound(f"run '{run_id}' not found")
        run["lineage"] = lineage(conn, run_id)
        run["outputs"] = output_store.outputs_of_run(conn, run_id)
        return run, task_store.list_tasks_of_run(conn, workspace_id, run_id)


def list_runs(
    db: Database, workspace_id: str, *, pipeline_id: str | None, status: str | None, limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    with db.connection() as conn:
        return run_store.list_runs(
            conn, workspace_id, pipeline_id=pipeline_id, status=status, limit=limit, before=before
        )


def get_task(db: Database, workspace_id: str, task_id: uuid.UUID) -> tuple[Row, list[Row]]:
    """A task with its attempts, its node-level upstreams (`depends`, the first MAX_DEPENDS, and
    `depends_count`) and, for a map node, `map`: its spec, width and items by status."""
    with db.connection() as conn:
        task = task_store.get_task(conn, workspace_id, task_id)
        if task is None:
            raise NotFound(f"task '{task_id}' not found")
        upstream = task_store.upstream_nodes(conn, task["run_id"], [task]).get(task["id"], [])
        task["depends"], task["depends_count"] = upstream[:MAX_DEPENDS], len(upstream)
        if task["kind"] == "map":
            items = {str(r["status"]): int(r["n"]) for r in task_store.map_item_counts(conn, [task_id])}
            task["map"] = map_view(task.get("map_spec"), task.get("map_width"), items)
        return task, task_store.list_attempts(conn, [task_id])


# --- bounded reads (issue 17): what the API answers about a run, whatever its size ----------
#
# Map nodes (issue 19). A mapped node is one task per data version (kind 'map'), and, once
# expanded, one task per item (a map item: `map_parent_id`, `map_index`, `map_item`):
# - `counts` and `task_count` count every task of the run, map items included (each map node
#   once, and each of its items); `item_count` and `map_items` count the items alone, so
#   `counts` minus `map_items` is the run by node and version. `node_count` counts nodes.
# - A node entry (`nodes`) is one per node, a mapped one too: `tasks` and `counts` are its
#   tasks (one per version; for a mapped node, its map nodes), `status` sums them up, and a
#   mapped node has `map`: its spec, `width` (its items, null until expanded) and `items` (its
#   items by status).
# - An expanded map node waiting for its items is shown `running` (stored: pending); a status
#   filter matches the shown status.
# - A task's `depends` are its node-level upstreams: a map node's never list its items; an item
#   has none of its own (its inputs are its map node's, which `map_parent_id` names).
# - A page of tasks is in (node, version, map_index) order: a map node, then its items in index
#   order; `items=False` leaves items out.

FIRST_TASK_PAGE = 100  # tasks in a run answer
MAX_TASK_PAGE = 200
FIRST_NODE_PAGE = 100  # nodes (with their counts) in a run answer
MAX_NODE_PAGE = 500
ATTEMPTS_PER_TASK = 10  # with include_attempts: the last ones of each task of a page
MAX_LINKED = 500  # outputs, and upstream and downstream lineage entries, in a run answer
MAX_DEPENDS = 50  # upstream node ids listed with a task (`depends_count` has the number)
_AFTER_EVERY_ITEM = 2**31 - 1  # a map_index past every item
# A node's status in a node entry: the first of these any of its tasks has.
NODE_STATUS_ORDER = ("running", "dispatched", "ready", "waiting", "pending", "failed", "cancelled",
                     "skipped", "succeeded")


@dataclass(frozen=True)
class TaskPage:
    items: list[Row]
    next_after: tuple[str, str, int] | None  # (node_id, version, map_index) of the last task, when more follow


@dataclass(frozen=True)
class NodePage:
    items: list[dict[str, Any]]
    next_after: int | None  # the position of the last node, when more follow


def map_view(spec: Any, width: int | None, items: dict[str, int]) -> dict[str, Any]:
    """A mapped node or map node as answers show it: what it maps over, its limits, its width
    (null until expanded) and its items by status."""
    spec = spec if isinstance(spec, dict) else {}
    return {"over": spec.get("over"), "width": width, "max_concurrency": spec.get("max_concurrency"),
            "tolerated_failures": spec.get("tolerated_failures", 0), "items": items}


def node_status(counts: dict[str, int]) -> str | None:
    """A node's status from its tasks by status (NODE_STATUS_ORDER)."""
    present = [s for s, n in counts.items() if n]
    for status in NODE_STATUS_ORDER:
        if status in present:
            return status
    return present[0] if present else None


def run_summary(
    db: Database, workspace_id: str, run_id: uuid.UUID, *, tasks_limit: int = FIRST_TASK_PAGE,
    include_attempts: bool = False, items: bool = True,
) -> Row:
    """A run as the API shows it, bounded whatever the number of its tasks: lineage and outputs
    (at most MAX_LINKED of each, with a `*_truncated` flag), its tasks counted by status
    (`counts`, `task_count`; map items apart in `map_items`, `item_count`), its nodes
    (`node_count`, the first page with their counts: `nodes`, `nodes_next_after`) and the first
    page of its tasks (`tasks`, `tasks_next_after`; `items=False`: without map items)."""
    from orchestrator.engine.orchestrations import lineage
    from orchestrator.store import outputs as output_store

    with db.connection() as conn:
        run = run_store.get_run(conn, workspace_id, run_id)
        if run is None:
            raise NotFound(f"run '{run_id}' not found")
        links = lineage(conn, run_id)
        run["lineage"] = {
            "upstream": links["upstream"][:MAX_LINKED], "downstream": links["downstream"][:MAX_LINKED],
            "truncated": len(links["upstream"]) > MAX_LINKED or len(links["downstream"]) > MAX_LINKED,
        }
        outputs = output_store.outputs_of_run(conn, run_id)
        run["outputs"] = outputs[:MAX_LINKED]
        run["outputs_truncated"] = len(outputs) > MAX_LINKED
        counts: dict[str, int] = {}
        item_counts: dict[str, int] = {}
        by_map: dict[Any, dict[str, int]] = {}  # each map node's items by status
        for row in task_store.status_counts_of_run(conn, run_id):
            status, n = str(row["status"]), int(row["n"])
            counts[status] = counts.get(status, 0) + n
            if row["map_parent_id"] is not None:
                item_counts[status] = item_counts.get(status, 0) + n
                by_map.setdefault(row["map_parent_id"], {})[status] = n
        run["counts"] = counts
        run["task_count"] = sum(counts.values())
        run["map_items"] = item_counts
        run["item_count"] = sum(item_counts.values())
        # Every node has one task per version of the run (a mapped node: one map node per version).
        run["node_count"] = (run["task_count"] - run["item_count"]) // max(1, len(run["versions"]))
        nodes = _node_page(conn, run_id, after=None, limit=FIRST_NODE_PAGE, node_count=run["node_count"],
                           item_counts=by_map)
        run["nodes"], run["nodes_next_after"] = nodes.items, nodes.next_after
        tasks = _task_page(conn, workspace_id, run_id, status=None, node=None, after=None, limit=tasks_limit,
                           include_attempts=include_attempts, items=items, item_counts=by_map)
        run["tasks"], run["tasks_next_after"] = tasks.items, tasks.next_after
        return run


def list_run_tasks(
    db: Database, workspace_id: str, run_id: uuid.UUID, *, status: str | None, node: str | None,
    after: tuple[Any, ...] | None, limit: int, include_attempts: bool = False, items: bool = True,
) -> TaskPage:
    """A page of a run's tasks in (node, version, map_index) order, optionally of one status and/or
    one node, with or without map items. `after` is the (node, version, map_index) of the last task
    of the previous page; a (node, version) pair means after every task of that node and version."""
    with db.connection() as conn:
        if run_store.run_state(conn, workspace_id, run_id) is None:
            raise NotFound(f"run '{run_id}' not found")
        return _task_page(conn, workspace_id, run_id, status=status, node=node, after=after, limit=limit,
                          include_attempts=include_attempts, items=items)


def list_run_nodes(db: Database, workspace_id: str, run_id: uuid.UUID, *, after: int | None, limit: int) -> NodePage:
    """A page of a run's nodes in definition order, each with its tasks counted by status (and a
    mapped node's items)."""
    with db.connection() as conn:
        run = run_store.run_state(conn, workspace_id, run_id)
        if run is None:
            raise NotFound(f"run '{run_id}' not found")
        return _node_page(conn, run_id, after=after, limit=limit, node_count=None)


def _task_page(
    conn: Connection, workspace_id: str, run_id: uuid.UUID, *, status: str | None, node: str | None,
    after: tuple[Any, ...] | None, limit: int, include_attempts: bool, items: bool = True,
    item_counts: dict[Any, dict[str, int]] | None = None,
) -> TaskPage:
    """`item_counts`: each map node's items by status, when the caller counted them (else the
    page's map nodes have theirs counted here)."""
    if limit <= 0:
        return TaskPage([], None)
    key = None if after is None else (
        str(after[0]), str(after[1]), int(after[2]) if len(after) > 2 else _AFTER_EVERY_ITEM)
    rows = task_store.page_tasks_of_run(
        conn, workspace_id, run_id, status=status, node=node, after=key, limit=limit + 1,
        max_depends=MAX_DEPENDS, items=items,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    maps = [r["id"] for r in rows if r["kind"] == "map"]
    if maps:
        by_map = item_counts if item_counts is not None else _item_counts(conn, maps)
        for row in rows:
            if row["kind"] == "map":
                row["map"] = map_view(row.get("map_spec"), row.get("map_width"), by_map.get(row["id"], {}))
    if include_attempts:
        by_task: dict[Any, list[Row]] = {}
        for attempt in task_store.latest_attempts(conn, [r["id"] for r in rows if r["attempt"]], ATTEMPTS_PER_TASK):
            by_task.setdefault(attempt["task_id"], []).append(attempt)
        for row in rows:
            row["attempts"] = by_task.get(row["id"], [])
    last = rows[-1] if rows else None
    return TaskPage(rows, (str(last["node_id"]), str(last["version"]), int(last["map_index"])) if more and last else None)


def _item_counts(conn: Connection, map_ids: list[Any]) -> dict[Any, dict[str, int]]:
    by_map: dict[Any, dict[str, int]] = {}
    for row in task_store.map_item_counts(conn, map_ids):
        by_map.setdefault(row["map_parent_id"], {})[str(row["status"])] = int(row["n"])
    return by_map


def _node_page(
    conn: Connection, run_id: uuid.UUID, *, after: int | None, limit: int, node_count: int | None,
    item_counts: dict[Any, dict[str, int]] | None = None,
) -> NodePage:
    start = -1 if after is None else after
    # One more node than asked for tells whether another page follows.
    rows = task_store.node_counts_of_run(conn, run_id, after_position=start, limit=limit + 1)
    nodes: dict[int, dict[str, Any]] = {}
    maps: dict[int, dict[str, Any]] = {}
    for row in rows:
        node = nodes.setdefault(int(row["position"]), {
            "node": row["node_id"], "position": row["position"], "kind": row["kind"], "task": row["task_name"],
            "status": None, "tasks": 0, "counts": {},
        })
        node["tasks"] += row["n"]
        node["counts"][row["status"]] = row["n"]
        if row["kind"] == "map":
            found = maps.setdefault(int(row["position"]), {"spec": None, "width": 0, "expanded": 0, "ids": []})
            found["spec"] = found["spec"] or row["map_spec"]
            found["width"] += int(row["map_width"] or 0)
            found["expanded"] += int(row["map_expanded"] or 0)
            found["ids"] += list(row["map_ids"] or [])
    by_map = item_counts if item_counts is not None else _item_counts(
        conn, [i for found in maps.values() for i in found["ids"]])
    for position, node in nodes.items():
        node["status"] = node_status(node["counts"])
        mapped = maps.get(position)
        if mapped is not None:
            items: dict[str, int] = {}
            for map_id in mapped["ids"]:
                for status, n in by_map.get(map_id, {}).items():
                    items[status] = items.get(status, 0) + n
            node["map"] = map_view(mapped["spec"], mapped["width"] if mapped["expanded"] else None, items)
    page = list(nodes.values())
    more = len(page) > limit
    page = page[:limit]
    if node_count is not None:
        more = bool(page) and page[-1]["position"] < node_count - 1
    return NodePage(page, page[-1]["position"] if more and page else None)
