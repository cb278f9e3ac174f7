"""Object keys in the outputs bucket.

Every key is built here so the orchestrator, the API and the workers agree on the layout, and so
session policies (which name exact keys) match what is actually written.
"""

from __future__ import annotations

__all__ = ["node_output_key", "pipeline_output_key", "run_prefix"]


def _check_segment(name: str, value: str) -> str:
    # A "/" or an empty segment would let one task's key land in another task's prefix (and
    # widen what a session policy grants), so reject them instead of escaping.
    if not value or "/" in value or value in {".", ".."}:
        raise ValueError(f"invalid {name} for an object key: {value!r}")
    return value


def node_output_key(workspace: str, pipeline: str, run_id: str, version: str, node: str) -> str:
    """Where one node's output for one data version of one run lives."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("run_id", run_id),
        _check_segment("version", version),
    )
    return f"runs/{'/'.join(parts)}/nodes/{_check_segment('node', node)}"


def run_prefix(workspace: str, pipeline: str, run_id: str) -> str:
    """The prefix holding every node output of one run (all versions)."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("run_id", run_id),
    )
    return f"runs/{'/'.join(parts)}/"


def pipeline_output_key(workspace: str, pipeline: str, execution_id: str, version: str, output: str) -> str:
    """Where a declared pipeline output of one execution and data version is persisted."""
    parts = (
        _check_segment("workspace", workspace),
        _check_segment("pipeline", pipeline),
        _check_segment("execution_id", execution_id),
        _check_segment("version", version),
        _check_segment("output", output),
    )
    return f"outputs/{'/'.join(parts)}"
