-- 0016: dynamic fan-out (issue 19). A node with `map:` runs once per item of a list found at run
-- time (an upstream's output, or a param).
--
-- A mapped node is one task row of kind 'map' per data version (the "map node"), which no worker
-- runs. When its upstreams are done and its trigger rule holds, it is expanded: one child task per
-- item (kind 'task', `map_parent_id` naming the map node, `map_index` its position in the list,
-- `map_item` the item), inserted in bulk, each child an upstream of the map node in task_edges. So
-- the map node is pending again, its `unfinished_deps` counting its open children, and the
-- counters, the recount of the repairs and the invariant checker cover children like any other
-- upstream. When the last child settles, the map node settles: succeeded when the failed children
-- are within `tolerated_failures`, failed beyond; its output is the manifest of its children's
-- outputs (a new `attempt` per settle, so a re-settled node never overwrites a manifest a
-- downstream task read).
--
-- The items of a map over an upstream's output are read from the stored output outside any
-- transaction, when the callback of that upstream reports success (the upstream's
-- `map_targets` says which map nodes read which path of it), and kept in map_items by the
-- transaction that records the success: the expansion, whenever the map node becomes ready,
-- reads them from there, so no path that may expand a map node needs the object store.

ALTER TABLE tasks DROP CONSTRAINT tasks_kind_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_kind_check CHECK (kind IN ('task', 'approval', 'manual', 'map'));

ALTER TABLE tasks ADD COLUMN map_index integer NOT NULL DEFAULT -1;   -- a child's item index; -1 otherwise
ALTER TABLE tasks ADD COLUMN map_parent_id uuid REFERENCES tasks (id); -- a child's map node
ALTER TABLE tasks ADD COLUMN map_item jsonb;                           -- a child's item
ALTER TABLE tasks ADD COLUMN map_spec jsonb;                           -- a map node's `map:` (normalized)
ALTER TABLE tasks ADD COLUMN map_width integer;                        -- a map node's children; NULL until expanded
ALTER TABLE tasks ADD COLUMN map_max_concurrency integer;              -- on a map node and each of its children
ALTER TABLE tasks ADD COLUMN map_targets jsonb;                        -- on a task mapped over: [{parent, path}]
ALTER TABLE tasks ADD COLUMN map_inputs jsonb;                         -- a map node's node inputs, for its children

-- Children share their map node's (run, node, version); the item index tells them apart.
ALTER TABLE tasks DROP CONSTRAINT tasks_run_id_node_id_version_key;
ALTER TABLE tasks ADD CONSTRAINT tasks_run_node_version_item_key UNIQUE (run_id, node_id, version, map_index);

-- A map node's children in index order (the manifest, the settle count, the paged list).
CREATE INDEX tasks_map_children_idx ON tasks (map_parent_id, map_index) WHERE map_parent_id IS NOT NULL;

-- Map nodes a path left 'ready' (the tick's safety net expands or settles them).
CREATE INDEX tasks_map_ready_idx ON tasks (run_id) WHERE kind = 'map' AND status = 'ready';

CREATE TABLE map_items (
    parent_task_id  uuid PRIMARY KEY REFERENCES tasks (id),
    source_task_id  uuid REFERENCES tasks (id),          -- the upstream mapped over; NULL for params
    items           jsonb,                                -- the list, as found
    problem         text,                                 -- why there is no list (the map node fails)
    created_at      timestamptz NOT NULL DEFAULT tw_now(),
    CHECK ((items IS NULL) <> (problem IS NULL))
);

-- tw_finish_attempt also returns map_targets: a success of a task mapped over has its items read
-- and kept before it commits (see worker_protocol).
DROP FUNCTION tw_finish_attempt(uuid, integer, uuid, boolean, boolean, jsonb, jsonb);
CREATE FUNCTION tw_finish_attempt(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb
) RETURNS TABLE (id uuid, run_id uuid, node_id text, version text, status text, attempt integer,
                 on_failure text, workspace_id text, pipeline_id text, output_names text[], map_targets jsonb)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH finished AS (
        UPDATE tasks t SET
            status = CASE WHEN p_ok THEN 'succeeded'
                          WHEN p_retryable AND t.attempt < t.max_attempts THEN 'ready'
                          ELSE 'dead' END,
            available_at = CASE WHEN NOT p_ok AND p_retryable AND t.attempt < t.max_attempts
                THEN tw_now() + make_interval(secs => LEAST(
                         COALESCE((t.retry->>'max_delay_s')::float8, 300),
                         COALESCE((t.retry->>'base_delay_s')::float8, 5)
                           * CASE WHEN t.retry->>'backoff' = 'fixed' THEN 1 ELSE power(2, t.attempt - 1) END)
                       * CASE WHEN t.retry->>'jitter' = 'full' THEN random() ELSE 1 END)
                ELSE t.available_at END,
            finished_at = CASE WHEN p_ok OR NOT p_retryable OR t.attempt >= t.max_attempts
                               THEN tw_now() END,
            output = CASE WHEN p_ok THEN p_output ELSE t.output END,
            error = CASE WHEN p_ok THEN NULL ELSE p_error END,
            lease_expires_at = NULL, claim_token = NULL
        WHERE t.id = p_task_id AND t.attempt = p_attempt AND t.claim_token = p_claim_token
          AND t.status IN ('dispatched', 'running')
        RETURNING t.id, t.run_id, t.node_id, t.version, t.status, t.attempt, t.on_failure, t.workspace_id,
                  t.pipeline_id, t.output_names, t.map_targets
    )
    SELECT * FROM finished;
END
$$;

-- The successor transition of one upstream, map-aware: a map node whose last upstream finished
-- becomes 'ready' (to be expanded, or, once expanded, settled, in the same transaction:
-- orchestrator/engine/mapping.py) when its rule holds; an expanded map node's children are its
-- upstreams too, and it settles whatever they did (tolerated_failures decides, not the rule).
-- Returns kind, so the caller knows which rows are map nodes to resolve.
DROP FUNCTION tw_advance_successors(uuid, integer, integer);
CREATE FUNCTION tw_advance_successors(p_upstream uuid, p_failed integer, p_skipped integer)
    RETURNS TABLE (id uuid, node_id text, status text, kind text)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH locked AS (
        SELECT t.id FROM tasks t JOIN task_edges e ON e.downstream_task_id = t.id
        WHERE e.upstream_task_id = p_upstream AND t.status = 'pending'
        ORDER BY t.id
        FOR UPDATE OF t
    ), advanced AS (
        UPDATE tasks t SET
            unfinished_deps = t.unfinished_deps - 1,
            failed_deps = t.failed_deps + p_failed,
            skipped_deps = t.skipped_deps + p_skipped,
            status = CASE
                WHEN t.unfinished_deps - 1 > 0 THEN 'pending'
                WHEN t.map_width IS NOT NULL OR CASE t.trigger_rule
                         WHEN 'all_done' THEN true
                         WHEN 'none_failed' THEN t.failed_deps + p_failed = 0
                         WHEN 'one_failed' THEN t.failed_deps + p_failed > 0
                         ELSE t.skipped_deps + p_skipped = 0
                     END THEN CASE WHEN t.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END
                ELSE 'skipped' END,
            available_at = tw_now(),
            wait_expires_at = CASE WHEN t.kind IN ('approval', 'manual') AND t.timeout_s IS NOT NULL
                                   THEN tw_now() + make_interval(secs => t.timeout_s) END,
            finished_at = CASE
                WHEN t.unfinished_deps - 1 > 0 THEN NULL
                WHEN t.map_width IS NOT NULL OR CASE t.trigger_rule
                         WHEN 'all_done' THEN true
                         WHEN 'none_failed' THEN t.failed_deps + p_failed = 0
                         WHEN 'one_failed' THEN t.failed_deps + p_failed > 0
                         ELSE t.skipped_deps + p_skipped = 0
                     END THEN NULL
                ELSE tw_now() END
        FROM locked
        WHERE t.id = locked.id AND t.status = 'pending'
        RETURNING t.id, t.node_id, t.status, t.kind
    )
    SELECT * FROM advanced;
END
$$;

-- The dispatch context (0011) for children too: a child's node inputs are its map node's (kept
-- on the map node when it was expanded, so a child's dispatch never reads the map node's edges,
-- which include every child), its item, index and the map's width are in `maps`, and an input
-- from a map node carries its manifest reference.
DROP FUNCTION tw_dispatch_context(uuid[], text[], text[]);
CREATE FUNCTION tw_dispatch_context(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb, maps jsonb)
    LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT
        (SELECT COALESCE(jsonb_agg(x.ref), '[]') FROM (
            SELECT jsonb_build_object('task_id', e.downstream_task_id, 'node_id', u.node_id,
                                      'key', u.output->>'key',
                                      'manifest', CASE WHEN u.kind = 'map' THEN u.output END) AS ref
            FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
            WHERE e.downstream_task_id = ANY(p_task_ids) AND u.status = 'succeeded' AND u.output ? 'key'
            UNION ALL
            SELECT jsonb_build_object('task_id', t.id, 'node_id', i->>'node_id', 'key', i->>'key',
                                      'manifest', i->'manifest')
            FROM tasks t JOIN tasks p ON p.id = t.map_parent_id
                 CROSS JOIN LATERAL jsonb_array_elements(COALESCE(p.map_inputs, '[]')) AS i
            WHERE t.id = ANY(p_task_ids)
         ) x),
        (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                    'task_id', t.id, 'pipeline', i.upstream_pipeline_id, 'output', i.output,
                    'run_id', i.source_run_id, 'mode', i.mode, 'key', po.key, 'sha256', po.sha256,
                    'size', po.size)), '[]')
         FROM tasks t JOIN run_inputs i ON i.run_id = t.run_id AND i.version = t.version
              JOIN pipeline_outputs po ON po.id = i.output_id
         WHERE t.id = ANY(p_task_ids)),
        (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                    'workspace_id', wt.workspace_id, 'task_name', wt.task_name, 'code_hash', wt.code_hash,
                    'transport', w.transport, 'endpoint', w.endpoint)), '[]')
         FROM worker_tasks wt JOIN workers w ON w.workspace_id = wt.workspace_id AND w.service = wt.service
         WHERE (wt.workspace_id, wt.task_name) IN (SELECT * FROM unnest(p_workspaces, p_task_names))),
        (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                    'task_id', t.id, 'index', t.map_index, 'item', t.map_item, 'count', p.map_width)), '[]')
         FROM tasks t JOIN tasks p ON p.id = t.map_parent_id
         WHERE t.id = ANY(p_task_ids));
END
$$;
