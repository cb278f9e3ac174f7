-- 0031: the dispatch context is read from the claimed tasks outward, whatever the statistics say.
--
-- tw_dispatch_context_of (0030, 0019's query) joined the claimed tasks to their upstreams and to
-- their map nodes, and left the join's order to the planner. Its plans are generic (made once per
-- connection, force_generic_plan), so the planner does not know how many tasks are claimed, and
-- two plans it made read across the whole table for each callback of a capped map's item:
--   - with fresh statistics, the upstreams' part was driven from `tasks u` (status 'succeeded'
--     AND output ? 'key', whose selectivity the planner guesses at 0.1 %): a scan of every task,
--     probing task_edges for each succeeded one. Capped map of 2,000 items, 800 done: 2,003 rows
--     read and 800 probes for one item's context (custom plan: one probe);
--   - with statistics taken before the map expanded, the map's part was driven from the map node
--     to its children (tasks_map_children_idx): every item of the map, twice per callback.
-- Per item of a capped map, index entries read grew with its width (1,000 items: ~2,000;
-- 4,000 items: ~8,000), so a map's items cost O(width) each and the map O(width^2).
--
-- Each part now starts from the claimed ids (unnest) and reaches every other row through a
-- LATERAL subquery fenced with OFFSET 0, which the planner may not pull up or reorder: a task by
-- its key, its upstream edges by task_edges_downstream_idx (an equality on its first column, so
-- a skip scan of task_edges_pkey is never the cheaper way in), the upstream and the map node by
-- their keys. O(1) rows per claimed task on any statistics. Same rows and the same answer; a
-- claimed id given twice (never, from the claims) would be described twice.
-- CREATE OR REPLACE keeps it LANGUAGE sql, STABLE, not STRICT and without settings: still inlined.
--
-- The scope-aware claim (tw_claim_ready_tasks, 0017), which fills a capped map's room after each
-- of its items' callbacks, locks the capped map nodes that have a ready child. It asked with
-- EXISTS, which both tasks_map_ready_children_idx (the ready children, in claim order) and
-- tasks_map_children_idx (all children, in index order) answer with their first matching entry.
-- With statistics taken while every child was ready the two cost the same, and the planner took
-- the one of all children: it then reads the finished children before the first ready one, half
-- the map on average, per callback (4,000 items: 2,001 entries per item). It now asks for the
-- first ready child in claim order (ORDER BY available_at, map_index LIMIT 1), which only the
-- ready children's index gives without a sort: that index on any statistics.
CREATE OR REPLACE FUNCTION tw_dispatch_context_of(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb, maps jsonb)
    LANGUAGE sql STABLE
AS $$
SELECT
    (SELECT COALESCE(jsonb_agg(x.ref), '[]') FROM (
        SELECT jsonb_build_object('task_id', c.id, 'node_id', u.node_id, 'key', u.output->>'key',
                                  'manifest', CASE WHEN u.kind = 'map' THEN u.output END) AS ref
        FROM unnest(p_task_ids) AS c(id)
        CROSS JOIN LATERAL (SELECT e.upstream_task_id FROM task_edges e
                            WHERE e.downstream_task_id = c.id OFFSET 0) e
        CROSS JOIN LATERAL (SELECT u.node_id, u.output, u.kind FROM tasks u
                            WHERE u.id = e.upstream_task_id AND u.status = 'succeeded' AND u.output ? 'key'
                            OFFSET 0) u
        UNION ALL
        SELECT jsonb_build_object('task_id', c.id, 'node_id', i->>'node_id', 'key', i->>'key',
                                  'manifest', i->'manifest')
        FROM unnest(p_task_ids) AS c(id)
        CROSS JOIN LATERAL (SELECT t.map_parent_id FROM tasks t WHERE t.id = c.id OFFSET 0) t
        CROSS JOIN LATERAL (SELECT p.map_inputs FROM tasks p WHERE p.id = t.map_parent_id OFFSET 0) p
        CROSS JOIN LATERAL jsonb_array_elements(COALESCE(p.map_inputs, '[]')) AS i
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
                'transport', w.transport, 'endpoint', w.endpoint, 'service', w.service)), '[]')
     FROM worker_tasks wt JOIN workers w ON w.workspace_id = wt.workspace_id AND w.service = wt.service
     WHERE (wt.workspace_id, wt.task_name) IN (SELECT * FROM unnest(p_workspaces, p_task_names))),
    (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                'task_id', c.id, 'index', t.map_index, 'item', t.map_item, 'count', p.map_width)), '[]')
     FROM unnest(p_task_ids) AS c(id)
     CROSS JOIN LATERAL (SELECT t.map_index, t.map_item, t.map_parent_id FROM tasks t WHERE t.id = c.id OFFSET 0) t
     CROSS JOIN LATERAL (SELECT p.map_width FROM tasks p WHERE p.id = t.map_parent_id OFFSET 0) p)
