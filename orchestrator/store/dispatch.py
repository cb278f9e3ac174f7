"""What dispatch messages need beyond the claimed rows, read in one statement.

A dispatch reads the claimed tasks' node inputs, the pipeline outputs their runs read, and the
worker routes of their task names. Three statements cost three round trips and three plans per
eager continuation (measured: ~0.16 ms of planning each, on the path of every callback); one
statement with three aggregates costs one of each, and as a PL/pgSQL function (migration 0011)
its plan is cached.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.db.connection import Connection, Row


@dataclass
class DispatchContext:
    inputs: dict[uuid.UUID, dict[str, dict[str, Any]]] = field(default_factory=dict)  # task -> node -> ref
    upstream: dict[uuid.UUID, dict[str, dict[str, Any]]] = field(default_factory=dict)  # task -> "p/o" -> ref
    routes: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (workspace, task name) -> route
    maps: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)  # child task -> {index, item, count}
    manifests: dict[str, uuid.UUID] = field(default_factory=dict)  # manifest key read -> its map node


def dispatch_context(
    conn: Connection, task_ids: Sequence[uuid.UUID], route_keys: Sequence[tuple[str, str]]
) -> DispatchContext:
    context = DispatchContext()
    if not task_ids:
        return context
    # tw_dispatch_context (migration 0011) is the one statement, three jsonb aggregates of
    # task_edges/tasks, run_inputs/pipeline_outputs and worker_tasks/workers, in PL/pgSQL so that
    # its plan is cached per session.
    row = conn.execute(
        "SELECT * FROM tw_dispatch_context(%s::uuid[], %s::text[], %s::text[])",
        (list(task_ids), [k[0] for k in route_keys], [k[1] for k in route_keys]),
    ).fetchone()
    assert row is not None
    return parse_dispatch_context(row)


def parse_dispatch_context(row: Row) -> DispatchContext:
    """The context from tw_dispatch_context's four aggregates (a row, or the object
    tw_complete_attempts returns for the tasks it claimed)."""
    context = DispatchContext()
    for ref in row["inputs"]:
        entry: dict[str, Any] = {"key": ref["key"]}
        manifest = ref.get("manifest")
        if isinstance(manifest, dict):
            # An input from a map node: the manifest of its children's outputs, and the prefix
            # under which the reader may read them.
            entry.update({"manifest": True, "items_prefix": manifest.get("items_prefix"),
                          "count": manifest.get("count")})
            context.manifests[str(ref["key"])] = uuid.UUID(str(manifest["task_id"]))
        context.inputs.setdefault(uuid.UUID(ref["task_id"]), {})[ref["node_id"]] = entry
    for ref in row["upstream"]:
        context.upstream.setdefault(uuid.UUID(ref["task_id"]), {})[f"{ref['pipeline']}/{ref['output']}"] = {
            "key": ref["key"], "sha256": ref["sha256"], "size": ref["size"], "run_id": ref["run_id"],
            "mode": ref["mode"],
        }
    for route in row["routes"]:
        context.routes[(route["workspace_id"], route["task_name"])] = route
    for child in row["maps"]:
        context.maps[uuid.UUID(child["task_id"])] = {"index": child["index"], "item": child["item"],
                                                     "count": child["count"]}
    return context
