"""Object keys in the outputs bucket.

Every key is built here so the orchestrator, the API and the workers agree on the layout, and so
session policies (which name one attempt's prefix for writes and exact keys for reads) match
what is actually written.
"""

from __future__ import annotations

__all__ = [
    "attempt_log_key",
    "node_attempt_prefix",
    "node_output_key",
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


def node_attempt_prefix(
    workspace: str, pipeline: str, run_id: str, version: str, node: str, attempt: int
) -> str:
    """The prefix (ending in "/") of everything one attempt of one node writes: its output and
    its log. Scoped by attempt so that a stale attempt, whose grant is still valid, can only ever
    write its own objects and never the key a newer, accepted attempt wrote (fencing that
    reaches the object store, not only the callback)."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("run_id", run_id),
        _check_segment("version", version),
    )
    return f"runs/{'/'.join(parts)}/nodes/{_check_segment('node', node)}/attempts/{_check_attempt(attempt)}/"


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
