-- 0030: a batch of callbacks recorded without a subtransaction per outcome (issue 16).
--
-- tw_complete_attempts recorded each outcome of a batch inside a block that catches TW001 (the
-- outcomes the engine records), so one such outcome undid only itself. A block is a
-- subtransaction, and the batch locks its tasks, their slots and those slots' joins first, in
-- the batch's own transaction: every row the block then updates was locked by the parent, so
-- each update made a MultiXact (the parent's lock and the subtransaction's update, kept apart
-- in case the block is rolled back): 24 MultiXacts for a batch of 12 successes over a wide join
-- (tests/integration/test_batch_without_subtransactions.py), 0 now. At a thousand tasks a
-- second in batches that is some 170 million MultiXacts a day, and an anti-wraparound vacuum of
-- the tasks table every few days (autovacuum_multixact_freeze_max_age, 400 million). Side by
-- side in one process (each batch drawing blocks or none at random) the statement's time per
-- outcome did not change: 0.894 / 0.899 ms wide, 0.557 / 0.558 ms deep.
--
-- p_catch (default true, as before): false records the batch without blocks; an outcome for the
-- engine then ends the statement, and the caller records the batch again with p_catch (the
-- transaction rolled back whole: store/completions.py, engine/worker_protocol.py). The caller
-- asks for it when every outcome of the batch is a success, the case of a batch of small tasks;
-- a batch with a failure (which may be final: the engine's) keeps the blocks.

DROP FUNCTION tw_complete_attempts(jsonb, integer, boolean);

CREATE FUNCTION tw_complete_attempts(p_items jsonb, p_claim_limit integer, p_single boolean,
                                     p_catch boolean DEFAULT true)
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
    v_now timestamptz := tw_now();  -- one reading of the clock for every outcome of the call
    v_item jsonb;
BEGIN
    IF p_single AND jsonb_array_length(p_items) = 1 THEN
        -- One callback (autocommit): no block to catch the engine's cases (a subtransaction per
        -- callback); TW001 reaches the caller, and the statement, its own transaction, is
        -- rolled back whole: the engine records the outcome instead (store/completions.py).
        v_item := p_items->0;
        v_result := tw_complete_one(
            (v_item->>'task_id')::uuid, (v_item->>'attempt')::int, (v_item->>'claim_token')::uuid,
            (v_item->>'ok')::boolean, COALESCE((v_item->>'retryable')::boolean, true),
            CASE WHEN jsonb_typeof(v_item->'output') = 'object' THEN v_item->'output' END,
            CASE WHEN jsonb_typeof(v_item->'error') = 'object' THEN v_item->'error' END,
            v_budget, true, v_now);
        v_claimed := COALESCE(v_result->'claimed', '[]');
        v_results := jsonb_build_array(v_result - 'claimed' || jsonb_build_object('position', 0));
    ELSE
    IF NOT p_single THEN
        -- A batch takes its tasks' rows, then the slot rows they count on, then those slots'
        -- joins, each in key order, before it records anything: the last end of a slot would
        -- otherwise lock its join mid-batch, and batches over one wide join deadlocked. Batches
        -- over one join take turns on it, as they did before slots (each held the join from its
        -- first end to its commit). A single callback takes the same rows in the same order.
        PERFORM 1 FROM tasks t
        WHERE t.id IN (SELECT (x->>'task_id')::uuid FROM jsonb_array_elements(p_items) AS x)
        ORDER BY t.id FOR UPDATE;
        PERFORM 1 FROM join_slots s JOIN task_edges e ON e.downstream_task_id = s.task_id AND e.slot = s.slot
        WHERE e.upstream_task_id IN (SELECT (x->>'task_id')::uuid FROM jsonb_array_elements(p_items) AS x)
        ORDER BY s.task_id, s.slot FOR UPDATE OF s;
        PERFORM 1 FROM tasks j
        WHERE j.id IN (SELECT e.downstream_task_id FROM task_edges e
                       WHERE e.upstream_task_id IN (SELECT (x->>'task_id')::uuid FROM jsonb_array_elements(p_items) AS x)
                         AND e.slot IS NOT NULL)
        ORDER BY j.id FOR UPDATE;
    END IF;
    FOR i IN
        SELECT (x.x->>'task_id')::uuid AS task_id, (x.x->>'attempt')::int AS attempt,
               (x.x->>'claim_token')::uuid AS claim_token, (x.x->>'ok')::boolean AS ok,
               COALESCE((x.x->>'retryable')::boolean, true) AS retryable,
               CASE WHEN jsonb_typeof(x.x->'output') = 'object' THEN x.x->'output' END AS output,
               CASE WHEN jsonb_typeof(x.x->'error') = 'object' THEN x.x->'error' END AS error,
               x.n - 1 AS position
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS x(x, n)
        LEFT JOIN tasks k ON k.id = (x.x->>'task_id')::uuid
        -- the first join the task counts through a slot (0027), and that slot
        LEFT JOIN LATERAL (SELECT e.downstream_task_id, e.slot FROM task_edges e
                           WHERE e.upstream_task_id = k.id AND e.slot IS NOT NULL
                           ORDER BY e.downstream_task_id LIMIT 1) sl ON true
        ORDER BY k.run_id, sl.downstream_task_id, sl.slot, 1, x.n
    LOOP
        IF p_catch THEN
            BEGIN
                v_result := tw_complete_one(i.task_id, i.attempt, i.claim_token, i.ok, i.retryable, i.output,
                                            i.error, v_budget, p_single, v_now);
            EXCEPTION WHEN SQLSTATE 'TW001' THEN
                v_result := jsonb_build_object('task_id', i.task_id, 'engine', true);
            END;
        ELSE
            -- no block (see the top of this file): TW001 ends the statement
            v_result := tw_complete_one(i.task_id, i.attempt, i.claim_token, i.ok, i.retryable, i.output,
                                        i.error, v_budget, p_single, v_now);
        END IF;
        IF v_result->'engine' IS NULL THEN
            v_claimed := v_claimed || COALESCE(v_result->'claimed', '[]');
            v_budget := GREATEST(v_budget - jsonb_array_length(COALESCE(v_result->'claimed', '[]')), 0);
            IF NOT p_single AND (v_result->>'accepted')::boolean AND (v_result->>'finished')::int > 0 THEN
                v_runs := jsonb_set(v_runs, ARRAY[v_result->>'run_id'], to_jsonb(
                    COALESCE((v_runs->>(v_result->>'run_id'))::int, 0) + (v_result->>'finished')::int));
            END IF;
        END IF;
        v_results := v_results || (v_result - 'claimed' || jsonb_build_object('position', i.position));
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
                    THEN v_now ELSE x.finished_at END
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

ALTER FUNCTION tw_complete_attempts(jsonb, integer, boolean, boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tw_complete_attempts(jsonb, integer, boolean, boolean) SET enable_seqscan = off;
