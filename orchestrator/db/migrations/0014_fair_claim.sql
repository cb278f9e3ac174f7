-- 0014: fair claims (issue 17). The claim took ready tasks in arrival order, so a run with 7,000
-- ready tasks held back every run queued after it (a minutely pipeline's run waited minutes and
-- its next slots were skipped as overlapping). Within a priority the order is now round-robin:
-- across workspaces first, and within a workspace across runs, each run's own tasks in
-- (priority, arrival) order.
--
-- The candidates are the head of every run with ready work (a loose index scan over the runs
-- with ready tasks, then each run's first tasks by priority and arrival, as many as its share
-- of the batch: its workspace's equal share divided among the workspace's runs; one index
-- probe per run, so the cost is O(runs with ready work), not O(ready tasks)), plus the global
-- head in arrival order to fill the batch. They are ranked per run, then per workspace, and locked in
-- that order with SKIP LOCKED. A run's own claim (eager continuation) keeps its simple order.

CREATE INDEX tasks_ready_run_order_idx ON tasks (run_id, priority DESC, available_at) WHERE status = 'ready';

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

    -- The candidates, in claim order (a new statement: it sees everything committed before).
    IF p_run_id IS NOT NULL THEN
        SELECT COALESCE(array_agg(x.id ORDER BY x.priority DESC, x.available_at), '{}') INTO cand FROM (
            SELECT t.id, t.priority, t.available_at FROM tasks t
            WHERE t.status = 'ready' AND t.run_id = p_run_id AND t.available_at <= tw_now()
            ORDER BY t.priority DESC, t.available_at
            LIMIT 2 * p_limit
        ) x;
    ELSE
        -- The runs with ready work, by a loose index scan, at most 4 x p_limit of them from a
        -- random point of the run ids (wrapping around): more runs than that cannot all get a
        -- task in one batch anyway, and the random start spreads the batches over all of them.
        WITH RECURSIVE after_start(run_id, workspace_id, n) AS (
            (SELECT t.run_id, t.workspace_id, 1 FROM tasks t
             WHERE t.status = 'ready' AND t.run_id >= v_start ORDER BY t.run_id LIMIT 1)
            UNION ALL
            SELECT nxt.run_id, nxt.workspace_id, a.n + 1 FROM after_start a
            CROSS JOIN LATERAL (SELECT t.run_id, t.workspace_id FROM tasks t
                                WHERE t.status = 'ready' AND t.run_id > a.run_id
                                ORDER BY t.run_id LIMIT 1) nxt
            WHERE a.n < 4 * p_limit
        ), before_start(run_id, workspace_id, n) AS (
            (SELECT t.run_id, t.workspace_id, 1 FROM tasks t
             WHERE t.status = 'ready' AND t.run_id < v_start ORDER BY t.run_id LIMIT 1)
            UNION ALL
            SELECT nxt.run_id, nxt.workspace_id, b.n + 1 FROM before_start b
            CROSS JOIN LATERAL (SELECT t.run_id, t.workspace_id FROM tasks t
                                WHERE t.status = 'ready' AND t.run_id > b.run_id AND t.run_id < v_start
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
            SELECT h.id, h.run_id, h.workspace_id, h.priority, h.available_at
            FROM shares s
            CROSS JOIN LATERAL (
                SELECT t.id, t.run_id, t.workspace_id, t.priority, t.available_at FROM tasks t
                WHERE t.status = 'ready' AND t.run_id = s.run_id AND t.available_at <= v_now
                ORDER BY t.priority DESC, t.available_at
                LIMIT s.k
            ) h
        ), fill AS (
            SELECT t.id, t.run_id, t.workspace_id, t.priority, t.available_at FROM tasks t
            WHERE t.status = 'ready' AND t.available_at <= v_now
            ORDER BY t.priority DESC, t.available_at
            LIMIT 2 * p_limit
        ), pool AS (
            SELECT * FROM heads UNION SELECT * FROM fill
        ), by_run AS (
            SELECT p.*, row_number() OVER (PARTITION BY p.run_id ORDER BY p.priority DESC, p.available_at) AS run_rank
            FROM pool p
        ), by_workspace AS (
            SELECT b.*, row_number() OVER (PARTITION BY b.workspace_id, b.priority
                                           ORDER BY b.run_rank, b.available_at, b.id) AS ws_rank
            FROM by_run b
        )
        SELECT COALESCE(array_agg(x.id ORDER BY x.priority DESC, x.ws_rank, x.available_at, x.id), '{}') INTO cand
        FROM by_workspace x;
    END IF;

    IF cardinality(locked_ws) = 0 AND cardinality(locked_p) = 0 THEN
        -- No limited scope has ready work: the plain claim, leaving out every task of a
        -- limited scope (one that became ready since the lock statements waits for a claim
        -- that holds its lock).
        RETURN QUERY
        WITH c AS (
            SELECT u.cid, u.ord FROM unnest(cand) WITH ORDINALITY AS u(cid, ord)
        ), locked AS (
            SELECT t.id FROM tasks t JOIN c ON c.cid = t.id
            WHERE t.status = 'ready'
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
            WHERE t.id = ANY (ARRAY(SELECT l.id FROM locked l)) AND t.status = 'ready'
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
    ), c AS (
        SELECT u.cid, u.ord FROM unnest(cand) WITH ORDINALITY AS u(cid, ord)
    ), candidates AS (
        SELECT t.id, t.workspace_id, t.pipeline_id, c.ord FROM tasks t
        JOIN c ON c.cid = t.id
        LEFT JOIN workspaces w ON w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL
        LEFT JOIN pipelines p ON p.workspace_id = t.workspace_id AND p.id = t.pipeline_id
                             AND p.max_active_tasks IS NOT NULL
        WHERE t.status = 'ready'
          AND (w.id IS NULL OR EXISTS (SELECT 1 FROM room_ws r WHERE r.workspace_id = w.id AND r.n > 0))
          AND (p.id IS NULL OR EXISTS (SELECT 1 FROM room_p r WHERE r.workspace_id = p.workspace_id
                                       AND r.pipeline_id = p.id AND r.n > 0))
        ORDER BY c.ord
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), ranked AS (
        SELECT c.id, c.workspace_id, c.pipeline_id,
               row_number() OVER (PARTITION BY c.workspace_id, c.pipeline_id ORDER BY c.ord) AS rank_in_pipeline,
               row_number() OVER (PARTITION BY c.workspace_id ORDER BY c.ord) AS rank_in_workspace
        FROM candidates c
    ), allowed AS (
        SELECT r.id FROM ranked r
        LEFT JOIN room_p p ON p.workspace_id = r.workspace_id AND p.pipeline_id = r.pipeline_id
        LEFT JOIN room_ws w ON w.workspace_id = r.workspace_id
        WHERE (p.n IS NULL OR r.rank_in_pipeline <= p.n) AND (w.n IS NULL OR r.rank_in_workspace <= w.n)
    ), claimed AS (
        UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
               claim_token = gen_random_uuid(), dispatched_at = tw_now(),
               lease_expires_at = LEAST(
                   tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                   tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
               progress = NULL, message = NULL
        WHERE t.id = ANY (ARRAY(SELECT a.id FROM allowed a)) AND t.status = 'ready'
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
