"""How runs and their tasks are answered: bounded, whatever the size of the run (issue 17), with
mapped nodes shown as one node (issue 19).

A run answer carries its tasks counted by status (`counts`, overall) and by node (`nodes`, a
first page), and a first page of its tasks (`tasks`), each with the cursor of the next page
(`nodes_next_cursor`, `tasks_next_cursor`). `GET /api/runs/{id}/tasks` and
`GET /api/runs/{id}/nodes` page through the rest. A task in a page is bounded too: its error and
output are cut to a few kilobytes (`GET /api/tasks/{id}` has them whole), its `depends` to the
first 50 (`depends_count` has the number). The `params` of a run answer or of a task answer are
cut when large (`params_truncated`): the parameters that fit are shown (a map over
`params.<name>` may hold a list of 100,000 items there).

Mapped nodes (`map:` on a node). Per data version a mapped node is one task of kind `map` (the
map node: no worker runs it), and, once expanded, one task per item (a map item).

- `counts` and `task_count` count every task of the run: each map node once, and each of its
  items. `map_items` counts the items alone by status and `item_count` is their number, so
  `counts` minus `map_items` counts the run by node and version; `node_count` counts nodes.
- A node entry (`nodes`, `GET /api/runs/{id}/nodes`) is one per node, a mapped node included:
  `kind` is `map`, `tasks` and `counts` count its map nodes (one per version), `status` is the
  node's status (the first of running, dispatched, ready, waiting, pending, failed, cancelled,
  skipped, succeeded that one of its tasks has), and `map` is
  `{"over", "width", "max_concurrency", "tolerated_failures", "items": {status: count}}`, where
  `width` is the number of its items (over its versions; null until expanded).
- An expanded map node waiting for its items is shown `running` (its row is `pending`, counting
  its open items as unfinished dependencies); the `status` filter matches what is shown.
- A page of tasks is in (node, version, map_index) order: a map node, then its items in index
  order. An item carries `map_index`, `map_item` (bounded like other values) and
  `map_parent_id`; a map node carries `map` (its own items by status). `items=false` leaves
  items out (a run answer or page of node-level tasks only).
- `depends` lists node-level upstreams: a map node's never list its items, and an item has none
  of its own (it reads its map node's inputs; `map_parent_id` names the map node).
- `GET /api/tasks/{id}` of a map node has `map` and its `output` (the manifest reference once
  settled); of an item, `map_index`, `map_item` (whole) and `map_parent_id`.

Failures. A task whose last attempt failed is `failed`, whatever failed it (a worker's attempts
used up, a rejected approval, a map node over its tolerated failures); `dead_lettered` says
whether it is in the dead-letter queue (an open entry: a worker's task). A run carries
`failed_tasks` (its failed tasks, map items included) and `succeeded_with_failures` (succeeded,
with failures its `on_failure: continue` or `tolerated_failures` let it go past).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request

from orchestrator.engine import runs
from orchestrator.engine.errors import InvalidInput

TASK_STATUSES = ("pending", "ready", "dispatched", "running", "waiting", "succeeded", "failed", "skipped",
                 "cancelled")
LIST_VERSIONS = 20  # versions of each run in a list of runs (`version_count` has the number)
_VALUE_BUDGET = 2000  # characters of JSON for a task's error or output in a page
_ATTEMPT_ERROR_BUDGET = 500
_ITEM_BUDGET = 500  # characters of JSON for a map item in a page
_PARAMS_BUDGET = 20_000  # characters of JSON for a run's params in a run answer
_PARAM_BUDGET = 2_000  # ... and for one of them, when they are over that
_TEXT = 300
_BAD_CURSOR = "cursor is not one this API returned; pass the next cursor of the previous page"


def bounded(value: Any, budget: int = _VALUE_BUDGET) -> Any:
    """`value` when its JSON is within `budget` characters; otherwise its scalar fields (strings
    cut to a few hundred characters) while they fit, marked `"truncated": true`."""
    if value is None:
        return None
    text = json.dumps(value, default=str)
    if len(text) <= budget:
        return value
    if isinstance(value, str):
        return value[: budget - 1] + "…"
    out: dict[str, Any] = {}
    used = 20
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and len(item) > _TEXT:
                item = item[: _TEXT - 1] + "…"
            elif not (item is None or isinstance(item, (str, int, float, bool))):
                continue
            cost = len(json.dumps({str(key)[:100]: item}, default=str))
            if used + cost > budget:
                break
            out[str(key)[:100]] = item
            used += cost
    out["truncated"] = True
    return out


def _short_text(value: Any, limit: int = 2000) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def attempt_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "attempt": row["attempt"], "status": row["status"], "dispatched_at": row["dispatched_at"],
        "started_at": row["started_at"], "finished_at": row["finished_at"],
        "error": bounded(row["error"], _ATTEMPT_ERROR_BUDGET), "code_version": row["code_version"],
    }


def task_view(row: dict[str, Any]) -> dict[str, Any]:
    """A task of a run, as pages and run answers list it (bounded)."""
    view = {
        "id": row["id"], "node": row["node_id"], "version": row["version"], "position": row.get("position"),
        "kind": row["kind"], "task": row["task_name"], "status": row["status"], "attempt": row["attempt"],
        "max_attempts": row["max_attempts"], "depends": list(row.get("depends") or []),
        "depends_count": row.get("depends_count", len(row.get("depends") or [])),
        "created_at": row["created_at"], "dispatched_at": row["dispatched_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "progress": row["progress"], "message": _short_text(row["message"]),
        "output": bounded(row["output"]), "error": bounded(row["error"]),
        "dead_lettered": bool(row.get("dead_lettered")),
    }
    if row.get("map_parent_id") is not None:
        view.update(map_index=row["map_index"], map_item=bounded(row.get("map_item"), _ITEM_BUDGET),
                    map_parent_id=row["map_parent_id"])
    if row.get("map") is not None:
        view["map"] = row["map"]
    if "attempts" in row:
        view["attempts"] = [attempt_view(a) for a in row["attempts"]]
    return view


def shown_status(row: dict[str, Any]) -> str:
    """A task's status as answers show it: an expanded map node waiting for its items is running."""
    if row.get("kind") == "map" and row.get("status") == "pending" and row.get("map_width") is not None:
        return "running"
    return str(row["status"])


