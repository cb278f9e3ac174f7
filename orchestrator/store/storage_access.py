"""Which nodes of a run asked for storage credentials (`storage: credentials` in the pipeline's
definition, issue 15). Read by the dispatcher once per run and process: a run's pipeline
version, and so its definition, never changes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from orchestrator.db.connection import Connection


def credential_nodes(conn: Connection, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, bool]]:
    """For each run found, its pipeline version's nodes with `storage: credentials`, each with
    whether it is a map node (empty for most runs: the definition leaves the field out while it
    is the default)."""
    if not run_ids:
        return {}
    rows = conn.execute(
        """SELECT r.id,
                  COALESCE(jsonb_object_agg(n.node->>'id', n.node ? 'map')
                               FILTER (WHERE n.node->>'storage' = 'credentials'),
                           '{}'::jsonb) AS nodes
           FROM runs r
           JOIN pipeline_versions v
             ON v.workspace_id = r.workspace_id AND v.pipeline_id = r.pipeline_id AND v.version = r.pipeline_version
           LEFT JOIN LATERAL jsonb_array_elements(v.definition->'nodes') AS n(node) ON true
           WHERE r.id = ANY(%s::uuid[])
           GROUP BY r.id""",
        (list(run_ids),),
    ).fetchall()
    return {row["id"]: {str(k): bool(v) for k, v in row["nodes"].items()} for row in rows}
