-- 0020: a worker's callback in one statement (issue 16).
--
-- tw_complete_attempts records the outcomes of one or more attempts, each fenced by its attempt
-- and claim token exactly as tw_finish_attempt does, and for each accepted one does what the
-- engine's finish_attempt does on the common path, in the same transaction:
--   the finish and the attempt record; the successors' readiness (wave by wave: a successor
--   skipped by its rule advances its own); the claim of the successors made ready (at most
--   p_claim_limit over the call); their dispatch context (tw_dispatch_context) and the code
--   version of the registered workers they go to; and the run's counters.
-- It hands an outcome back to the engine, with nothing of that outcome changed, when the engine
-- must decide in Python: a failure that is final (dead letter, `on_failure: stop`), a task
-- that produces pipeline outputs or feeds map nodes (S3 reads and writes happen outside the
-- transaction), an item of a map node with max_concurrency, a successor that is a map node
-- (expanded or settled by orchestrator.engine.mapping), and, when p_single, the end of a run
-- (orchestrations, queued runs and later triggers follow it). Such an outcome is done inside
-- its own block: an exception raised in it (SQLSTATE TW001, caught here, never reaching the
-- client or the server log) rolls back to the block's start, and its answer says `engine`.
--
-- With p_single false (a batch of callbacks, in the caller's explicit transaction) the run
-- counters are settled once per run after every outcome, in run id order, and a run that ended
-- is returned in `ended_runs` for the engine to follow in the same transaction (the lock order
-- stays: task rows, then run rows in id order, then scope rows).
--
-- Lock order (docs/reliability.md): each outcome locks its task, then its successors in id
-- order (tw_advance_successors), then the run row, last, so the run row is held for the
-- shortest time: from its update to the commit. A run whose workspace or pipeline has
-- max_active_tasks is claimed by tw_claim_ready_tasks after its run row, as before (its scope
-- rows come after the run row); any other run's successors are claimed by id, here.
--
-- Never a prepared statement and no session state (RDS Proxy): a PL/pgSQL function whose
-- plans are cached per connection.

CREATE FUNCTION tw_complete_one(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb, p_claim_limit integer, p_single boolean
) RETURNS jsonb
    LANGUAGE plpgsql
AS $$
-- The statements of tw_finish_attempt (0018), tw_record_attempt_end (0010) and
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
                          ELSE 'dead' END,
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

-- p_items: [{task_id, attempt, claim_token, ok, retryable, output, error}], any order (taken in
-- run id order, then task id order, so two batches lock their tasks, and the successors of
-- each run, one run after the other in one order: batches over two runs' joins deadlocked when
-- taken in task id order alone; a task sent twice in the order sent). Returns {results: [one
-- per item, in that order, each with its `position` in
-- p_items], claimed: [...], context: {...}, ended_runs: [...]}.
CREATE FUNCTION tw_complete_attempts(p_items jsonb, p_claim_limit integer, p_single boolean)
    RETURNS jsonb
    LANGUAGE plpgsql
AS $$
DECLARE
    i record;
    v_result jsonb;
    v_results jsonb := '[]';
    v_claimed jsonb := '[]';
    v_budget integer := p_claim_limit;
    v_runs jsonb := '{}';
    v_ended jsonb := '[]';
    v_ids uuid[];
    v_ws text[];
    v_names text[];
    v_ctx record;
    v_context jsonb;
    r record;
    v_run record;
BEGIN
    FOR i IN
        SELECT (x.x->>'task_id')::uuid AS task_id, (x.x->>'attempt')::int AS attempt,
               (x.x->>'claim_token')::uuid AS claim_token, (x.x->>'ok')::boolean AS ok,
               COALESCE((x.x->>'retryable')::boolean, true) AS retryable,
               CASE WHEN jsonb_typeof(x.x->'output') = 'object' THEN x.x->'output' END AS output,
               CASE WHEN jsonb_typeof(x.x->'error') = 'object' THEN x.x->'error' END AS error,
               x.n - 1 AS position
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(x, n)
        LEFT JOIN tasks k ON k.id = (x.x->>'task_id')::uuid
        ORDER BY k.run_id, 1, x.n
    LOOP
        BEGIN
            v_result := tw_complete_one(i.task_id, i.attempt, i.claim_token, i.ok, i.retryable, i.output,
                                        i.error, v_budget, p_single);
            v_claimed := v_claimed || COALESCE(v_result->'claimed', '[]');
            v_budget := GREATEST(v_budget - jsonb_array_length(COALESCE(v_result->'claimed', '[]')), 0);
            IF NOT p_single AND (v_result->>'accepted')::boolean AND (v_result->>'finished')::int > 0 THEN
                v_runs := jsonb_set(v_runs, ARRAY[v_result->>'run_id'], to_jsonb(
                    COALESCE((v_runs->>(v_result->>'run_id'))::int, 0) + (v_result->>'finished')::int));
            END IF;
            v_results := v_results || (v_result - 'claimed' || jsonb_build_object('position', i.position));
        EXCEPTION WHEN SQLSTATE 'TW001' THEN
            v_results := v_results || jsonb_build_object('task_id', i.task_id, 'engine', true,
                                                         'position', i.position);
        END;
    END LOOP;

    IF NOT p_single THEN
        -- Each run's counters once, in run id order (after every task row this batch locks).
        FOR r IN SELECT k::uuid AS run_id, v::int AS finished FROM jsonb_each_text(v_runs) AS e(k, v) ORDER BY 1 LOOP
            UPDATE runs x SET
                unfinished_tasks = x.unfinished_tasks - r.finished,
                status = CASE
                    WHEN x.status IN ('succeeded', 'failed', 'cancelled') THEN x.status
                    WHEN x.unfinished_tasks - r.finished = 0 THEN
                        CASE WHEN x.failed_tasks > 0 THEN 'failed' ELSE 'succeeded' END
                    ELSE x.status END,
                finished_at = CASE
                    WHEN x.finished_at IS NULL AND x.unfinished_tasks - r.finished = 0
                    THEN tw_now() ELSE x.finished_at END
            FROM (SELECT runs.id, runs.status FROM runs WHERE runs.id = r.run_id FOR NO KEY UPDATE) AS before
            WHERE x.id = before.id
            RETURNING x.id, x.status, before.status AS previous_status INTO v_run;
            IF v_run.previous_status = 'running' AND v_run.status IN ('succeeded', 'failed') THEN
                v_ended := v_ended || jsonb_build_object('run_id', v_run.id, 'status', v_run.status);
            END IF;
        END LOOP;
        -- Runs of a limited scope with successors made ready: claimed by the scope-aware claim,
        -- after their run rows.
        FOR r IN SELECT DISTINCT (x->>'run_id')::uuid AS run_id FROM jsonb_array_elements(v_results) AS x
                 WHERE (x->>'claim_in_run')::boolean ORDER BY 1 LOOP
            EXIT WHEN v_budget <= 0;
            SELECT v_claimed || COALESCE(jsonb_agg(to_jsonb(c)), '[]'), v_budget - count(*)::int
              INTO v_claimed, v_budget
            FROM tw_claim_ready_tasks(v_budget, r.run_id) c;
        END LOOP;
    END IF;

    v_context := NULL;
    IF jsonb_array_length(v_claimed) > 0 THEN
        SELECT array_agg((c->>'id')::uuid), array_agg(DISTINCT c->>'workspace_id')
          INTO v_ids, v_ws FROM jsonb_array_elements(v_claimed) c;
        SELECT array_agg(k.ws ORDER BY k.ws, k.name), array_agg(k.name ORDER BY k.ws, k.name) INTO v_ws, v_names
        FROM (SELECT DISTINCT c->>'workspace_id' AS ws, c->>'task_name' AS name
              FROM jsonb_array_elements(v_claimed) c WHERE c->>'task_name' IS NOT NULL) k;
        SELECT * INTO v_ctx FROM tw_dispatch_context(v_ids, COALESCE(v_ws, '{}'), COALESCE(v_names, '{}'));
        v_context := jsonb_build_object('inputs', v_ctx.inputs, 'upstream', v_ctx.upstream, 'routes', v_ctx.routes,
                                        'maps', v_ctx.maps);
        IF jsonb_array_length(v_ctx.routes) > 0 THEN
            -- The code version each claimed attempt goes to (as worker_store.record_dispatched_code).
            WITH code AS (
                SELECT (c->>'id')::uuid AS id, (c->>'attempt')::int AS attempt, rt->>'code_hash' AS code_hash
                FROM jsonb_array_elements(v_claimed) c
                JOIN jsonb_array_elements(v_ctx.routes) rt
                  ON rt->>'workspace_id' = c->>'workspace_id' AND rt->>'task_name' = c->>'task_name'
            ), on_tasks AS (
                UPDATE tasks t SET code_version = code.code_hash FROM code WHERE t.id = code.id
            )
            UPDATE task_attempts x SET code_version = code.code_hash
            FROM code WHERE x.task_id = code.id AND x.attempt = code.attempt;
        END IF;
    END IF;

    RETURN jsonb_build_object('results', v_results, 'claimed', v_claimed, 'context', v_context,
                              'ended_runs', v_ended);
END
$$;

-- Generic plans for the callback's statements. With the default plan_cache_mode, PL/pgSQL
-- plans its statements anew on most calls (a custom plan for each array of ids: measured 0.5
-- ms of the 0.6 ms tw_dispatch_context took per call, each statement's execution being a few
-- microseconds); their generic plans are index lookups by key whatever the ids. The setting
-- holds for the call (and the functions it calls) and is restored after it: no session state.
ALTER FUNCTION tw_complete_attempts(jsonb, integer, boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tw_dispatch_context(uuid[], text[], text[]) SET plan_cache_mode = force_generic_plan;

-- tw_advance_successors (0016) for the engine's path, with the same change as above: a
-- successor that stays pending keeps its available_at, so counting it down is an update in
-- place (HOT) when its page has room; a map node counted down by each of its items was a row
-- with one index entry per item finished (issue 19's "map node row" hot spot).
CREATE OR REPLACE FUNCTION tw_advance_successors(p_upstream uuid, p_failed integer, p_skipped integer)
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
            available_at = CASE WHEN t.unfinished_deps - 1 > 0 THEN t.available_at ELSE tw_now() END,
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

-- Room on each page for the versions of a row updated in place (HOT): a task is updated three
-- to four times in its life, a join or a map node once per upstream or item. New pages only.
ALTER TABLE tasks SET (fillfactor = 85);
ALTER TABLE runs SET (fillfactor = 85);