$$;
--
-- Once chosen, the candidates were taken (locked, then claimed) by id `AND status = 'ready'`,
-- the predicate of the ready tasks' partial indexes: the trap 0029 took out of the finish. A
-- plan made while few tasks were ready scans a whole partial index of the ready tasks, filtered
-- by id; a capped map's waiting items are all ready, so with statistics taken before the map
-- expanded each callback read every waiting item, three times (4,000 items: 4,208 entries of
-- tasks_ready_run_idx per item). Those statements now compare status with a variable, a
-- parameter to the plan from which no partial index's predicate can be proved: they take the
-- candidates by key. The queries that choose the candidates are unchanged; they need the
-- partial indexes, in their order.
--
-- The same claim first locks the limited workspaces and pipelines that have ready tasks. It asked
-- `max_active_tasks IS NOT NULL AND EXISTS (a ready task of it)`, which the planner may turn into
-- a semi-join from the ready tasks: every ready task read (hashed) before the scopes are looked
-- at, even when no scope has a limit. A capped map's waiting items are ready, so each of its
-- callbacks read them all, twice (400 items: 802 entries of tasks_ready_run_idx per callback,
-- with statistics taken after the expansion). The question is now a subquery with LIMIT 1,
-- which is not made a join: run for each limited scope, after its other conditions.

CREATE OR REPLACE FUNCTION tw_claim_ready_tasks(p_limit integer, p_run_id uuid)
    RETURNS TABLE (id uuid, run_id uuid, workspace_id text, pipeline_id text, node_id text,
                   version text, kind text, task_name text, params jsonb, transport text, attempt integer,
                   claim_token uuid, heartbeat_s integer, timeout_s integer, lease_expires_at timestamptz,
                   dispatched_at timestamptz)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
-- 0017's function, its limited scopes and map nodes found by a subquery each, and its candidates
-- taken by their key (see the top of 0031).
DECLARE
    v_ws text;
    v_p text;
    locked_ws text[];
    locked_p_ws text[];
    locked_p text[];
    locked_m uuid[];
    cand uuid[];
    v_now timestamptz := tw_now();
    v_start uuid := gen_random_uuid();
    v_ready text[] := ARRAY['ready'];  -- a parameter to the plans that take candidates by key (0031)
