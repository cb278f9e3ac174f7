-- 0030: a callback's statement runs four queries fewer inside it.
--
-- What is left of a callback's server CPU is mostly the machinery of statements (bench `backend`
-- part: starting and ending each query's executor, a quarter of it), not their data work. The
-- deep DAG's callback (the successor claimed, its dispatch context read) ran seven queries
-- inside tw_complete_attempts; it now runs four:
--   - the claimed tasks' dispatch context is read by one query of tw_complete_attempts, which
--     gathers their ids and their routes' keys itself (two queries before it did that) and
--     reads the context through tw_dispatch_context_of, a SQL function the planner inlines: no
--     call of a PL/pgSQL function, whose own settings (enable_seqscan, plan_cache_mode) were
--     saved and restored around every call, and no query of its own inside it. The caller's
--     settings are the same ones, so the inlined query is planned as before.
--   - tw_complete_one added what a completed slot carried with a query (a sum over an array)
--     after every wave; it is run only when a slot was completed.
-- tw_dispatch_context (the tick's dispatch, store/dispatch.py) keeps its name, arguments and
-- settings, and reads through the same SQL function: one text of the query.
--
-- The function bodies are 0029's (tw_complete_one) and 0028's (tw_complete_attempts) with the
-- changes above; CREATE OR REPLACE resets a function's settings, so they are set again below.

-- The dispatch context of the tasks claimed and the routes of their (workspace, task name) pairs:
-- 0019's query. LANGUAGE sql, STABLE, not STRICT and without settings of its own, so
-- that the planner inlines it into the query that calls it.
CREATE FUNCTION tw_dispatch_context_of(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb, maps jsonb)
    LANGUAGE sql STABLE
AS $$
SELECT
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
                'transport', w.transport, 'endpoint', w.endpoint, 'service', w.service)), '[]')
     FROM worker_tasks wt JOIN workers w ON w.workspace_id = wt.workspace_id AND w.service = wt.service
     WHERE (wt.workspace_id, wt.task_name) IN (SELECT * FROM unnest(p_workspaces, p_task_names))),
    (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                'task_id', t.id, 'index', t.map_index, 'item', t.map_item, 'count', p.map_width)), '[]')
     FROM tasks t JOIN tasks p ON p.id = t.map_parent_id
     WHERE t.id = ANY(p_task_ids))
$$;

CREATE OR REPLACE FUNCTION tw_dispatch_context(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb, maps jsonb)
    LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT * FROM tw_dispatch_context_of(p_task_ids, p_workspaces, p_task_names);
END
$$;

