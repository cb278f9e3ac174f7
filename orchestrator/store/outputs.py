"""Persisted pipeline outputs and the upstream outputs each run reads (its lineage upstream)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from orchestrator.db.connection import Connection, Row


@dataclass(frozen=True)
class NewOutput:
    id: uuid.UUID
    output: str
    key: str
    size: int
    sha256: str
    schema_sha256: str | None


def insert_outputs(conn: Connection, task: Row, outputs: Sequence[NewOutput]) -> None:
    """Index the outputs a succeeded task produced (one row per execution, version and name)."""
    conn.execute(
        """INSERT INTO pipeline_outputs (id, workspace_id, pipeline_id, run_id, pipeline_version, version, output,
                                         node_id, task_id, key, size, sha256, schema_sha256)
           SELECT o.id, t.workspace_id, t.pipeline_id, t.run_id, r.pipeline_version, t.version, o.output,
                  t.node_id, t.id, o.key, o.size, o.sha256, o.schema_sha256
           FROM tasks t JOIN runs r ON r.id = t.run_id,
                unnest(%s::uuid[], %s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[])
                  AS o(id, output, key, size, sha256, schema_sha256)
           WHERE t.id = %s
           ON CONFLICT (run_id, version, output) DO UPDATE
               SET key = EXCLUDED.key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,
                   schema_sha256 = EXCLUDED.schema_sha256, task_id = EXCLUDED.task_id, created_at = tw_now()""",
        (
            [o.id for o in outputs], [o.output for o in outputs], [o.key for o in outputs],
            [o.size for o in outputs], [o.sha256 for o in outputs], [o.schema_sha256 for o in outputs],
            task["id"],
        ),
    )


def output_specs_of_task(conn: Connection, task_id: uuid.UUID) -> Row | None:
    """A task's identity and the outputs its node produces, with their schemas (from the version it runs)."""
    return conn.execute(
        """SELECT t.id, t.workspace_id, t.pipeline_id, t.run_id, t.node_id, t.version, t.output_names,
                  v.definition -> 'outputs' AS outputs
           FROM tasks t JOIN runs r ON r.id = t.run_id
                JOIN pipeline_versions v ON v.workspace_id = r.workspace_id AND v.pipeline_id = r.pipeline_id
                                        AND v.version = r.pipeline_version
           WHERE t.id = %s""",
        (task_id,),
    ).fetchone()


def resolve_run_inputs(
    conn: Connection, run: Row, needs: Sequence[tuple[str, str, uuid.UUID | None]]
) -> list[Row]:
    """Record, for each of the run's versions, where each needed upstream output comes from.

    `needs` is (upstream pipeline, output, run of that pipeline in the same orchestration or
    None). An orchestration's own upstream run is preferred when it produced the output for
    that version; otherwise the newest output of a succeeded execution is taken (hydration).
    Returns the rows recorded; a (version, pipeline, output) absent from them is missing.
    """
    if not needs:
        return []
    return conn.execute(
        """INSERT INTO run_inputs (run_id, version, upstream_pipeline_id, output, output_id, source_run_id, mode)
           SELECT %(run)s, v.version, n.pipeline, n.output, o.id, o.run_id,
                  CASE WHEN o.run_id = n.local_run THEN 'orchestration' ELSE 'hydrated' END
           FROM unnest(%(versions)s::text[]) AS v(version)
                CROSS JOIN unnest(%(pipelines)s::text[], %(outputs)s::text[], %(local)s::uuid[])
                  AS n(pipeline, output, local_run)
                CROSS JOIN LATERAL (
                    SELECT po.id, po.run_id
                    FROM pipeline_outputs po JOIN runs ru ON ru.id = po.run_id
                    WHERE po.workspace_id = %(ws)s AND po.pipeline_id = n.pipeline
                      AND po.version = v.version AND po.output = n.output
                      AND (ru.status = 'succeeded' OR po.run_id = n.local_run)
                    ORDER BY (po.run_id = n.local_run) IS TRUE DESC, ru.finished_at DESC NULLS LAST,
                             po.created_at DESC
                    LIMIT 1
                ) o
           ON CONFLICT (run_id, version, upstream_pipeline_id, output) DO UPDATE
               SET output_id = EXCLUDED.output_id, source_run_id = EXCLUDED.source_run_id, mode = EXCLUDED.mode
           RETURNING version, upstream_pipeline_id, output""",
        {
            "run": run["id"], "ws": run["workspace_id"], "versions": list(run["versions"]),
            "pipelines": [n[0] for n in needs], "outputs": [n[1] for n in needs], "local": [n[2] for n in needs],
        },
    ).fetchall()