BEGIN
    IF p_run_id IS NOT NULL THEN
        SELECT r.workspace_id, r.pipeline_id INTO v_ws, v_p FROM runs r WHERE r.id = p_run_id;
        IF v_ws IS NULL THEN
            RETURN;
        END IF;
    END IF;
    -- Limited scopes with ready work, locked in key order (a run's claim: only its own).
    SELECT COALESCE(array_agg(x.id ORDER BY x.id), '{}') INTO locked_ws FROM (
        SELECT w.id FROM workspaces w
        WHERE w.max_active_tasks IS NOT NULL AND (v_ws IS NULL OR w.id = v_ws)
          -- a subquery per limited workspace, not EXISTS (see the top of 0031)
          AND (SELECT true FROM tasks t WHERE t.workspace_id = w.id AND t.status = 'ready' LIMIT 1)
        ORDER BY w.id FOR UPDATE OF w
    ) x;
    SELECT COALESCE(array_agg(x.workspace_id ORDER BY x.workspace_id, x.id), '{}'),
           COALESCE(array_agg(x.id ORDER BY x.workspace_id, x.id), '{}')
      INTO locked_p_ws, locked_p FROM (
        SELECT p.workspace_id, p.id FROM pipelines p
        WHERE p.max_active_tasks IS NOT NULL AND (v_ws IS NULL OR (p.workspace_id = v_ws AND p.id = v_p))
          AND (SELECT true FROM tasks t WHERE t.workspace_id = p.workspace_id AND t.pipeline_id = p.id
                                          AND t.status = 'ready' LIMIT 1)
        ORDER BY p.workspace_id, p.id FOR UPDATE OF p
    ) x;
    -- Limited map nodes with ready children, in id order, never waited for (see the header).
    IF p_run_id IS NULL THEN
        SELECT COALESCE(array_agg(x.id ORDER BY x.id), '{}') INTO locked_m FROM (
            SELECT m.id FROM tasks m
            WHERE m.kind = 'map' AND m.status = 'pending' AND m.map_width IS NOT NULL
              AND m.map_max_concurrency IS NOT NULL
              -- its first ready child in claim order (see the top of 0031), not EXISTS
              AND (SELECT c.id FROM tasks c WHERE c.map_parent_id = m.id AND c.status = 'ready'
                                               AND c.map_parent_id IS NOT NULL
                                               AND c.map_max_concurrency IS NOT NULL
                   ORDER BY c.available_at, c.map_index LIMIT 1) IS NOT NULL
            ORDER BY m.id FOR UPDATE OF m SKIP LOCKED
        ) x;
    ELSE
        SELECT COALESCE(array_agg(x.id ORDER BY x.id), '{}') INTO locked_m FROM (
            SELECT m.id FROM tasks m
            WHERE m.run_id = p_run_id AND m.kind = 'map' AND m.status = 'pending' AND m.map_width IS NOT NULL
              AND m.map_max_concurrency IS NOT NULL
              -- its first ready child in claim order (see the top of 0031), not EXISTS
              AND (SELECT c.id FROM tasks c WHERE c.map_parent_id = m.id AND c.status = 'ready'
                                               AND c.map_parent_id IS NOT NULL
                                               AND c.map_max_concurrency IS NOT NULL
                   ORDER BY c.available_at, c.map_index LIMIT 1) IS NOT NULL
            ORDER BY m.id FOR UPDATE OF m SKIP LOCKED
        ) x;
    END IF;

    -- The candidates, in claim order (a new statement: it sees everything committed before).
    IF p_run_id IS NOT NULL THEN
        WITH own AS (
            SELECT t.id, t.priority, t.available_at, t.map_index FROM tasks t
            WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
              AND t.run_id = p_run_id AND t.available_at <= v_now
            ORDER BY t.priority DESC, t.available_at
            LIMIT 2 * p_limit
        ), children AS (
            -- each locked map node's first children, as many as it has room for
            SELECT h.id, h.priority, h.available_at, h.map_index
            FROM tasks m
            CROSS JOIN LATERAL (
                SELECT m.map_max_concurrency - count(*) AS n FROM tasks a
                WHERE a.map_parent_id = m.id AND a.status IN ('dispatched', 'running')
                  AND a.map_parent_id IS NOT NULL AND a.map_max_concurrency IS NOT NULL
            ) r
            CROSS JOIN LATERAL (
                SELECT c.id, c.priority, c.available_at, c.map_index FROM tasks c
                WHERE c.map_parent_id = m.id AND c.status = 'ready' AND c.map_parent_id IS NOT NULL
                  AND c.map_max_concurrency IS NOT NULL AND c.available_at <= v_now
                ORDER BY c.available_at, c.map_index
                LIMIT LEAST(GREATEST(r.n, 0), 2 * p_limit)
            ) h
            WHERE m.id = ANY (locked_m)
        )
        SELECT COALESCE(array_agg(x.id ORDER BY x.priority DESC, x.available_at, x.map_index, x.id), '{}')
          INTO cand
        FROM (SELECT * FROM own UNION ALL SELECT * FROM children) x;
    ELSE
        -- The runs with ready work, by a loose index scan, at most 4 x p_limit of them from a
        -- random point of the run ids (wrapping around): more runs than that cannot all get a
        -- task in one batch anyway, and the random start spreads the batches over all of them.
        WITH RECURSIVE after_start(run_id, workspace_id, n) AS (
            (SELECT t.run_id, t.workspace_id, 1 FROM tasks t
             WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
               AND t.run_id >= v_start ORDER BY t.run_id LIMIT 1)
            UNION ALL
            SELECT nxt.run_id, nxt.workspace_id, a.n + 1 FROM after_start a
            CROSS JOIN LATERAL (SELECT t.run_id, t.workspace_id FROM tasks t
                                WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
                                  AND t.run_id > a.run_id
                                ORDER BY t.run_id LIMIT 1) nxt
            WHERE a.n < 4 * p_limit
        ), before_start(run_id, workspace_id, n) AS (
            (SELECT t.run_id, t.workspace_id, 1 FROM tasks t
             WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
               AND t.run_id < v_start ORDER BY t.run_id LIMIT 1)
            UNION ALL
            SELECT nxt.run_id, nxt.workspace_id, b.n + 1 FROM before_start b
            CROSS JOIN LATERAL (SELECT t.run_id, t.workspace_id FROM tasks t
                                WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
                                  AND t.run_id > b.run_id AND t.run_id < v_start
                                ORDER BY t.run_id LIMIT 1) nxt
            WHERE b.n < 4 * p_limit - (SELECT count(*) FROM after_start)
        ), ready_in AS (
            SELECT run_id, workspace_id FROM after_start
            UNION ALL
            SELECT run_id, workspace_id FROM before_start WHERE (SELECT count(*) FROM after_start) < 4 * p_limit
        ), shares AS (
            -- each workspace an equal share of the batch, each of its runs an equal part of it
            -- (twice over, so that rows other claimers hold leave the batch full)
            SELECT i.run_id,
                   GREATEST(1, ceil(2.0 * p_limit / ((SELECT count(DISTINCT w.workspace_id) FROM ready_in w)
                                                     * count(*) OVER (PARTITION BY i.workspace_id)))::int) AS k
            FROM ready_in i
        ), heads AS (
            SELECT h.id, h.run_id, h.workspace_id, h.priority, h.available_at, h.map_index
            FROM shares s
            CROSS JOIN LATERAL (
                SELECT t.id, t.run_id, t.workspace_id, t.priority, t.available_at, t.map_index FROM tasks t
                WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
                  AND t.run_id = s.run_id AND t.available_at <= v_now
                ORDER BY t.priority DESC, t.available_at
                LIMIT s.k
            ) h
        ), fill AS (
            -- the global head in arrival order; limited children (taken from their map node
            -- below) and map nodes are dropped after the limit, so the scan stays bounded
            SELECT f.id, f.run_id, f.workspace_id, f.priority, f.available_at, f.map_index FROM (
                SELECT t.id, t.run_id, t.workspace_id, t.priority, t.available_at, t.map_index, t.kind,
                       t.map_max_concurrency
                FROM tasks t
                WHERE t.status = 'ready' AND t.available_at <= v_now
                ORDER BY t.priority DESC, t.available_at
                LIMIT 2 * p_limit
            ) f
            WHERE f.kind <> 'map' AND f.map_max_concurrency IS NULL
        ), children AS (
            -- each locked map node's first children, as many as it has room for
            SELECT h.id, h.run_id, h.workspace_id, h.priority, h.available_at, h.map_index
            FROM tasks m
            CROSS JOIN LATERAL (
                SELECT m.map_max_concurrency - count(*) AS n FROM tasks a
                WHERE a.map_parent_id = m.id AND a.status IN ('dispatched', 'running')
                  AND a.map_parent_id IS NOT NULL AND a.map_max_concurrency IS NOT NULL
            ) r
            CROSS JOIN LATERAL (
                SELECT c.id, c.run_id, c.workspace_id, c.priority, c.available_at, c.map_index FROM tasks c
                WHERE c.map_parent_id = m.id AND c.status = 'ready' AND c.map_parent_id IS NOT NULL
                  AND c.map_max_concurrency IS NOT NULL AND c.available_at <= v_now
                ORDER BY c.available_at, c.map_index
                LIMIT LEAST(GREATEST(r.n, 0), 2 * p_limit)
            ) h
            WHERE m.id = ANY (locked_m)
        ), pool AS (
            SELECT * FROM heads UNION SELECT * FROM fill UNION SELECT * FROM children
        ), by_run AS (
            SELECT p.*, row_number() OVER (PARTITION BY p.run_id
                                           ORDER BY p.priority DESC, p.available_at, p.map_index) AS run_rank
            FROM pool p
        ), by_workspace AS (
            SELECT b.*, row_number() OVER (PARTITION BY b.workspace_id, b.priority
                                           ORDER BY b.run_rank, b.available_at, b.id) AS ws_rank
            FROM by_run b
        )
        SELECT COALESCE(array_agg(x.id ORDER BY x.priority DESC, x.ws_rank, x.available_at, x.id), '{}') INTO cand
        FROM by_workspace x;
    END IF;

    IF cardinality(locked_ws) = 0 AND cardinality(locked_p) = 0 AND cardinality(locked_m) = 0 THEN
        -- No limited scope has ready work: the plain claim, leaving out every task of a
        -- limited scope (one that became ready since the lock statements waits for a claim
        -- that holds its lock), every child of a limited map node, and map nodes.
        RETURN QUERY
        WITH c AS (
            SELECT u.cid, u.ord FROM unnest(cand) WITH ORDINALITY AS u(cid, ord)
        ), locked AS (
            SELECT t.id FROM tasks t JOIN c ON c.cid = t.id
            WHERE t.status = ANY (v_ready) AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
              AND NOT EXISTS (SELECT 1 FROM workspaces w
                              WHERE w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL)
              AND NOT EXISTS (SELECT 1 FROM pipelines p WHERE p.workspace_id = t.workspace_id
                              AND p.id = t.pipeline_id AND p.max_active_tasks IS NOT NULL)
            ORDER BY c.ord
            LIMIT p_limit
            FOR UPDATE OF t SKIP LOCKED
        ), claimed AS (
            UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
                   claim_token = gen_random_uuid(), dispatched_at = tw_now(),
                   lease_expires_at = LEAST(
                       tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                       tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
                   progress = NULL, message = NULL
            WHERE t.id = ANY (ARRAY(SELECT l.id FROM locked l)) AND t.status = ANY (v_ready) AND t.kind <> 'map'
            RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                      t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                      t.timeout_s, t.lease_expires_at, t.dispatched_at
        ), attempts AS (
            INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
            SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM claimed c
        )
        SELECT c.* FROM claimed c;
        RETURN;
    END IF;

    -- Some limited scope has ready work. A new statement, so a new snapshot: the active counts
    -- include every claim committed by the transactions that held these scope locks before us.
    RETURN QUERY
    WITH active AS (
        SELECT t.workspace_id, t.pipeline_id, count(*) AS n FROM tasks t
        WHERE t.status IN ('dispatched', 'running')
          AND (t.workspace_id = ANY (locked_ws) OR t.workspace_id = ANY (locked_p_ws))
        GROUP BY t.workspace_id, t.pipeline_id
    ), room_ws AS (
        SELECT w.id AS workspace_id,
               w.max_active_tasks - COALESCE((SELECT sum(a.n) FROM active a WHERE a.workspace_id = w.id), 0) AS n
        FROM workspaces w WHERE w.id = ANY (locked_ws)
    ), room_p AS (
        SELECT p.workspace_id, p.id AS pipeline_id,
               p.max_active_tasks - COALESCE((SELECT sum(a.n) FROM active a
                                              WHERE a.workspace_id = p.workspace_id AND a.pipeline_id = p.id), 0) AS n
        FROM pipelines p JOIN unnest(locked_p_ws, locked_p) AS l(ws, pid) ON p.workspace_id = l.ws AND p.id = l.pid
    ), room_m AS (
        SELECT m.id AS map_id,
               m.map_max_concurrency - (SELECT count(*) FROM tasks a
                                        WHERE a.map_parent_id = m.id AND a.status IN ('dispatched', 'running')
                                          AND a.map_parent_id IS NOT NULL
                                          AND a.map_max_concurrency IS NOT NULL) AS n
        FROM tasks m WHERE m.id = ANY (locked_m)
    ), c AS (
        SELECT u.cid, u.ord FROM unnest(cand) WITH ORDINALITY AS u(cid, ord)
    ), pre AS (
        -- candidates of a scope with room (a limited scope this claim did not lock has none)
        SELECT t.id, t.workspace_id, t.pipeline_id, t.map_parent_id, c.ord,
               w.id IS NOT NULL AS ws_limited, p.id IS NOT NULL AS p_limited,
               t.map_max_concurrency IS NOT NULL AS m_limited
        FROM tasks t
        JOIN c ON c.cid = t.id
        LEFT JOIN workspaces w ON w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL
        LEFT JOIN pipelines p ON p.workspace_id = t.workspace_id AND p.id = t.pipeline_id
                             AND p.max_active_tasks IS NOT NULL
        WHERE t.status = ANY (v_ready) AND t.kind <> 'map'
          AND (w.id IS NULL OR EXISTS (SELECT 1 FROM room_ws r WHERE r.workspace_id = w.id AND r.n > 0))
          AND (p.id IS NULL OR EXISTS (SELECT 1 FROM room_p r WHERE r.workspace_id = p.workspace_id
                                       AND r.pipeline_id = p.id AND r.n > 0))
          AND (t.map_max_concurrency IS NULL OR EXISTS (SELECT 1 FROM room_m r
                                                         WHERE r.map_id = t.map_parent_id AND r.n > 0))
    ), fit_map AS (
        SELECT x.* FROM (
            SELECT q.*, row_number() OVER (PARTITION BY q.map_parent_id ORDER BY q.ord) AS k FROM pre q
        ) x LEFT JOIN room_m r ON r.map_id = x.map_parent_id
        WHERE NOT x.m_limited OR x.k <= r.n
    ), fit_pipeline AS (
        SELECT x.* FROM (
            SELECT q.id, q.workspace_id, q.pipeline_id, q.ord, q.ws_limited, q.p_limited,
                   row_number() OVER (PARTITION BY q.workspace_id, q.pipeline_id ORDER BY q.ord) AS k
            FROM fit_map q
        ) x LEFT JOIN room_p r ON r.workspace_id = x.workspace_id AND r.pipeline_id = x.pipeline_id
        WHERE NOT x.p_limited OR x.k <= r.n
    ), fit AS (
        SELECT x.id, x.ord FROM (
            SELECT q.id, q.workspace_id, q.ord, q.ws_limited,
                   row_number() OVER (PARTITION BY q.workspace_id ORDER BY q.ord) AS k
            FROM fit_pipeline q
        ) x LEFT JOIN room_ws r ON r.workspace_id = x.workspace_id
        WHERE NOT x.ws_limited OR x.k <= r.n
    ), locked AS (
        -- the batch, in claim order; rows other claimers hold are skipped (fewer still fit)
        SELECT t.id FROM tasks t JOIN fit f ON f.id = t.id
        WHERE t.status = ANY (v_ready) AND t.kind <> 'map'
        ORDER BY f.ord
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), claimed AS (
        UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
               claim_token = gen_random_uuid(), dispatched_at = tw_now(),
               lease_expires_at = LEAST(
                   tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                   tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
               progress = NULL, message = NULL
        WHERE t.id = ANY (ARRAY(SELECT l.id FROM locked l)) AND t.status = ANY (v_ready) AND t.kind <> 'map'
        RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                  t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                  t.timeout_s, t.lease_expires_at, t.dispatched_at
    ), attempts AS (
        INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
        SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM claimed c
    )
    SELECT c.* FROM claimed c;
END
$$;