ALTER FUNCTION tw_dispatch_context(uuid[], text[], text[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tw_dispatch_context(uuid[], text[], text[]) SET enable_seqscan = off;

CREATE OR REPLACE FUNCTION tw_complete_one(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb, p_claim_limit integer, p_single boolean, p_now timestamptz
) RETURNS jsonb
    LANGUAGE plpgsql
AS $$
-- 0029's function, with the carried count of a completed slot summed only when there is one
-- (see the top of this file).
DECLARE
    f record;
    v_now timestamptz := p_now;
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
    v_carry integer;
    v_landed boolean;
    v_wave_carry integer;
    v_slot_ids uuid[] := '{}';
    v_slot_n integer[] := '{}';
    v_slot_carried integer[] := '{}';
    v_slotted integer := 0;
    v_slot_applied integer;
    v_hit_ids uuid[] := '{}';
    v_hit_n integer[] := '{}';
    v_has_slots boolean;
    v_capped boolean;
    v_live text[] := ARRAY['dispatched', 'running'];  -- a parameter to the plan: see the top of this file
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
          AND t.status = ANY (v_live)
        RETURNING t.run_id, t.node_id, t.version, t.status, t.workspace_id, t.pipeline_id, t.output_names,
                  t.map_targets, t.map_max_concurrency, t.carried_tasks,
                  -- whether the run's scopes limit its tasks: then tw_claim_ready_tasks claims
                  -- them (below)
                  COALESCE((SELECT w.max_active_tasks IS NOT NULL OR p.max_active_tasks IS NOT NULL
                            FROM pipelines p JOIN workspaces w ON w.id = p.workspace_id
                            WHERE p.workspace_id = t.workspace_id AND p.id = t.pipeline_id), false) AS limited,
                  -- the task's edges, read once: its successors not counted through a slot (the
                  -- first wave's hits, one edge each), and whether any is (a join of
                  -- JOIN_SLOTS_FROM upstreams or more)
                  (SELECT COALESCE(array_agg(e.downstream_task_id) FILTER (WHERE e.slot IS NULL), '{}')
                   FROM task_edges e WHERE e.upstream_task_id = t.id) AS hit_ids,
                  (SELECT COALESCE(bool_or(e.slot IS NOT NULL), false)
                   FROM task_edges e WHERE e.upstream_task_id = t.id) AS has_slots,
                  -- the run's status, for the answer when the run's row is not updated (unlocked)
                  (SELECT r.status FROM runs r WHERE r.id = t.run_id) AS run_status
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
       OR (f.map_max_concurrency IS NOT NULL AND f.status <> 'succeeded')  -- a capped item's retry
       OR f.status NOT IN ('succeeded', 'ready') THEN
        RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
    END IF;
    IF f.status = 'ready' THEN  -- a retry was scheduled: the run is unaffected
        RETURN jsonb_build_object('task_id', p_task_id, 'accepted', true, 'outcome', 'retrying',
                                  'task_status', 'ready', 'run_id', f.run_id, 'workspace_id', f.workspace_id,
                                  'pipeline_id', f.pipeline_id, 'node_id', f.node_id, 'version', f.version,
                                  'newly_ready', 0, 'finished', 0, 'claimed', '[]'::jsonb);
    END IF;
    -- What this task's end takes off the run's count: itself and what was carried to it.
    v_carry := 1 + f.carried_tasks;

    -- Successors counted through slots: this end is counted on its slot's row (and the count
    -- carried there, to the first of them by id), not on the join's; the slot's last upstream
    -- to end applies the slot to the join (below, with the other successors). Slot rows are
    -- locked before successor rows, on every path.
    v_hit_ids := f.hit_ids;  -- read by the finishing update
    v_has_slots := f.has_slots;
    v_hit_n := array_fill(1, ARRAY[cardinality(v_hit_ids)]);
    IF v_has_slots THEN
    WITH counted AS (
        UPDATE join_slots s SET remaining = s.remaining - 1, arrived = s.arrived + 1,
                                carried = s.carried + CASE WHEN e.takes THEN v_carry ELSE 0 END
        FROM (SELECT x.downstream_task_id, x.slot,
                     row_number() OVER (ORDER BY x.downstream_task_id, x.slot) = 1 AS takes
              FROM task_edges x WHERE x.upstream_task_id = p_task_id AND x.slot IS NOT NULL) e
        WHERE s.task_id = e.downstream_task_id AND s.slot = e.slot
        RETURNING s.task_id, s.remaining, s.arrived, s.carried
    )
    SELECT count(*)::int,
           COALESCE(array_agg(c.task_id) FILTER (WHERE c.remaining = 0), '{}'),
           COALESCE(array_agg(c.arrived) FILTER (WHERE c.remaining = 0), '{}'),
           COALESCE(array_agg(c.carried) FILTER (WHERE c.remaining = 0), '{}')
      INTO v_slotted, v_slot_ids, v_slot_n, v_slot_carried
    FROM counted c;
    END IF;
    IF v_slotted > 0 THEN
        v_carry := 0;  -- carried to a slot
    END IF;
    v_limited := f.limited;
    -- An item of a capped map: its end makes room under the cap, which the scope-aware claim
    -- fills (below, after the map node's row is counted down and held).
    v_capped := f.map_max_concurrency IS NOT NULL;

    v_budget := CASE WHEN v_limited THEN 0 ELSE GREATEST(p_claim_limit, 0) END;

    -- The successors, wave by wave: a successor skipped by its rule advances its own (as
    -- skipped). Locked in id order, as tw_advance_successors does. A successor whose rule
    -- holds and that a worker runs is claimed by the same update, while the budget lasts (in
    -- priority order): it goes from pending to dispatched with its new attempt, lease and token,
    -- never written as ready (one row version and its index entries fewer).
    -- Nothing to advance (a task without successors, or whose only successors are counted
    -- through slots none of which it completed): no wave, whose statement would find nothing.
    v_frontier := CASE WHEN cardinality(v_hit_ids) = 0 AND cardinality(v_slot_ids) = 0 THEN '{}'::uuid[]
                       ELSE ARRAY[p_task_id] END;
    WHILE cardinality(v_frontier) > 0 LOOP
        WITH hits AS (  -- this wave's successors, and how many of its tasks each counts
            SELECT x.id, x.n, 0 AS carried_in FROM unnest(v_hit_ids, v_hit_n) AS x(id, n)
            UNION ALL  -- slots completed by this end (first wave only): their ends and counts carried
            SELECT x.id, x.n, x.carried_in FROM unnest(v_slot_ids, v_slot_n, v_slot_carried) AS x(id, n, carried_in)
        ), locked AS (
            SELECT t.id, h.n, h.carried_in, t.unfinished_deps, t.failed_deps, t.skipped_deps, t.trigger_rule, t.kind,
                   t.map_width, t.map_max_concurrency, t.priority
            FROM tasks t JOIN hits h ON h.id = t.id
            WHERE t.status = 'pending' ORDER BY t.id FOR UPDATE OF t
        ), decided AS (
            SELECT l.id, l.n, l.carried_in, l.kind, l.priority,
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
                                               ORDER BY d.priority DESC, d.id) <= v_budget AS claim,
                   -- the successor the count is carried to: the first by id not finished here
                   v_carry > 0 AND d.next_status <> 'skipped'
                        AND row_number() OVER (ORDER BY d.next_status = 'skipped', d.id) = 1 AS carry
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
                message = CASE WHEN r.claim THEN NULL ELSE t.message END,
                carried_tasks = t.carried_tasks + r.carried_in + CASE WHEN r.carry THEN v_carry ELSE 0 END
            FROM ranked r WHERE t.id = r.id AND t.status = 'pending'
            RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                      t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                      t.timeout_s, t.lease_expires_at, t.dispatched_at, t.status, t.carried_tasks, r.carry,
                      r.carried_in
        ), attempts AS (
            INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
            SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM advanced c
            WHERE c.status = 'dispatched'
        )
        SELECT COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'skipped'), '{}'),
               COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'ready' AND c.kind <> 'map'), '{}'),
               COALESCE(bool_or(c.kind = 'map' AND c.status <> 'pending'), false),
               COALESCE(jsonb_agg(to_jsonb(c) - ARRAY['status', 'carried_tasks', 'carry', 'carried_in'])
                        FILTER (WHERE c.status = 'dispatched'), '[]'),
               count(*) FILTER (WHERE c.status = 'dispatched'),
               COALESCE(bool_or(c.carry), false),
               COALESCE(sum(c.carried_tasks) FILTER (WHERE c.status = 'skipped'), 0),
               COALESCE(sum(c.carried_in), 0)
          INTO v_next, v_wave_ready, v_map, v_wave_claimed, v_wave_count, v_landed, v_wave_carry, v_slot_applied
        FROM advanced c;
        IF v_map THEN  -- a map node to expand or settle
            RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
        END IF;
        v_ready := v_ready || v_wave_ready;
        v_claimed := v_claimed || v_wave_claimed;
        v_newly := v_newly + cardinality(v_wave_ready) + v_wave_count;
        v_budget := v_budget - v_wave_count;
        v_skipped := v_skipped + cardinality(v_next);
        -- Carried on, unless a successor took it; the tasks skipped here add themselves and
        -- what was carried to them, for their own successors (or the run).
        v_carry := CASE WHEN v_landed THEN 0 ELSE v_carry END + cardinality(v_next) + v_wave_carry;
        -- a completed slot of a join no longer pending (skipped by a stopping failure, say): what
        -- was carried to the slot has no successor left to go to
        -- a query, not an expression (a statement of its own): run only when this wave completed a slot
        IF cardinality(v_slot_carried) > 0 THEN
            v_carry := v_carry + (SELECT sum(x) FROM unnest(v_slot_carried) AS x)::int - v_slot_applied;
        END IF;
        v_slot_ids := '{}';
        v_slot_n := '{}';
        v_slot_carried := '{}';
        v_frontier := v_next;
        v_skip := 1;
        IF cardinality(v_frontier) > 0 THEN  -- a skip wave: the skipped tasks' successors
            SELECT COALESCE(array_agg(h.id), '{}'), COALESCE(array_agg(h.n), '{}'), COALESCE(bool_or(h.slotted), false)
              INTO v_hit_ids, v_hit_n, v_has_slots
            FROM (SELECT e.downstream_task_id AS id, count(*)::int AS n, bool_or(e.slot IS NOT NULL) AS slotted
                  FROM task_edges e WHERE e.upstream_task_id = ANY (v_frontier)
                  GROUP BY e.downstream_task_id) h;
            IF v_has_slots THEN
                -- a skip reaching a join counted through slots: the engine's path counts it
                RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
            END IF;
        END IF;
    END LOOP;

    IF p_single AND v_carry > 0 THEN
        -- No successor to carry to: the run's counters, last (the run row is held from here to
        -- the commit).
        UPDATE runs r SET
            unfinished_tasks = r.unfinished_tasks - v_carry,
            status = CASE
                WHEN r.status IN ('succeeded', 'failed', 'cancelled') THEN r.status
                WHEN r.unfinished_tasks - v_carry = 0 THEN
                    CASE WHEN r.failed_tasks > 0 THEN 'failed' ELSE 'succeeded' END
                ELSE r.status END,
            finished_at = CASE
                WHEN r.finished_at IS NULL AND r.unfinished_tasks - v_carry = 0
                THEN v_now ELSE r.finished_at END
        FROM (SELECT runs.id, runs.status FROM runs WHERE runs.id = f.run_id FOR NO KEY UPDATE) AS before
        WHERE r.id = before.id
        RETURNING r.status, before.status AS previous_status INTO v_run;
        IF v_run.previous_status = 'running' AND v_run.status IN ('succeeded', 'failed') THEN
            RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';  -- the run ended
        END IF;
        v_run_status := v_run.status;
    ELSIF p_single THEN
        v_run_status := f.run_status;  -- for the answer, read by the finishing update; unlocked
    END IF;
    IF p_single THEN
        IF (v_limited AND cardinality(v_ready) > 0 OR v_capped)
           AND p_claim_limit - jsonb_array_length(v_claimed) > 0 THEN
            SELECT v_claimed || COALESCE(jsonb_agg(to_jsonb(c)), '[]') INTO v_claimed
            FROM tw_claim_ready_tasks(p_claim_limit - jsonb_array_length(v_claimed), f.run_id) c;
        END IF;
    END IF;

    RETURN jsonb_build_object(
        'task_id', p_task_id, 'accepted', true, 'outcome', 'succeeded', 'task_status', 'succeeded',
        'run_id', f.run_id, 'workspace_id', f.workspace_id, 'pipeline_id', f.pipeline_id,
        'node_id', f.node_id, 'version', f.version,
        'run_status', v_run_status,
        'newly_ready', v_newly, 'finished', v_carry,
        'claim_in_run', v_limited AND cardinality(v_ready) > 0 OR v_capped, 'claimed', v_claimed);
END
$$;

CREATE OR REPLACE FUNCTION tw_complete_attempts(p_items jsonb, p_claim_limit integer, p_single boolean,
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
        -- one statement: the claimed tasks' ids and routes' keys, and their context (the query of
        -- tw_dispatch_context_of, inlined by the planner)
        -- (aliases apart from the function's variables: i and r are records of its loops)
        SELECT ctx.inputs, ctx.upstream, ctx.routes, ctx.maps INTO v_ctx
        FROM (SELECT array_agg((c->>'id')::uuid) AS ids FROM jsonb_array_elements(v_claimed) c) claimed
        CROSS JOIN (SELECT COALESCE(array_agg(k.ws ORDER BY k.ws, k.name), '{}') AS ws,
                           COALESCE(array_agg(k.name ORDER BY k.ws, k.name), '{}') AS names
                    FROM (SELECT DISTINCT c->>'workspace_id' AS ws, c->>'task_name' AS name
                          FROM jsonb_array_elements(v_claimed) c WHERE c->>'task_name' IS NOT NULL) k) route_keys
        CROSS JOIN LATERAL tw_dispatch_context_of(claimed.ids, route_keys.ws, route_keys.names) ctx;
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
