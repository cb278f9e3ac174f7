"""Map nodes (dynamic fan-out): their items, their expansion into children, their settling.

A map node is a task row of kind 'map' that no worker runs (migration 0016 has the model). Each
function is one statement, guarded by the state it expects; the callers hold the map node's row
lock (it was locked by the transition that made it ready, or by `lock_ready_map_nodes`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from orchestrator.db.connection import Connection, Row
from orchestrator.store.runs import join_slot_count

_MAP_NODE_COLUMNS = """id, run_id, workspace_id, pipeline_id, node_id, version, status, attempt, on_failure,
                       trigger_rule, params, map_spec, map_width, map_max_concurrency"""


def stage_items(
    conn: Connection, parent_id: uuid.UUID, source_task_id: uuid.UUID | None, items: list[Any] | None,
    problem: str | None,
) -> None:
    """Keep the list a map node maps over (or why there is none), read when its source succeeded.
    A source that succeeds again (after a repair) replaces what it staged before."""
    conn.execute(
        """INSERT INTO map_items (parent_task_id, source_task_id, items, problem)
           VALUES (%s, %s, %s, %s)
           ON CONFLICT (parent_task_id) DO UPDATE
               SET source_task_id = EXCLUDED.source_task_id, items = EXCLUDED.items,
                   problem = EXCLUDED.problem, created_at = tw_now()""",
        (parent_id, source_task_id, None if items is None else Jsonb(items), problem),
    )


def staged_items(conn: Connection, parent_id: uuid.UUID) -> Row | None:
    """How many items are staged for a map node, or why there are none (the list stays in the
    database: the expansion reads it there)."""
    return conn.execute(
        """SELECT CASE WHEN items IS NULL THEN NULL ELSE jsonb_array_length(items) END AS width, problem
           FROM map_items WHERE parent_task_id = %s""",
        (parent_id,),
    ).fetchone()


def lock_map_nodes(conn: Connection, ids: Sequence[uuid.UUID]) -> list[Row]:
    """Map nodes that are ready to be expanded or settled, locked (in id order)."""
    if not ids:
        return []
    return conn.execute(
        f"""SELECT {_MAP_NODE_COLUMNS} FROM tasks
            WHERE id = ANY(%s) AND kind = 'map' AND status = 'ready'
            ORDER BY id FOR UPDATE""",
        (list(ids),),
    ).fetchall()


def ready_map_nodes_of_run(conn: Connection, run_id: uuid.UUID) -> list[uuid.UUID]:
    """Map nodes of a run made ready by a statement that does not resolve them (a run's start)."""
    rows = conn.execute(
        "SELECT id FROM tasks WHERE run_id = %s AND kind = 'map' AND status = 'ready' ORDER BY id", (run_id,)
    ).fetchall()
    return [r["id"] for r in rows]


def lock_stranded_map_nodes(conn: Connection, limit: int) -> list[uuid.UUID]:
    """The tick's safety net: ready map nodes some path committed without resolving them."""
    rows = conn.execute(
        """SELECT id FROM tasks WHERE kind = 'map' AND status = 'ready'
           ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
        (limit,),
    ).fetchall()
    return [r["id"] for r in rows]


def source_task(conn: Connection, parent_id: uuid.UUID, node_id: str) -> Row | None:
    """The upstream task of a map node that it maps over (same run and version)."""
    return conn.execute(
        """SELECT u.id, u.status FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
           WHERE e.downstream_task_id = %s AND u.node_id = %s AND u.map_parent_id IS NULL""",
        (parent_id, node_id),
    ).fetchone()


def stopping_failure(conn: Connection, run_id: uuid.UUID) -> Row | None:
    """A task of the run that failed for good under `on_failure: stop` (the run is stopping)."""
    return conn.execute(
        """SELECT node_id FROM tasks
           WHERE run_id = %s AND status = 'failed' AND on_failure = 'stop' AND map_parent_id IS NULL
           LIMIT 1""",
        (run_id,),
    ).fetchone()


def tasks_in_run(conn: Connection, run_id: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*)::int AS n FROM tasks WHERE run_id = %s", (run_id,)).fetchone()
    return 0 if row is None else int(row["n"])


def insert_children(conn: Connection, parent_id: uuid.UUID, first: int, last: int, *, width: int) -> int:
    """Children for the staged items at indexes first..last-1 (0-based) of `width`, in one
    statement: each a ready task of the map node's task, params, retry and limits, carrying its
    item and index, and each an upstream of the map node (task_edges), so the map node counts
    them. A map of JOIN_SLOTS_FROM items or more without max_concurrency counts them through
    slots (migration 0027), item i in slot i mod the slot count: items are claimed in index
    order, so the callbacks of items that run together count on different slot rows, and the
    map node's row is written once per slot, not once per item. (A capped map's items are
    recorded by the engine, which writes the map node's row at every end: no slots there.)"""
    row = conn.execute(
        """WITH p AS MATERIALIZED (
               -- the children's params, computed once (not once per child): a map over
               -- params.<name> leaves that list out, it is their items
               SELECT t.*, CASE WHEN t.map_spec->>'source' = 'params' THEN t.params - (t.map_spec->'path'->>0)
                                ELSE t.params END AS child_params
               FROM tasks t WHERE t.id = %(parent)s AND t.kind = 'map' AND t.status = 'ready'
           ), items AS (
               SELECT i.item, i.ord - 1 AS idx
               FROM map_items m CROSS JOIN LATERAL jsonb_array_elements(m.items) WITH ORDINALITY AS i(item, ord)
               WHERE m.parent_task_id = %(parent)s AND i.ord > %(first)s AND i.ord <= %(last)s
           ), children AS (
               INSERT INTO tasks (id, run_id, workspace_id, pipeline_id, node_id, version, position, kind,
                                  task_name, params, transport, status, priority, max_attempts, retry, timeout_s,
                                  heartbeat_s, on_failure, trigger_rule, unfinished_deps, map_index, map_parent_id,
                                  map_item, map_max_concurrency, available_at)
               SELECT gen_random_uuid(), p.run_id, p.workspace_id, p.pipeline_id, p.node_id, p.version, p.position,
                      'task', p.task_name, p.child_params, p.transport, 'ready', p.priority,
                      COALESCE((p.retry->>'max_attempts')::int, 1), p.retry, p.timeout_s, p.heartbeat_s,
                      -- a child's failure is the map node's to judge (tolerated_failures), never a
                      -- stop of the run by itself
                      'continue', 'all_success', 0, items.idx, p.id, items.item, p.map_max_concurrency, tw_now()
               FROM p CROSS JOIN items
               RETURNING id, map_index, map_max_concurrency
           ), edges AS (
               INSERT INTO task_edges (upstream_task_id, downstream_task_id, slot)
               SELECT c.id, %(parent)s,
                      CASE WHEN c.map_max_concurrency IS NULL THEN (c.map_index %% %(slots)s::int)::smallint END
               FROM children c
               RETURNING slot
           ), slots AS (
               -- each batch of children adds its own to the slots' counts
               INSERT INTO join_slots (task_id, slot, run_id, remaining)
               SELECT %(parent)s, e.slot, (SELECT p.run_id FROM p), count(*)::int
               FROM edges e WHERE e.slot IS NOT NULL GROUP BY e.slot
               ON CONFLICT (task_id, slot) DO UPDATE SET remaining = join_slots.remaining + EXCLUDED.remaining
           )
           SELECT count(*)::int AS n FROM edges""",
        {"parent": parent_id, "first": first, "last": last, "slots": join_slot_count(width)},
    ).fetchone()
    return 0 if row is None else int(row["n"])


def keep_node_inputs(conn: Connection, parent_id: uuid.UUID) -> None:
    """A map node's node inputs (its succeeded upstreams' output references), kept on it for its
    children's dispatch. Taken before the children are inserted: its edges are then only its
    upstreams'."""
    conn.execute(
        """UPDATE tasks t SET map_inputs = (
               SELECT COALESCE(jsonb_agg(jsonb_build_object(
                          'node_id', u.node_id, 'key', u.output->>'key',
                          'manifest', CASE WHEN u.kind = 'map' THEN u.output END)), '[]')
               FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
               WHERE e.downstream_task_id = t.id AND u.status = 'succeeded' AND u.output ? 'key')
           WHERE t.id = %s AND t.kind = 'map' AND t.status = 'ready' AND t.map_width IS NULL""",
        (parent_id,),
    )


def mark_expanded(conn: Connection, parent_id: uuid.UUID, width: int) -> bool:
    """The map node waits for its `width` children (width > 0): pending again, its unfinished
    count the children."""
    row = conn.execute(
        """UPDATE tasks t SET status = 'pending', map_width = %(width)s, unfinished_deps = %(width)s,
                  message = NULL
           WHERE t.id = %(parent)s AND t.kind = 'map' AND t.status = 'ready' AND t.map_width IS NULL
           RETURNING t.id""",
        {"parent": parent_id, "width": width},
    ).fetchone()
    return row is not None


def add_tasks_to_run(conn: Connection, run_id: uuid.UUID, count: int) -> None:
    """A map node's children join the run's unfinished tasks (in the transaction that made them)."""
    conn.execute(
        "UPDATE runs SET unfinished_tasks = unfinished_tasks + %s WHERE id = %s AND status = 'running'",
        (count, run_id),
    )


def children_counts(conn: Connection, parent_id: uuid.UUID) -> Row:
    row = conn.execute(
        """SELECT count(*)::int AS total,
                  count(*) FILTER (WHERE status = 'succeeded')::int AS succeeded,
                  count(*) FILTER (WHERE status = 'failed')::int AS failed,
                  count(*) FILTER (WHERE status IN ('skipped', 'cancelled'))::int AS skipped,
                  count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled'))::int
                      AS open
           FROM tasks WHERE map_parent_id = %s""",
        (parent_id,),
    ).fetchone()
    assert row is not None  # an aggregate always answers
    return row


def settle_map_node(
    conn: Connection, parent_id: uuid.UUID, *, status: str, width: int | None, output: dict[str, Any] | None,
    error: dict[str, Any] | None, message: str | None,
) -> Row | None:
    """The map node's outcome (succeeded | failed | skipped): one settle is one attempt, so the
    manifest of each settle has its own key. Returns the row settle_terminal takes."""
    return conn.execute(
        """UPDATE tasks SET status = %(status)s, attempt = attempt + 1, map_width = COALESCE(map_width, %(width)s),
                  output = %(output)s, error = %(error)s, message = %(message)s, finished_at = tw_now(),
                  available_at = tw_now()
           WHERE id = %(parent)s AND kind = 'map' AND status = 'ready'
           RETURNING id, run_id, node_id, version, status, attempt, on_failure, workspace_id, pipeline_id""",
        {"parent": parent_id, "status": status, "width": width,
         "output": None if output is None else Jsonb(output), "error": None if error is None else Jsonb(error),
         "message": message},
    ).fetchone()


def manifest_source(conn: Connection, parent_id: uuid.UUID) -> Row | None:
    """What a manifest is built from: the map node's identity, settle (attempt) and output."""
    return conn.execute(
        """SELECT id, run_id, workspace_id, pipeline_id, node_id, version, status, attempt, map_width, output
           FROM tasks WHERE id = %s AND kind = 'map'""",
        (parent_id,),
    ).fetchone()


def children_page(conn: Connection, parent_id: uuid.UUID, after_index: int, limit: int) -> list[Row]:
    """Children in index order after `after_index` (keyset on tasks_map_children_idx)."""
    return conn.execute(
        """SELECT map_index, status, output, error FROM tasks
           WHERE map_parent_id = %s AND map_index > %s ORDER BY map_index LIMIT %s""",
        (parent_id, after_index, limit),
    ).fetchall()
