-- 0021: a task whose last attempt failed is `failed`, dead-lettered or not (issue 18).
--
-- Until now a worker's task out of attempts (or whose failure was not retryable, or whose
-- dispatch kept failing) became `dead` and got a dead-letter entry, while a rejected approval,
-- a failed manual step, a human step past its timeout or a map node over its tolerated failures
-- became `failed` and got none. The status said which, in words no other orchestrator uses.
-- Now both are `failed`; the dead-letter entry is its own record (`dead_letters`), and the task
-- JSON says `dead_lettered` when the task has an open one. Which failures are dead-lettered does
-- not change: those of a worker's attempt or delivery (tw_finish_attempt below, the dispatch
-- failure of orchestrator/store/tasks.py), never a person's decision nor a map node's settle.
-- The engine knows which path it is on (orchestrator/engine/completion.settle_terminal takes
-- `dead_letter`); nothing reads it from the status any more.
--
-- runs.failed_task_count: the run's tasks whose status is `failed`, map items included, so a
-- run that succeeded with tolerated failures (`on_failure: continue`, a map node's
-- tolerated_failures) says so in every list without counting tasks per run on each request.
-- Kept by the statement that already counts each task's end against the run (a failure always
-- ends on the engine's path: orchestrator/store/runs.finish_tasks_of_run), recounted by a repair
-- that reopens the run (reopen_run); the callback statement (tw_complete_one) records successes
-- and scheduled retries only (a final failure goes to the engine), so it does not change. runs.failed_tasks keeps its meaning: the stopping failures
-- (`on_failure: stop`) still standing, which decide that a run fails.

ALTER TABLE runs ADD COLUMN failed_task_count integer NOT NULL DEFAULT 0 CHECK (failed_task_count >= 0);

UPDATE tasks SET status = 'failed' WHERE status = 'dead';

UPDATE runs r SET failed_task_count = f.n
FROM (SELECT run_id, count(*)::int AS n FROM tasks WHERE status = 'failed' GROUP BY run_id) f
WHERE r.id = f.run_id;

ALTER TABLE tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check CHECK (status IN ('pending', 'ready', 'dispatched', 'running',
    'waiting', 'succeeded', 'failed', 'skipped', 'cancelled'));

-- The statement of tw_finish_attempt (0018), a final failure now `failed`. Same arguments and
-- result, so CREATE OR REPLACE.
CREATE OR REPLACE FUNCTION tw_finish_attempt(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb
) RETURNS TABLE (id uuid, run_id uuid, node_id text, version text, status text, attempt integer,
                 on_failure text, workspace_id text, pipeline_id text, output_names text[], map_targets jsonb,
                 map_max_concurrency integer)
    LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH finished AS (
        UPDATE tasks t SET
            status = CASE WHEN p_ok THEN 'succeeded'
                          WHEN p_retryable AND t.attempt < t.max_attempts THEN 'ready'
                          ELSE 'failed' END,
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
                  t.pipeline_id, t.output_names, t.map_targets, t.map_max_concurrency
    )
    SELECT * FROM finished;
END
$$;

-- tw_complete_one (0020) with the same change. Its answer is unchanged: a failure that is final
-- goes to the engine (SQLSTATE TW001), which records it with tw_finish_attempt and
-- dead-letters it. CREATE OR REPLACE resets a function's SET options to those it states;
-- tw_complete_one has none (0020 set plan_cache_mode on tw_complete_attempts, its caller,
-- whose setting holds for the functions it calls and which is not replaced here).
CREATE OR REPLACE FUNCTION tw_complete_one(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb, p_claim_limit integer, p_single boolean
) RETURNS jsonb
    LANGUAGE plpgsql
AS $$
-- The statements of tw_finish_attempt (0021), tw_record_attempt_end (0010) and
-- tw_advance_successors (0016) inlined, with one reading of the clock: a nested PL/pgSQL call
-- and its result set cost more than the statement inside.
DECLARE
    f record;
    v_now timestamptz := tw_now();
    v_frontier uuid[];
    v_next uuid[];
    v_skip integer := 0;
    v_ready uuid[] := '{}';
    v_skipped integer := 0;
    v_limited boolean := false;
    v_budget integer;
    v_claimed jsonb := '[]';
    v_wave_ready uuid[];
    v_wave_claimed jsonb;
    v_wave_count integer;
    v_map boolean;
    v_newly integer := 0;
    v_run record;
    v_run_status text;
