"""Dynamic fan-out: the items of a map node, its expansion into children, its settling, and the
manifest its downstream tasks read (docs/pipelines.md "Mapping over a list").

Three moments:

1. **Items.** When a task that map nodes map over succeeds, its output object is read and each
   map node's path into it is taken, outside any transaction (`prepare_items`, by the callback
   before the transaction that records the success); that transaction keeps the list
   (`stage_items`). A map over `params.<name>` takes its list from its own params.
2. **Expansion.** When a map node's upstreams are done and its trigger rule holds, it is ready;
   the transaction that made it ready expands it (`resolve`): one child per item, inserted a
   batch of 10,000 per statement, or, with no items, settled at once. Nothing here touches the
   object store, so every path that makes a map node ready can expand it where it stands.
3. **Settling.** When its last child is terminal the map node is ready again and settles:
   succeeded when its failed children are within `tolerated_failures`, failed beyond, skipped
   when a stopping failure elsewhere skipped some of its children. Its output is a reference
   to its manifest, which the dispatcher writes before the first downstream task is sent
   (`ensure_manifest`): the children's output references, in index order.

This module decides and writes rows; what follows a map node's end (its successors, the run's
counters) is orchestrator.engine.completion's, which calls `resolve`.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator import safe_json
from orchestrator.config import Settings
from orchestrator.db.connection import Connection, Row
from orchestrator.logs import log_event
from orchestrator.model.pipeline import MAX_TASKS_PER_RUN, tolerated_count
from orchestrator.storage.layout import map_items_prefix, map_manifest_key
from orchestrator.store import maps as map_store

log = logging.getLogger(__name__)

# One item travels inside every dispatch message of its child (an SQS message or an
# asynchronous Lambda invoke holds 256 KiB); larger things belong in objects the item names.
MAX_ITEM_BYTES = 64 * 1024
# The output a list is read from: bounded like any output the server reads.
MAX_ITEMS_OBJECT_BYTES = 64 * 1024 * 1024
EXPANSION_BATCH = 10_000
MANIFEST_FORMAT = "tickweave.map-manifest/1"
_MANIFEST_PAGE = 10_000


@dataclass(frozen=True)
class StagedItems:
    """The list one map node maps over, or why there is none."""

    parent_id: uuid.UUID
    items: list[Any] | None
    problem: str | None


@dataclass(frozen=True)
class Resolution:
    """What resolving a ready map node did. `settled` is the map node's terminal row when it
    succeeded or failed (completion settles it like any task); `skipped` the row when it was
    skipped; `made_ready` the children it made ready."""

    made_ready: int = 0
    settled: Row | None = None
    skipped: Row | None = None


# --- 1. items ------------------------------------------------------------------------------


def extract_items(value: Any, path: Sequence[Any], where: str) -> tuple[list[Any] | None, str | None]:
    """The list at `path` in `value`, or a problem naming what is wrong (for the map node's error)."""
    current = value
    walked: list[str] = []
    for segment in path:
        step = str(segment)
        if isinstance(current, dict):
            if step not in current:
                at = ".".join(walked) or "the top level"
                return None, f"{where}: there is no '{step}' at {at} (keys: {', '.join(sorted(map(str, current))[:10])})"
            current = current[step]
        elif isinstance(current, list) and step.isdigit():
            if int(step) >= len(current):
                return None, f"{where}: index {step} is past the end of a list of {len(current)}"
            current = current[int(step)]
        else:
            return None, f"{where}: '{'.'.join(walked) or 'the value'}' is a {_json_type(current)}, it has no '{step}'"
        walked.append(step)
    if not isinstance(current, list):
        return None, f"{where} is a {_json_type(current)}, not a list: a map needs a list of items"
    if len(current) > MAX_TASKS_PER_RUN:
        return None, f"{where} has {len(current)} items, over the limit of {MAX_TASKS_PER_RUN} tasks per run"
    for index, item in enumerate(current):
        size = len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > MAX_ITEM_BYTES:
            return None, (f"{where}[{index}] is {size} bytes, over the {MAX_ITEM_BYTES}-byte limit of one item: "
                          "map over references (keys, ids) and let each child read its data")
    return current, None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "list"


def _targets(task: Row) -> list[dict[str, Any]]:
    raw = task.get("map_targets") or []
    return [t for t in raw if isinstance(t, dict)]


def prepare_items(settings: Settings, task: Row, output: dict[str, Any] | None) -> list[StagedItems]:
    """Read a succeeded task's output (outside any transaction) and take each map node's list
    from it. A problem (no object, not JSON, not a list, too many items) becomes the map node's
    failure when it expands; the source task's success stands."""
    from orchestrator.storage.s3 import ObjectMissing, read_object_bytes

    targets = _targets(task)
    if not targets:
        return []
    key = (output or {}).get("key")
    value: Any = None
    problem: str | None = None
    if not isinstance(key, str):
        problem = f"'{task['node_id']}' reported no output object"
    else:
        try:
            value = safe_json.loads(read_object_bytes(settings, key, max_bytes=MAX_ITEMS_OBJECT_BYTES))
        except ObjectMissing:
            problem = f"the output of '{task['node_id']}' ({key}) is not in the bucket"
        except ValueError as exc:  # over the size limit, or not JSON (safe_json's errors are ValueErrors)
            problem = f"the output of '{task['node_id']}' cannot be mapped over: {exc}"
    staged: list[StagedItems] = []
    for target in targets:
        parent = uuid.UUID(str(target["parent"]))
        where = str(target.get("over") or task["node_id"])
        if problem is not None:
            staged.append(StagedItems(parent, None, problem))
            continue
        items, why = extract_items(value, list(target.get("path") or []), where)
        staged.append(StagedItems(parent, items, why))
    return staged


def stage_items(conn: Connection, source_task_id: uuid.UUID, staged: Sequence[StagedItems]) -> None:
    """Keep what `prepare_items` found, in the transaction that records the source's success."""
    for entry in staged:
        map_store.stage_items(conn, entry.parent_id, source_task_id, entry.items, entry.problem)


def missing_items(task: Row) -> list[StagedItems]:
    """A source that succeeded where its output could not be read (no object store configured):
    each map node over it fails, saying so, rather than waiting forever."""
    return [
        StagedItems(uuid.UUID(str(t["parent"])), None, f"the output of '{task['node_id']}' could not be read")
        for t in _targets(task)
    ]


# --- 2 and 3. resolving a ready map node ------------------------------------------------------


def resolve(conn: Connection, ids: Sequence[uuid.UUID]) -> list[Resolution]:
    """Expand or settle each ready map node of `ids` (locked here, in id order)."""
    results: list[Resolution] = []
    for node in map_store.lock_map_nodes(conn, ids):
        if node["map_width"] is None:
            results.append(_expand(conn, node))
        else:
            results.append(_settle(conn, node))
    return results


def _expand(conn: Connection, node: Row) -> Resolution:
    spec: dict[str, Any] = node["map_spec"] or {}
    over = str(spec.get("over") or "")
    source = str(spec.get("source") or "")
    if node["trigger_rule"] not in ("all_done", "one_failed"):
        stopping = map_store.stopping_failure(conn, node["run_id"])
        if stopping is not None:
            # The run is stopping (the failure is being recorded in this transaction): a node
            # that is not a failure handler is skipped, not expanded, like every task not yet
            # started (completion.settle_terminal); a redrive expands it afresh.
            return Resolution(skipped=_finish(conn, node, "skipped", width=None, message=(
                f"the run is stopping: '{stopping['node_id']}' failed")))
    if source == "params":
        items, problem = extract_items(node["params"], list(spec.get("path") or []), over)
        map_store.stage_items(conn, node["id"], None, items, problem)
    else:
        upstream = map_store.source_task(conn, node["id"], source)
        if upstream is None or upstream["status"] != "succeeded":
            # Its rule let it run (all_done, none_failed...) but there is nothing to map over.
            status = "missing" if upstream is None else str(upstream["status"])
            return Resolution(skipped=_finish(conn, node, "skipped", width=None, message=(
                f"nothing to map over: '{source}' is {status}")))
    staged = map_store.staged_items(conn, node["id"])
    if staged is None or staged["problem"] is not None:
        problem = "the items were not recorded" if staged is None else str(staged["problem"])
        return Resolution(settled=_finish(conn, node, "failed", width=None, error={
            "code": "map_over_invalid", "message": problem, "retryable": False}))
    width = int(staged["width"])
    already = map_store.tasks_in_run(conn, node["run_id"])
    if already + width > MAX_TASKS_PER_RUN:
        return Resolution(settled=_finish(conn, node, "failed", width=None, error={
            "code": "map_too_wide", "retryable": False, "message": (
                f"{over} has {width} items; with the run's {already} tasks that is over the limit of "
                f"{MAX_TASKS_PER_RUN} tasks per run")}))
    if width == 0:
        # An empty list: the node succeeds at once, and its downstream gets an empty manifest.
        log_event(log, "map.expanded", workspace_id=node["workspace_id"], pipeline_id=node["pipeline_id"],
                  run_id=node["run_id"], task_id=node["id"], width=0)
        return Resolution(settled=_finish(conn, node, "succeeded", width=0, counts={
            "total": 0, "succeeded": 0, "failed": 0, "skipped": 0}))
    # The node's inputs are kept for its children before they exist (after, the map node's
    # edges would include every one of them).
    map_store.keep_node_inputs(conn, node["id"])
    inserted = 0
    for first in range(0, width, EXPANSION_BATCH):
        inserted += map_store.insert_children(conn, node["id"], first, min(width, first + EXPANSION_BATCH),
                                              width=width)
    if inserted != width or not map_store.mark_expanded(conn, node["id"], width):
        raise RuntimeError(f"map node {node['id']} expanded {inserted} of {width} items")
    map_store.add_tasks_to_run(conn, node["run_id"], width)
    log_event(log, "map.expanded", workspace_id=node["workspace_id"], pipeline_id=node["pipeline_id"],
              run_id=node["run_id"], task_id=node["id"], width=width)
    return Resolution(made_ready=width)


def _settle(conn: Connection, node: Row) -> Resolution:
    counts = map_store.children_counts(conn, node["id"])
    if counts["open"]:
        raise RuntimeError(f"map node {node['id']} became ready with {counts['open']} children open")
    width = int(counts["total"])
    spec: dict[str, Any] = node["map_spec"] or {}
    tolerated = tolerated_count(spec.get("tolerated_failures", 0), width)
    if counts["skipped"]:
        # A stopping failure elsewhere skipped children that had not started: the node did not
        # do its work, so it is skipped too (a redrive runs the skipped children again).
        return Resolution(skipped=_finish(conn, node, "skipped", width=width, counts=counts, message=(
            f"{counts['skipped']} of {width} items were skipped")))
    if counts["failed"] > tolerated:
        return Resolution(settled=_finish(conn, node, "failed", width=width, counts=counts, error={
            "code": "map_failures_exceeded", "retryable": False, "failed": counts["failed"], "total": width,
            "message": f"{counts['failed']} of {width} items failed; tolerated_failures allows {tolerated}"}))
    return Resolution(settled=_finish(conn, node, "succeeded", width=width, counts=counts))


def _finish(
    conn: Connection, node: Row, status: str, *, width: int | None, counts: Row | dict[str, int] | None = None,
    error: dict[str, Any] | None = None, message: str | None = None,
) -> Row:
    # width None: the node was not expanded (nothing to map over, or a bad list) and stays
    # unexpanded, so a redrive expands it again.
    output: dict[str, Any] | None = None
    if counts is not None:
        # Each settle is a new attempt of the map node, with its own manifest key.
        generation = int(node["attempt"]) + 1
        where = (node["workspace_id"], node["pipeline_id"], str(node["run_id"]), node["version"], node["node_id"])
        output = {
            "key": map_manifest_key(*where, generation), "manifest": True, "task_id": str(node["id"]),
            "items_prefix": map_items_prefix(*where),
            "count": width, "succeeded": counts["succeeded"], "failed": counts["failed"], "skipped": counts["skipped"],
        }
    row = map_store.settle_map_node(conn, node["id"], status=status, width=width, output=output, error=error,
                                    message=message)
    if row is None:
        raise RuntimeError(f"map node {node['id']} changed while it was being settled")
    log_event(log, "map.settled", level=logging.INFO if status == "succeeded" else logging.WARNING,
              workspace_id=node["workspace_id"], pipeline_id=node["pipeline_id"], run_id=node["run_id"],
              task_id=node["id"], status=status, width=width,
              failed=None if counts is None else counts["failed"])
    return row


# --- the manifest ---------------------------------------------------------------------------------


def build_manifest(conn: Connection, parent_id: uuid.UUID) -> tuple[str, bytes] | None:
    """The manifest of a settled map node's current settle: (key, JSON bytes), written a page of
    children at a time so a 100,000-item manifest is not held as Python objects. None when the
    map node is not settled (it was reopened: its next settle has another key)."""
    node = map_store.manifest_source(conn, parent_id)
    if node is None or node["status"] not in ("succeeded", "failed") or not isinstance(node["output"], dict):
        return None
    ref = node["output"]
    key = str(ref["key"])
    out = io.BytesIO()
    head = {"format": MANIFEST_FORMAT, "node": node["node_id"], "version": node["version"],
            "run_id": str(node["run_id"]), "count": ref.get("count", 0), "succeeded": ref.get("succeeded", 0),
            "failed": ref.get("failed", 0), "skipped": ref.get("skipped", 0), "items_prefix": ref.get("items_prefix")}
    out.write(json.dumps(head, separators=(",", ":"))[:-1].encode("utf-8"))
    out.write(b',"items":[')
    after, first = -1, True
    while True:
        page = map_store.children_page(conn, parent_id, after, _MANIFEST_PAGE)
        for child in page:
            entry: dict[str, Any] = {"index": child["map_index"], "status": child["status"]}
            output = child["output"] if isinstance(child["output"], dict) else None
            if child["status"] == "succeeded" and output is not None:
                entry.update({k: output[k] for k in ("key", "size", "sha256") if k in output})
            elif child["error"] is not None:
                error = child["error"] if isinstance(child["error"], dict) else {"message": str(child["error"])}
                entry["error"] = {"code": error.get("code") or error.get("type"),
                                  "message": str(error.get("message", ""))[:500]}
            if not first:
                out.write(b",")
            out.write(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
            first = False
        if len(page) < _MANIFEST_PAGE:
            break
        after = int(page[-1]["map_index"])
    out.write(b"]}")
    return key, out.getvalue()


def ensure_manifest(settings: Settings, conn: Connection, parent_id: uuid.UUID, key: str) -> None:
    """Make sure the manifest object `key` exists before a task that reads it is sent. Its content
    follows from the database (children do not change while a settled map node's downstream
    runs: a repair that would reopen the node is refused while that task is out), so two
    dispatchers writing it at once write the same bytes."""
    from orchestrator.storage.s3 import ObjectMissing, head_object_facts, put_object_bytes

    try:
        head_object_facts(settings, key)
        return
    except ObjectMissing:
        pass
    built = build_manifest(conn, parent_id)
    if built is None or built[0] != key:
        raise RuntimeError(f"the manifest {key} is not the current settle of its map node")
    put_object_bytes(settings, key, built[1])
