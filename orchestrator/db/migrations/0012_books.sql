-- 0012: the DAG's books on every path (issue 14).
--
-- 1. A run's end hooks run once per outcome. A run that ended can be reopened (a dead letter
--    retried, a failed run redriven) and end again; its orchestration's downstream runs must not
--    count it twice, and its later triggers must not fire twice. Each orchestration edge records
--    when it was released, and each run whether its on_success / on_complete dependants were
--    already decided.
-- 2. The claim applies max_active_tasks to every task it claims. The scope rows (workspaces and
--    pipelines with a limit) are locked first; a task of a limited scope that was not locked (it
--    became ready after the lock statement's snapshot) is left for the next claim instead of being
--    claimed with no limit. A run's claim (eager continuation after a callback) locks only its
--    own run's scopes, never another tenant's.

ALTER TABLE run_dependencies ADD COLUMN released_at timestamptz;
UPDATE run_dependencies d SET released_at = u.finished_at
FROM runs u WHERE u.id = d.upstream_run_id AND u.status IN ('succeeded', 'failed', 'cancelled');

ALTER TABLE runs ADD COLUMN success_triggers_decided boolean NOT NULL DEFAULT false;
ALTER TABLE runs ADD COLUMN complete_triggers_decided boolean NOT NULL DEFAULT false;
UPDATE runs SET complete_triggers_decided = status IN ('succeeded', 'failed'),
                success_triggers_decided = status = 'succeeded'
WHERE status IN ('succeeded', 'failed');

DROP FUNCTION tw_claim_ready_tasks(integer, uuid);

-- The claim: one call, one round trip, plans cached per session (see migration 0010).
--   1. When claiming for one run, its workspace and pipeline are the only scopes considered.
--   2. Limited scopes with ready work are locked in key order (workspaces, then pipelines), so
--      that claims for them queue; each later statement of this function takes a new snapshot,
--      so it sees every claim committed by whoever held a scope lock before.
--   3. No limited scope locked: the plain claim, leaving out every task of a limited scope.
--   4. Otherwise the room left under each locked limit is counted after the locks, and the
--      candidates are ranked within their pipeline and workspace and kept while they fit.
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
BEGIN
    IF p_run_id IS NOT NULL THEN
        SELECT r.workspace_id, r.pipeline_id INTO v_ws, v_p FROM runs r WHERE r.id = p_run_id;
        IF v_ws IS NULL THEN
            RETURN;
        END IF;
    END IF;
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

    IF cardinality(locked_ws) = 0 AND cardinality(locked_p) = 0 THEN
        IF p_run_id IS NULL THEN
            RETURN QUERY
            WITH candidates AS (
                SELECT t.id FROM tasks t
                WHERE t.status = 'ready' AND t.available_at <= tw_now()
                  AND NOT EXISTS (SELECT 1 FROM workspaces w
                                  WHERE w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL)
                  AND NOT EXISTS (SELECT 1 FROM pipelines p WHERE p.workspace_id = t.workspace_id
                                  AND p.id = t.pipeline_id AND p.max_active_tasks IS NOT NULL)
                ORDER BY t.priority DESC, t.available_at
                LIMIT p_limit
                FOR UPDATE OF t SKIP LOCKED
            ), claimed AS (
                UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
                       claim_token = gen_random_uuid(), dispatched_at = tw_now(),
                       lease_expires_at = LEAST(
                           tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                           tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
                       progress = NULL, message = NULL
                WHERE t.id = ANY (ARRAY(SELECT c.id FROM candidates c)) AND t.status = 'ready'
                RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                          t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                          t.timeout_s, t.lease_expires_at, t.dispatched_at
            ), attempts AS (
                INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
                SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM claimed c
            )
            SELECT c.* FROM claimed c;
        ELSE
            -- The run's own scopes are not limited (or have no ready work): the run's claim.
            RETURN QUERY
            WITH candidates AS (
                SELECT t.id FROM tasks t
                WHERE t.status = 'ready' AND t.available_at <= tw_now() AND t.run_id = p_run_id
                  AND NOT EXISTS (SELECT 1 FROM workspaces w
                                  WHERE w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL)
                  AND NOT EXISTS (SELECT 1 FROM pipelines p WHERE p.workspace_id = t.workspace_id
                                  AND p.id = t.pipeline_id AND p.max_active_tasks IS NOT NULL)
                ORDER BY t.priority DESC, t.available_at
                LIMIT p_limit
                FOR UPDATE OF t SKIP LOCKED
            ), claimed AS (
                UPDATE tasks t SET status = 'dispatched', attempt = t.attempt + 1,
                       claim_token = gen_random_uuid(), dispatched_at = tw_now(),
                       lease_expires_at = LEAST(
                           tw_now() + make_interval(secs => 2 * t.heartbeat_s),
                           tw_now() + make_interval(secs => COALESCE(t.timeout_s, 2147483647))),
                       progress = NULL, message = NULL
                WHERE t.id = ANY (ARRAY(SELECT c.id FROM candidates c)) AND t.status = 'ready'
                RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                          t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                          t.timeout_s, t.lease_expires_at, t.dispatched_at
            ), attempts AS (
                INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
                SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM claimed c
            )
            SELECT c.* FROM claimed c;
        END IF;
        RETURN;
    END IF;

    -- A new statement, so a new snapshot: the active counts include every claim committed by
    -- the transactions that held these scope locks before us.
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
    ), candidates AS (
        SELECT t.id, t.workspace_id, t.pipeline_id, t.priority, t.available_at FROM tasks t
        LEFT JOIN workspaces w ON w.id = t.workspace_id AND w.max_active_tasks IS NOT NULL
        LEFT JOIN pipelines p ON p.workspace_id = t.workspace_id AND p.id = t.pipeline_id
                             AND p.max_active_tasks IS NOT NULL
        WHERE t.status = 'ready' AND t.available_at <= tw_now()
          AND (p_run_id IS NULL OR t.run_id = p_run_id)
          AND (w.id IS NULL OR EXISTS (SELECT 1 FROM room_ws r WHERE r.workspace_id = w.id AND r.n > 0))
          AND (p.id IS NULL OR EXISTS (SELECT 1 FROM room_p r WHERE r.workspace_id = p.workspace_id
                                       AND r.pipeline_id = p.id AND r.n > 0))
        ORDER BY t.priority DESC, t.available_at
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), ranked AS (
        SELECT c.id, c.workspace_id, c.pipeline_id,
               row_number() OVER (PARTITION BY c.workspace_id, c.pipeline_id
                                  ORDER BY c.priority DESC, c.available_at) AS rank_in_pipeline,
               row_number() OVER (PARTITION BY c.workspace_id
                                  ORDER BY c.priority DESC, c.available_at) AS rank_in_workspace
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
