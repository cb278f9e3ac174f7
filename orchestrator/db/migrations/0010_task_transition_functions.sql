-- 0010: the hot task transitions as PL/pgSQL functions, so that their plans are cached.
--
-- Connections run without server-side prepared statements (prepare_threshold=None, for RDS
-- Proxy, which pins sessions that prepare). Postgres then plans every statement on every call,
-- and for a callback's statements planning cost more server CPU than executing them. A
-- PL/pgSQL function keeps the plans of its statements for the life of the session (custom
-- plans for the first calls, then a generic one when it is no worse), and calling it through
-- the unnamed statement of the extended protocol, as psycopg does, needs no session state that
-- RDS Proxy would pin on. Each function is the same single statement the store sent before,
-- guarded by the state it expects; orchestrator/store/tasks.py keeps the documentation.
--
-- tw_finish_attempt also returns the task's output_names (migration 0009), so that persisting a
-- succeeded task's pipeline outputs needs no second read of the row.
--
-- `#variable_conflict use_column`: the RETURNS TABLE names are also column names; inside
-- the statements a bare name always means the column.

CREATE FUNCTION tw_finish_attempt(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb
) RETURNS TABLE (id uuid, run_id uuid, node_id text, version text, status text, attempt integer,
                 on_failure text, workspace_id text, pipeline_id text, output_names text[])
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
                  t.pipeline_id, t.output_names
    )
    SELECT * FROM finished;
END
$$;

CREATE FUNCTION tw_record_attempt_end(p_task_id uuid, p_attempt integer, p_status text, p_error jsonb)
    RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE task_attempts SET status = p_status, finished_at = tw_now(), error = p_error
    WHERE task_id = p_task_id AND attempt = p_attempt AND status IN ('dispatched', 'running');
END
$$;

CREATE FUNCTION tw_advance_successors(p_upstream uuid, p_failed integer, p_skipped integer)
    RETURNS TABLE (id uuid, node_id text, status text)
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
                WHEN CASE t.trigger_rule
                         WHEN 'all_done' THEN true
                         WHEN 'none_failed' THEN t.failed_deps + p_failed = 0
                         WHEN 'one_failed' THEN t.failed_deps + p_failed > 0
                         ELSE t.skipped_deps + p_skipped = 0
                     END THEN CASE WHEN t.kind = 'task' THEN 'ready' ELSE 'waiting' END
                ELSE 'skipped' END,
            available_at = tw_now(),
            wait_expires_at = CASE WHEN t.kind <> 'task' AND t.timeout_s IS NOT NULL
                                   THEN tw_now() + make_interval(secs => t.timeout_s) END,
            finished_at = CASE
                WHEN t.unfinished_deps - 1 > 0 THEN NULL
                WHEN CASE t.trigger_rule
                         WHEN 'all_done' THEN true
                         WHEN 'none_failed' THEN t.failed_deps + p_failed = 0
                         WHEN 'one_failed' THEN t.failed_deps + p_failed > 0
                         ELSE t.skipped_deps + p_skipped = 0
                     END THEN NULL
                ELSE tw_now() END
        FROM locked
        WHERE t.id = locked.id AND t.status = 'pending'
        RETURNING t.id, t.node_id, t.status
    )
    SELECT * FROM advanced;
END
$$;

-- The claim, when no max_active_tasks limit has ready work (the usual case): the two lock
-- statements of lock_limited_scopes and the claim itself in one call. The limited scopes are
-- locked first, in key order, exactly as lock_limited_scopes does; when any was found, nothing
-- is claimed and one row with `limited` set is returned: the caller then takes the limited
-- path (lock_limited_scopes again, which re-locks rows this transaction already holds, then the
-- ranked claim). The claimed rows are picked by id (`id = ANY (ARRAY(...))`) rather than by
-- joining the candidates back to tasks: planned while the ready set looked empty, that join
-- became a nested loop of the whole ready index times the candidates. A run's claim and the global claim are separate statements, so each keeps a
-- plan of its own instead of sharing one generic plan with `run_id IS NULL OR ...` (which
-- could not use tasks_ready_run_idx).
CREATE FUNCTION tw_claim_ready_tasks(p_limit integer, p_run_id uuid)
    RETURNS TABLE (limited boolean, id uuid, run_id uuid, workspace_id text, pipeline_id text, node_id text,
                   version text, kind text, task_name text, params jsonb, transport text, attempt integer,
                   claim_token uuid, heartbeat_s integer, timeout_s integer, lease_expires_at timestamptz,
                   dispatched_at timestamptz)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    scopes integer;
    more integer;
BEGIN
    PERFORM 1 FROM workspaces w
    WHERE w.max_active_tasks IS NOT NULL
      AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = w.id AND t.status = 'ready')
    ORDER BY w.id FOR UPDATE OF w;
    GET DIAGNOSTICS scopes = ROW_COUNT;
    PERFORM 1 FROM pipelines p
    WHERE p.max_active_tasks IS NOT NULL
      AND EXISTS (SELECT 1 FROM tasks t WHERE t.workspace_id = p.workspace_id AND t.pipeline_id = p.id
                                          AND t.status = 'ready')
    ORDER BY p.workspace_id, p.id FOR UPDATE OF p;
    GET DIAGNOSTICS more = ROW_COUNT;
    IF scopes + more > 0 THEN
        RETURN QUERY SELECT true, NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::jsonb, NULL::text, NULL::integer, NULL::uuid,
                            NULL::integer, NULL::integer, NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_run_id IS NULL THEN
        RETURN QUERY
        WITH candidates AS (
            SELECT id FROM tasks
            WHERE status = 'ready' AND available_at <= tw_now()
            ORDER BY priority DESC, available_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
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
        SELECT false, c.* FROM claimed c;
    ELSE
        RETURN QUERY
        WITH candidates AS (
            SELECT id FROM tasks
            WHERE status = 'ready' AND available_at <= tw_now() AND run_id = p_run_id
            ORDER BY priority DESC, available_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
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
        SELECT false, c.* FROM claimed c;
    END IF;
END
$$;