def available_outputs(
    conn: Connection, workspace_id: str, needs: Sequence[tuple[str, str]], versions: Sequence[str]
) -> set[tuple[str, str, str]]:
    """Which (pipeline, output, version) have an output of a succeeded execution."""
    if not needs or not versions:
        return set()
    rows = conn.execute(
        """SELECT n.pipeline, n.output, v.version
           FROM unnest(%s::text[]) AS v(version)
                CROSS JOIN unnest(%s::text[], %s::text[]) AS n(pipeline, output)
           WHERE EXISTS (SELECT 1 FROM pipeline_outputs po JOIN runs ru ON ru.id = po.run_id
                         WHERE po.workspace_id = %s AND po.pipeline_id = n.pipeline AND po.version = v.version
                           AND po.output = n.output AND ru.status = 'succeeded')""",
        (list(versions), [n[0] for n in needs], [n[1] for n in needs], workspace_id),
    ).fetchall()
    return {(str(r["pipeline"]), str(r["output"]), str(r["version"])) for r in rows}


def run_inputs(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT i.version, i.upstream_pipeline_id AS pipeline_id, i.output, i.output_id, i.source_run_id AS run_id,
                  i.mode
           FROM run_inputs i WHERE i.run_id = %s
           ORDER BY i.upstream_pipeline_id, i.output, i.version""",
        (run_id,),
    ).fetchall()


def outputs_of_run(conn: Connection, run_id: uuid.UUID) -> list[Row]:
    return conn.execute(
        """SELECT id, output, version, node_id, key, size, sha256, schema_sha256, created_at
           FROM pipeline_outputs WHERE run_id = %s ORDER BY output, version""",
        (run_id,),
    ).fetchall()


def list_outputs(
    conn: Connection, workspace_id: str, *, pipeline_id: str | None, version: str | None, output: str | None,
    limit: int, before: tuple[datetime, uuid.UUID] | None,
) -> list[Row]:
    """Outputs of succeeded executions, newest first, keyset-paginated on (created_at, id)."""
    before_at, before_id = before if before else (None, None)
    return conn.execute(
        """SELECT po.id, po.pipeline_id, po.run_id, po.pipeline_version, po.version, po.output, po.node_id,
                  po.size, po.sha256, po.schema_sha256, po.created_at
           FROM pipeline_outputs po JOIN runs r ON r.id = po.run_id AND r.status = 'succeeded'
           WHERE po.workspace_id = %s
             AND (%s::text IS NULL OR po.pipeline_id = %s)
             AND (%s::text IS NULL OR po.version = %s)
             AND (%s::text IS NULL OR po.output = %s)
             AND (%s::timestamptz IS NULL OR (po.created_at, po.id) < (%s, %s::uuid))
           ORDER BY po.created_at DESC, po.id DESC
           LIMIT %s""",
        (workspace_id, pipeline_id, pipeline_id, version, version, output, output, before_at, before_at,
         before_id, limit),
    ).fetchall()


def get_output(conn: Connection, workspace_id: str, output_id: uuid.UUID) -> Row | None:
    return conn.execute(
        """SELECT po.id, po.pipeline_id, po.run_id, po.pipeline_version, po.version, po.output, po.node_id, po.key,
                  po.size, po.sha256, po.schema_sha256, po.created_at, r.status AS run_status
           FROM pipeline_outputs po JOIN runs r ON r.id = po.run_id
           WHERE po.workspace_id = %s AND po.id = %s""",
        (workspace_id, output_id),
    ).fetchone()
