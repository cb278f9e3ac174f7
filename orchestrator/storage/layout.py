"""Object keys in the outputs bucket.

Every key is built here so the orchestrator, the API and the workers agree on the layout, and so
session policies (which name one attempt's prefix for writes and exact keys for reads) match
what is actually written.
"""

from __future__ import annotations

__all__ = [
    "attempt_log_key",
    "map_item_attempt_prefix",
    "map_item_log_key",
    "map_item_output_key",
    "map_items_prefix",
    "map_manifest_key",
    "node_attempt_prefix",
    "node_output_key",
    "node_prefix",
    "pipeline_output_key",
    "run_prefix",
]


def _check_segment(name: str, value: str) -> str:
    # A "/" or an empty segment would let one task's key land in another task's prefix (and
    # widen what a session policy grants), so reject them instead of escaping.
    if not value or "/" in value or value in {".", ".."}:
        raise ValueError(f"invalid {name} for an object key: {value!r}")
    return value


def _check_attempt(attempt: int) -> int:
    # bool is an int too; an attempt number is a positive integer, never True or 0.
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"invalid attempt for an object key: {attempt!r}")
    return attempt


def _check_index(index: int) -> int:
    # The item's position in the mapped list: 0 is the first item, so unlike an attempt 0 is
    # valid; a bool or a negative number is a caller's bug that would name an odd key.
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"invalid map item index for an object key: {index!r}")
    return index


def _node_prefix(workspace: str, pipeline: str, run_id: str, version: str, node: str) -> str:
    # Ends in "/" so that node "a"'s prefix never covers node "ab"'s keys.
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("run_id", run_id),
        _check_segment("version", version),
        _check_segment("node", node),
    )
    return "runs/{}/{}/{}/{}/nodes/{}/".format(*parts)


def node_prefix(workspace: str, pipeline: str, run_id: str, version: str, node: str) -> str:
    """The prefix (ending in "/") of everything one node writes in one data version of one run:
    every attempt and every map item of it. The scope of the session a `storage: credentials`
    node's tasks share (storage.s3.issue_storage_grant)."""
    return _node_prefix(workspace, pipeline, run_id, version, node)


def node_attempt_prefix(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, attempt: int
) -> str:
    """The prefix (ending in "/") of everything one attempt of one node writes: its output and
    its log. Scoped by attempt so that a stale attempt, whose grant is still valid, can only ever
    write its own objects and never the key a newer, accepted attempt wrote (fencing that
    reaches the object store, not only the callback)."""
    return f"{_node_prefix(workspace, pipeline, run_id, version, node)}attempts/{_check_attempt(attempt)}/"


def node_output_key(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, attempt: int
) -> str:
    """Where one attempt of one node writes its output for one data version of one run.

    Downstream tasks never recompute this: they read the key recorded by the accepted callback.
    """
    return node_attempt_prefix(workspace, pipeline, run_id, version, node, attempt) + "output.json"


def attempt_log_key(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, attempt: int
) -> str:
    """Where one attempt's log lives: beside its output, under the same attempt prefix."""
    return node_attempt_prefix(workspace, pipeline, run_id, version, node, attempt) + "log.txt"


def map_items_prefix(workspace: str, pipeline: str, run_id: str, version: str, node: str) -> str:
    """The prefix (ending in "/") under which every child of a mapped node writes, one
    `items/{index}/` folder per item. A reducer's grant may read under it (its manifest names
    up to the run's task limit of keys, too many for a session policy to list), and only under
    it: the trailing "/" keeps node "a"'s items apart from node "ab"'s."""
    return f"{_node_prefix(workspace, pipeline, run_id, version, node)}items/"


def map_item_attempt_prefix(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, index: int, attempt: int
) -> str:
    """The prefix of everything one attempt of one child (item `index`) of a mapped node writes.
    Scoped by item and attempt for the same reason as `node_attempt_prefix`: a child's grant
    writes under it, so neither a sibling nor a stale attempt can overwrite an accepted output
    (items/1/ never covers items/10/, thanks to the "/")."""
    return (f"{map_items_prefix(workspace, pipeline, run_id, version, node)}"
            f"{_check_index(index)}/attempts/{_check_attempt(attempt)}/")


def map_item_output_key(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, index: int, attempt: int
) -> str:
    """Where one attempt of the child for item `index` of a mapped node writes its output."""
    return map_item_attempt_prefix(workspace, pipeline, run_id, version, node, index, attempt) + "output.json"


def map_item_log_key(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, index: int, attempt: int
) -> str:
    """Where one attempt of the child for item `index` keeps its log: beside its output."""
    return map_item_attempt_prefix(workspace, pipeline, run_id, version, node, index, attempt) + "log.txt"


def map_manifest_key(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, generation: int
) -> str:
    """Where the server writes the manifest of a mapped node once all its children are done:
    under the node's own `attempts/{generation}/`, beside the items (not under `items/`, so no
    child's grant covers it). A redrive that re-runs failed children writes a new generation
    rather than replacing the manifest a reducer may be reading."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError(f"invalid manifest generation for an object key: {generation!r}")
    return f"{_node_prefix(workspace, pipeline, run_id, version, node)}attempts/{generation}/manifest.json"


def run_prefix(workspace: str, pipeline: str, run_id: str) -> str:
    """The prefix holding every node output of one run (all versions)."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("run_id", run_id),
    )
    return f"runs/{'/'.join(parts)}/"


def pipeline_output_key(
    workspace: str, pipeline: str, execution_id: str, version: str, output: str, attempt: int
) -> str:
    """Where a declared pipeline output of one execution and data version is persisted, by the
    attempt that produced it. The object is written before the callback's transaction decides
    whether that attempt is accepted, so a stale attempt's copy must not land on the accepted
    one's key; only the accepting transaction indexes its key."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("execution_id", execution_id),
        _check_segment("version", version),
        _check_segment("output", output),
    )
    return f"outputs/{'/'.join(parts)}/attempts/{_check_attempt(attempt)}.json"
