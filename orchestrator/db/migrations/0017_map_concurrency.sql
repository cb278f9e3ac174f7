-- 0017: a map's max_concurrency (issue 19). `map: {max_concurrency: N}` bounds the children of a
-- map node out with workers (dispatched or running) to N, by the claim's limit mechanism
-- (0012): an expanded map node with a max_concurrency is a third kind of limited scope, beside
-- workspaces and pipelines with max_active_tasks.
--
-- The claim (tw_claim_ready_tasks), changed from 0014:
--   1. A row of kind 'map' is never claimed (no worker runs a map node; a ready one is expanded
--      or settled where it became ready, and the claim leaves it alone if a path did not).
--   2. After the workspaces and pipelines, the limited map nodes with ready children (pending,
--      expanded, map_max_concurrency set; a run's claim: only that run's) are locked in id order,
--      FOR UPDATE SKIP LOCKED. Their room is max_concurrency minus their children dispatched or
--      running, counted in a statement that starts after the lock was granted, so it sees every
--      claim committed by whoever held the map node before. A child of a limited map node this
--      claim did not lock is left for the next claim (the plain claim leaves out every child
--      with a map_max_concurrency, as it leaves out every task of a limited pipeline).
--   3. Candidates: the children of a limited map come from their map node (its first `room`
--      ready children, by arrival then item index: one probe of tasks_map_ready_children_idx
--      per locked map node), never from the run heads or the global head, so a map of 100,000
--      items at max_concurrency 5 neither fills a batch with children that cannot run nor
--      hides its run's other ready tasks (the run heads read tasks_ready_run_order_idx, now over
--      the ready tasks that are not limited children). The round-robin of 0014 is kept: the
--      map's children join their run's candidates and are ranked per run, then per workspace.
--   4. The candidates are kept while they fit before they are locked: ranked within their map
--      node, the survivors within their pipeline, those within their workspace, each kept while
--      its rank is within that scope's room (innermost scope first, so a task left out by one
--      limit does not take a place under another). The batch is then the first p_limit of them
--      in claim order, locked with SKIP LOCKED; a subset of rows that fit still fits.
--
-- Lock order (docs/reliability.md "Lock order"), and why the map node is taken SKIP LOCKED:
--   * The tick's claim waits only for scope rows (workspaces, then pipelines, in key order); it
--     never waits for a task row: map nodes and candidates are taken SKIP LOCKED.
--   * A callback locks its own task, then its successors in id order (a child's successor is its
--     map node), then the run row; its eager claim runs in that same transaction and then waits
--     for its run's workspace and pipeline rows (task rows before scope rows, as since 0012), and
--     the end of a run may lock pipeline rows too (queued runs, later triggers). A claim that
--     held a pipeline row and waited for a map node would close a cycle with such a callback
--     (callback: child, map node -> pipeline; claim: pipeline -> map node). SKIP LOCKED breaks
--     it: a map node held by a callback (a child finishing) is skipped, and that callback's own
--     eager claim, which already holds the map node (a transaction's own lock is never skipped),
--     counts the freed room and fills it.
--   * Repairs and cancel lock every task of a run in id order (the map node and its children
--     among them), then the run row, and may then lock pipeline rows (a queued run starting).
--     They may wait for a claim that holds the map node or a candidate; that claim waits for
--     nothing they hold, since it never waits for a task row.
--   So no wait-for cycle contains a claim: while a claim waits, it waits for a scope row and
--   holds only scope rows taken in key order (and task rows it took without waiting); whoever
--   holds task rows and waits for scope rows (an eager claim, a run's end, a cancel) is never
--   waited for by a claim through a task row. Claims queue on scope rows as before, in key order.
--   The room cannot be overshot by a skipped lock: a child is claimed only by a transaction
--   holding its map node's lock, and between that lock and the claim's commit no other claim
--   can take one of its children; other paths only take children out of dispatched/running.

-- The run heads and the loose scan over runs with ready work: the ready tasks a run's share
-- may take at once (not map nodes, not children of a limited map). Same name, new predicate;
-- only tw_claim_ready_tasks reads it.
DROP INDEX tasks_ready_run_order_idx;
CREATE INDEX tasks_ready_run_order_idx ON tasks (run_id, priority DESC, available_at)
    WHERE status = 'ready' AND kind <> 'map' AND map_max_concurrency IS NULL;

-- Expanded map nodes with a max_concurrency whose children are open (few: one per such map
-- node at work); empty when no map has a limit, so the idle claim pays one probe.
CREATE INDEX tasks_map_limited_idx ON tasks (run_id)
    WHERE kind = 'map' AND status = 'pending' AND map_width IS NOT NULL AND map_max_concurrency IS NOT NULL;

-- A limited map node's ready children, in the order they are claimed.
CREATE INDEX tasks_map_ready_children_idx ON tasks (map_parent_id, available_at, map_index)
    WHERE status = 'ready' AND map_parent_id IS NOT NULL AND map_max_concurrency IS NOT NULL;

-- A limited map node's children out with workers (its room): at most max_concurrency entries each.
CREATE INDEX tasks_map_active_children_idx ON tasks (map_parent_id)
    WHERE status IN ('dispatched', 'running') AND map_parent_id IS NOT NULL AND map_max_concurrency IS NOT NULL;

DROP FUNCTION tw_claim_ready_tasks(integer, uuid);

CREATE FUNCTION tw_claim_ready_tasks(p_limit integer, p_run_id uuid)
    RETURNS TABLE (id uuid, run_id uuid, workspace_id text, pipeline_id text, node_id text,
                   version text, kind text, task_name text, params jsonb, transport text, attempt integer,
                   claim_token uuid, heartbeat_s integer, timeout_s integer, lease_expires_at timestamptz,
                   dispatched_at timestamptz)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
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
          AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = w.id AND t.status = 'ready')
        ORDER BY w.id FOR UPDATE OF w
    ) x;
    SELECT COALESCE(array_agg(x.workspace_id ORDER BY x.workspace_id, x.id), '{}'),
           COALESCE(array_agg(x.id ORDER BY x.workspace_id, x.id), '{}')
      INTO locked_p_ws, locked_p FROM (
        SELECT p.workspace_id, p.id FROM pipelines p
        WHERE p.max_active_tasks IS NOT NULL AND (v_ws IS NULL OR (p.workspace_id = v_ws AND p.id = v_p))
          AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = p.workspace_id AND t.pipeline_id = p.id
                                              AND t.status = 'ready')
        ORDER BY p.workspace_id, p.id FOR UPDATE OF p
    ) x;
    -- Limited map nodes with ready children, in id order, never waited for (see the header).
    IF p_run_id IS NULL THEN
        SELECT COALESCE(array_agg(x.id ORDER BY x.id), '{}') INTO locked_m FROM (
            SELECT m.id FROM tasks m
            WHERE m.kind = 'map' AND m.status = 'pending' AND m.map_width IS NOT NULL
              AND m.map_max_concurrency IS NOT NULL
              AND EXISTS (SELECT 1 FROM tasks c WHERE c.map_parent_id = m.id AND c.status = 'ready'
                                                  AND c.map_parent_id IS NOT NULL
                                                  AND c.map_max_concurrency IS NOT NULL)
            ORDER BY m.id FOR UPDATE OF m SKIP LOCKED
        ) x;
    ELSE
        SELECT COALESCE(array_agg(x.id ORDER BY x.id), '{}') INTO locked_m FROM (
            SELECT m.id FROM tasks m
            WHERE m.run_id = p_run_id AND m.kind = 'map' AND m.status = 'pending' AND m.map_width IS NOT NULL
              AND m.map_max_concurrency IS NOT NULL
              AND EXISTS (SELECT 1 FROM tasks c WHERE c.map_parent_id = m.id AND c.status = 'ready'
                                                  AND c.map_parent_id IS NOT NULL
                                                  AND c.map_max_concurrency IS NOT NULL)
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
            WHERE t.status = 'ready' AND t.kind <> 'map' AND t.map_max_concurrency IS NULL
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
            WHERE t.id = ANY (ARRAY(SELECT l.id FROM locked l)) AND t.status = 'ready' AND t.kind <> 'map'
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
        WHERE t.status = 'ready' AND t.kind <> 'map'
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
        WHERE t.status = 'ready' AND t.kind <> 'map'
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
        WHERE t.id = ANY (ARRAY(SELECT l.id FROM locked l)) AND t.status = 'ready' AND t.kind <> 'map'
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