BEGIN
    WITH finished AS (
        UPDATE tasks t SET
            status = CASE WHEN p_ok THEN 'succeeded'
                          WHEN p_retryable AND t.attempt < t.max_attempts THEN 'ready'
                          ELSE 'failed' END,
            available_at = CASE WHEN NOT p_ok AND p_retryable AND t.attempt < t.max_attempts
                THEN v_now + make_interval(secs => LEAST(
                         COALESCE((t.retry->>'max_delay_s')::float8, 300),
                         COALESCE((t.retry->>'base_delay_s')::float8, 5)
                           * CASE WHEN t.retry->>'backoff' = 'fixed' THEN 1 ELSE power(2, t.attempt - 1) END)
                       * CASE WHEN t.retry->>'jitter' = 'full' THEN random() ELSE 1 END)
                ELSE t.available_at END,
            finished_at = CASE WHEN p_ok OR NOT p_retryable OR t.attempt >= t.max_attempts THEN v_now END,
            output = CASE WHEN p_ok THEN p_output ELSE t.output END,
            error = CASE WHEN p_ok THEN NULL ELSE p_error END,
            lease_expires_at = NULL, claim_token = NULL
        WHERE t.id = p_task_id AND t.attempt = p_attempt AND t.claim_token = p_claim_token
          AND t.status IN ('dispatched', 'running')
        RETURNING t.run_id, t.node_id, t.version, t.status, t.workspace_id, t.pipeline_id, t.output_names,
                  t.map_targets, t.map_max_concurrency
    ), ended AS (
        UPDATE task_attempts x SET status = CASE WHEN p_ok THEN 'succeeded' ELSE 'failed' END,
                                   finished_at = v_now, error = p_error
        WHERE x.task_id = p_task_id AND x.attempt = p_attempt AND x.status IN ('dispatched', 'running')
          AND EXISTS (SELECT 1 FROM finished)
    )
    SELECT * INTO f FROM finished;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('task_id', p_task_id, 'accepted', false);
    END IF;
    IF COALESCE(cardinality(f.output_names), 0) > 0 OR f.map_targets IS NOT NULL
       OR f.map_max_concurrency IS NOT NULL OR f.status NOT IN ('succeeded', 'ready') THEN
        RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
    END IF;
    IF f.status = 'ready' THEN  -- a retry was scheduled: the run is unaffected
        RETURN jsonb_build_object('task_id', p_task_id, 'accepted', true, 'outcome', 'retrying',
                                  'task_status', 'ready', 'run_id', f.run_id, 'workspace_id', f.workspace_id,
                                  'pipeline_id', f.pipeline_id, 'node_id', f.node_id, 'version', f.version,
                                  'newly_ready', 0, 'finished', 0, 'claimed', '[]'::jsonb);
    END IF;

    -- Whether the run's scopes limit its tasks: then tw_claim_ready_tasks claims them (below).
    SELECT w.max_active_tasks IS NOT NULL OR p.max_active_tasks IS NOT NULL INTO v_limited
    FROM pipelines p JOIN workspaces w ON w.id = p.workspace_id
    WHERE p.workspace_id = f.workspace_id AND p.id = f.pipeline_id;
    v_limited := COALESCE(v_limited, false);
    v_budget := CASE WHEN v_limited THEN 0 ELSE GREATEST(p_claim_limit, 0) END;

    -- The successors, wave by wave: a successor skipped by its rule advances its own (as
    -- skipped). Locked in id order, as tw_advance_successors does. A successor whose rule
    -- holds and that a worker runs is claimed by the same update, while the budget lasts (in
    -- priority order): it goes from pending to dispatched with its new attempt, lease and token,
    -- never written as ready (one row version and its index entries fewer).
    v_frontier := ARRAY[p_task_id];
    WHILE cardinality(v_frontier) > 0 LOOP
        WITH hits AS (
            SELECT e.downstream_task_id AS id, count(*)::int AS n FROM task_edges e
            WHERE e.upstream_task_id = ANY (v_frontier) GROUP BY e.downstream_task_id
        ), locked AS (
            SELECT t.id, h.n, t.unfinished_deps, t.failed_deps, t.skipped_deps, t.trigger_rule, t.kind,
                   t.map_width, t.map_max_concurrency, t.priority
            FROM tasks t JOIN hits h ON h.id = t.id
            WHERE t.status = 'pending' ORDER BY t.id FOR UPDATE OF t
        ), decided AS (
            SELECT l.id, l.n, l.kind, l.priority,
                   CASE WHEN l.unfinished_deps - l.n > 0 THEN 'pending'
                        WHEN l.map_width IS NOT NULL OR CASE l.trigger_rule
                                 WHEN 'all_done' THEN true
                                 WHEN 'none_failed' THEN l.failed_deps = 0
                                 WHEN 'one_failed' THEN l.failed_deps > 0
                                 ELSE l.skipped_deps + l.n * v_skip = 0
                             END THEN CASE WHEN l.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END
                        ELSE 'skipped' END AS next_status,
                   l.kind NOT IN ('map', 'approval', 'manual') AND l.map_max_concurrency IS NULL AS runnable
            FROM locked l
        ), ranked AS (
            SELECT d.*, d.next_status = 'ready' AND d.runnable
                        AND row_number() OVER (PARTITION BY d.next_status = 'ready' AND d.runnable
                                               ORDER BY d.priority DESC, d.id) <= v_budget AS claim
            FROM decided d
        ), advanced AS (
            UPDATE tasks t SET
                unfinished_deps = t.unfinished_deps - r.n,
                skipped_deps = t.skipped_deps + r.n * v_skip,
                status = CASE WHEN r.claim THEN 'dispatched' ELSE r.next_status END,
                -- unchanged while the task stays pending: a join counted down by a thousand
                -- upstreams is then updated in place (HOT), not given a thousand index entries
                available_at = CASE WHEN r.next_status = 'pending' THEN t.available_at ELSE v_now END,
                wait_expires_at = CASE WHEN t.kind IN ('approval', 'manual') AND t.timeout_s IS NOT NULL
                                       THEN v_now + make_interval(secs => t.timeout_s) END,
                finished_at = CASE WHEN r.next_status = 'skipped' THEN v_now END,
                attempt = CASE WHEN r.claim THEN t.attempt + 1 ELSE t.attempt END,
                claim_token = CASE WHEN r.claim THEN gen_random_uuid() ELSE t.claim_token END,
                dispatched_at = CASE WHEN r.claim THEN v_now ELSE t.dispatched_at END,
                lease_expires_at = CASE WHEN r.claim THEN LEAST(
                    v_now + make_interval(secs => 2 * t.heartbeat_s),
                    v_now + make_interval(secs => COALESCE(t.timeout_s, 2147483647))) ELSE t.lease_expires_at END,
                progress = CASE WHEN r.claim THEN NULL ELSE t.progress END,
                message = CASE WHEN r.claim THEN NULL ELSE t.message END
            FROM ranked r WHERE t.id = r.id AND t.status = 'pending'
            RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                      t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                      t.timeout_s, t.lease_expires_at, t.dispatched_at, t.status
        ), attempts AS (
            INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
            SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM advanced c
            WHERE c.status = 'dispatched'
        )
        SELECT COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'skipped'), '{}'),
               COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'ready' AND c.kind <> 'map'), '{}'),
               COALESCE(bool_or(c.kind = 'map' AND c.status <> 'pending'), false),
               COALESCE(jsonb_agg(to_jsonb(c) - 'status') FILTER (WHERE c.status = 'dispatched'), '[]'),
               count(*) FILTER (WHERE c.status = 'dispatched')
          INTO v_next, v_wave_ready, v_map, v_wave_claimed, v_wave_count
        FROM advanced c;
        IF v_map THEN  -- a map node to expand or settle
            RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
        END IF;
        v_ready := v_ready || v_wave_ready;
        v_claimed := v_claimed || v_wave_claimed;
        v_newly := v_newly + cardinality(v_wave_ready) + v_wave_count;
        v_budget := v_budget - v_wave_count;
        v_skipped := v_skipped + cardinality(v_next);
        v_frontier := v_next;
        v_skip := 1;
    END LOOP;

    IF p_single THEN
        -- The run's counters, last: the run row is held from here to the commit.
        UPDATE runs r SET
            unfinished_tasks = r.unfinished_tasks - (1 + v_skipped),
            status = CASE
                WHEN r.status IN ('succeeded', 'failed', 'cancelled') THEN r.status
                WHEN r.unfinished_tasks - (1 + v_skipped) = 0 THEN
                    CASE WHEN r.failed_tasks > 0 THEN 'failed' ELSE 'succeeded' END
                ELSE r.status END,
            finished_at = CASE
                WHEN r.finished_at IS NULL AND r.unfinished_tasks - (1 + v_skipped) = 0
                THEN v_now ELSE r.finished_at END
        FROM (SELECT runs.id, runs.status FROM runs WHERE runs.id = f.run_id FOR NO KEY UPDATE) AS before
        WHERE r.id = before.id
        RETURNING r.status, before.status AS previous_status INTO v_run;
        IF v_run.previous_status = 'running' AND v_run.status IN ('succeeded', 'failed') THEN
            RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';  -- the run ended
        END IF;
        v_run_status := v_run.status;
        IF v_limited AND p_claim_limit > 0 AND cardinality(v_ready) > 0 THEN
            SELECT COALESCE(jsonb_agg(to_jsonb(c)), '[]') INTO v_claimed
            FROM tw_claim_ready_tasks(p_claim_limit, f.run_id) c;
        END IF;
    END IF;

    RETURN jsonb_build_object(
        'task_id', p_task_id, 'accepted', true, 'outcome', 'succeeded', 'task_status', 'succeeded',
        'run_id', f.run_id, 'workspace_id', f.workspace_id, 'pipeline_id', f.pipeline_id,
        'node_id', f.node_id, 'version', f.version,
        'run_status', v_run_status,
        'newly_ready', v_newly, 'finished', 1 + v_skipped,
        'claim_in_run', v_limited AND cardinality(v_ready) > 0, 'claimed', v_claimed);
END
$$;