def task_detail(task: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """`GET /api/tasks/{id}`: the task whole (its params cut like a run's when large), with its
    attempts; an item with its index, item and map node, a map node with `map` (spec, width,
    items by status)."""
    view = {k: v for k, v in task.items()
            if k not in ("map_spec", "map_width", "map_index", "map_parent_id", "map_item")}
    view["status"] = shown_status(task)
    if "params" in task:
        # A map over params.<name> has the list in its map node's params.
        view["params"], view["params_truncated"] = bounded_params(task["params"])
    if task.get("map_parent_id") is not None:
        view.update(map_index=task["map_index"], map_item=task.get("map_item"), map_parent_id=task["map_parent_id"])
    view["attempts"] = attempts
    return view


def bounded_params(params: Any) -> tuple[Any, bool]:
    """A run's params for a run answer, and whether some were left out: whole when small, else
    the parameters that fit (each within a couple of kilobytes) while they fit."""
    if not isinstance(params, dict) or len(json.dumps(params, default=str)) <= _PARAMS_BUDGET:
        return params, False
    out: dict[str, Any] = {}
    used = 2
    for key, value in params.items():
        cost = len(json.dumps({str(key): value}, default=str))
        if cost > _PARAM_BUDGET or used + cost > _PARAMS_BUDGET:
            continue
        out[str(key)] = value
        used += cost
    return out, True


def run_view(run: dict[str, Any]) -> dict[str, Any]:
    """A run answer from `Engine.run_summary`: the run, its counts, its first pages and their cursors."""
    view = {k: v for k, v in run.items() if k not in ("tasks", "tasks_next_after", "nodes_next_after")}
    if "params" in run:
        view["params"], view["params_truncated"] = bounded_params(run["params"])
    view["tasks"] = [task_view(t) for t in run["tasks"]]
    view["tasks_next_cursor"] = encode_task_cursor(run["tasks_next_after"])
    view["nodes_next_cursor"] = encode_node_cursor(run["nodes_next_after"])
    return view


def run_list_item(row: dict[str, Any]) -> dict[str, Any]:
    """A run in a list (runs, an orchestration's runs): its first versions and their number."""
    versions = list(row.get("versions") or [])
    return {**row, "versions": versions[:LIST_VERSIONS], "version_count": len(versions)}


# --- cursors ---------------------------------------------------------------------------------


def _encode(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(cursor: str) -> Any:
    if len(cursor) > 1024:  # a node id and a version name make a few hundred characters at most
        raise InvalidInput(_BAD_CURSOR)
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidInput(_BAD_CURSOR) from None


def encode_task_cursor(after: tuple[str, str, int] | None) -> str | None:
    """The key (node, version, map_index) of the last task of a page. A cursor of before map
    nodes (node, version) is refused like any cursor this API did not return."""
    return None if after is None else _encode(["t", after[0], after[1], after[2]])


def decode_task_cursor(cursor: str | None) -> tuple[str, str, int] | None:
    if not cursor:
        return None
    value = _decode(cursor)
    if (not isinstance(value, list) or len(value) != 4 or value[0] != "t"
            or not all(isinstance(v, str) and "\x00" not in v for v in value[1:3])
            or type(value[3]) is not int or not -1 <= value[3] < runs.MAX_TASKS_PER_RUN):
        raise InvalidInput(_BAD_CURSOR)
    return value[1], value[2], value[3]


def encode_node_cursor(after: int | None) -> str | None:
    return None if after is None else _encode(["n", after])


def decode_node_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    value = _decode(cursor)
    if (not isinstance(value, list) or len(value) != 2 or value[0] != "n" or type(value[1]) is not int
            or not 0 <= value[1] < runs.MAX_TASKS_PER_RUN):
        raise InvalidInput(_BAD_CURSOR)
    return int(value[1])


# --- query parameters --------------------------------------------------------------------------


def query_limit(request: Request, default: int, maximum: int, minimum: int = 1) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not minimum <= int(raw) <= maximum:
        raise InvalidInput(f"limit must be an integer from {minimum} to {maximum}")
    return int(raw)


def include_attempts(request: Request) -> bool:
    """`include=attempts`: each task of the page with its last attempts (for a timeline)."""
    values = [v.strip() for raw in request.query_params.getlist("include") for v in raw.split(",") if v.strip()]
    unknown = [v for v in values if v != "attempts"]
    if unknown:
        raise InvalidInput(f"include takes 'attempts'; got {unknown[0]!r}")
    return "attempts" in values


def include_items(request: Request) -> bool:
    """`items=false`: leave map items out (node-level tasks only); `items=true`, the default, has them."""
    raw = request.query_params.get("items")
    if raw is None or raw == "":
        return True
    if raw not in ("true", "false"):
        raise InvalidInput("items must be true or false")
    return raw == "true"


def task_filters(request: Request) -> tuple[str | None, str | None]:
    status = request.query_params.get("status") or None
    if status == "dead":
        # The status of a task out of attempts until issue 18: now `failed` (`dead_lettered` true).
        raise InvalidInput("status 'dead' no longer exists: a task whose last attempt failed is 'failed' "
                           "(dead-lettered or not; see its `dead_lettered`); use status=failed",
                           details=[{"path": "status", "message": "use failed"}])
    if status is not None and status not in TASK_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(TASK_STATUSES)}")
    node = request.query_params.get("node") or None
    if node is not None and (len(node) > 255 or "\x00" in node):
        raise InvalidInput("node must be a node id")
    return status, node
