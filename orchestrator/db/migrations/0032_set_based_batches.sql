-- 0032: a batch of successes recorded set by set, not outcome by outcome.
--
-- A batch of callbacks (POST /api/callbacks) ran tw_complete_one once per outcome: two to four
-- queries each (the finish, the slot count, the wave of successors), so a batch of 100 paid
-- the executor's start and end, the schema's checks and its index maintenance setup 200-400
-- times. A batch whose outcomes are all plain successes is now recorded by three queries
-- whatever its size (tw_complete_successes):
--   1. the finish of every task of the batch, by key, fenced by attempt and claim token as
--      before, with their attempt records (one UPDATE ... FROM the batch's items);
--   2. when some of them count on join slots (0027): every slot they count on, counted down by
--      how many of the batch's tasks it holds, in one update;
--   3. the wave: every successor of the batch, locked in id order, counted down by how many of
--      its upstreams ended here (and by the slots completed here), decided by its rule as
--      before, the ready ones claimed in priority order within the claim budget, their
--      attempt records inserted.
-- The run counters (0026) keep their meaning: each ended task carries 1 + what was carried to
-- it; a task counting on slots leaves it on the first slot it counts on, by (join, slot), as
-- tw_complete_one does; otherwise on its first successor by id still pending; otherwise on its
-- run, whose row is counted down once per run as before (tw_complete_attempts).
--
-- "Plain" (checked on the batch's rows, locked in id order by tw_complete_attempts' first
-- query, which now also answers it): every outcome a success (the caller's catch = false),
-- the task ids distinct, none of the tasks declaring outputs, expanding a map or being an
-- item of a capped map, and none in a workspace or pipeline with a limit on active tasks (the
-- scope-aware claim is per run). Any other batch is recorded outcome by outcome as before.
-- What only the engine records (a map node made ready, a successor skipped by its rule) ends
-- the statement with TW001 on this path too: nothing of the batch is written, and the caller
-- records it again with a block per outcome (store/completions.py: BatchForTheEngine), as it
-- did when tw_complete_one raised for one outcome of such a batch.
--
-- Differences from the outcome-by-outcome path, none in what is recorded:
--   - the claim budget is spent over the whole wave in priority order (then id), not in the
--     batch's order;
--   - a successor made ready by several of the batch's tasks is counted in the `newly_ready`
--     of the last of them in the batch.

CREATE FUNCTION tw_complete_successes(p_items jsonb, p_claim_limit integer, p_now timestamptz)
    RETURNS jsonb
    LANGUAGE plpgsql
AS $$
-- A plain batch of successes (see the top of this file), its task rows already locked by the
-- caller in id order, then its slot rows, then their joins. Returns the batch's answers (in
-- its order), the tasks claimed, and what each run's counter takes ({run id: count}).
DECLARE
    v_live text[] := ARRAY['dispatched', 'running'];  -- parameters to the plans (0029, 0031)
    v_pending text[] := ARRAY['pending'];
    v_ids uuid[];
    v_runs_of uuid[];
    v_carry integer[];
    v_positions integer[];
    v_slotted boolean[];
    v_any_slots boolean;
    v_slot_ids uuid[] := '{}';
    v_slot_n integer[] := '{}';
    v_slot_carried integer[] := '{}';
    v_slot_positions integer[] := '{}';
    v_slot_runs uuid[] := '{}';
    v_claimed jsonb;
    v_ready_by integer[];
    v_landed_to_run jsonb;
    v_engine boolean;
    v_results jsonb;
    v_attempts integer[];
    v_answers jsonb;
BEGIN
    -- 1. The finish, by key and fenced, and the attempt records.
    WITH items AS (
        SELECT (x->>'task_id')::uuid AS task_id, (x->>'attempt')::int AS attempt,
               (x->>'claim_token')::uuid AS claim_token,
               CASE WHEN jsonb_typeof(x->'output') = 'object' THEN x->'output' END AS output,
               (n - 1)::int AS position
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS a(x, n)
    ), finished AS (
        UPDATE tasks t SET status = 'succeeded', finished_at = p_now, output = i.output, error = NULL,
                           lease_expires_at = NULL, claim_token = NULL
        FROM items i
        -- `= ANY` of the ids: an index condition on the key whichever side the planner drives
        -- the join from (every join of a set to a table below has one)
        WHERE t.id = ANY (ARRAY(SELECT i2.task_id FROM items i2)) AND t.id = i.task_id
          AND t.attempt = i.attempt AND t.claim_token = i.claim_token AND t.status = ANY (v_live)
        RETURNING t.id, t.run_id, t.attempt, 1 + t.carried_tasks AS carry, i.position,
                  (SELECT COALESCE(bool_or(e.slot IS NOT NULL), false)
                   FROM task_edges e WHERE e.upstream_task_id = t.id) AS slotted,
                  jsonb_build_object('task_id', t.id, 'accepted', true, 'outcome', 'succeeded',
                                     'task_status', 'succeeded', 'run_id', t.run_id,
                                     'workspace_id', t.workspace_id, 'pipeline_id', t.pipeline_id,
                                     'node_id', t.node_id, 'version', t.version, 'run_status', NULL,
                                     'claim_in_run', false, 'position', i.position) AS answer
    )
    SELECT COALESCE(array_agg(f.id ORDER BY f.position), '{}'),
           COALESCE(array_agg(f.run_id ORDER BY f.position), '{}'),
           COALESCE(array_agg(f.carry ORDER BY f.position), '{}'),
           COALESCE(array_agg(f.position ORDER BY f.position), '{}'),
           COALESCE(array_agg(f.slotted ORDER BY f.position), '{}'),
           COALESCE(bool_or(f.slotted), false),
           COALESCE(array_agg(f.attempt ORDER BY f.position), '{}'),
           COALESCE(jsonb_object_agg(f.position::text, f.answer), '{}')
      INTO v_ids, v_runs_of, v_carry, v_positions, v_slotted, v_any_slots, v_attempts, v_answers
    FROM finished f;
    UPDATE task_attempts x SET status = 'succeeded', finished_at = p_now, error = NULL
    FROM unnest(v_ids, v_attempts) AS f(id, attempt)
    WHERE x.task_id = ANY (v_ids) AND x.task_id = f.id AND x.attempt = f.attempt AND x.status = ANY (v_live);

    -- 2. The join slots they count on: each counted down by the batch's tasks it holds; the
    -- carry of a task goes to its first slot by (join, slot), as tw_complete_one's. The slots
    -- completed here are applied to their joins by the wave.
    IF v_any_slots THEN
        WITH edges AS (
            SELECT e.downstream_task_id, e.slot, f.carry, f.position,
                   row_number() OVER (PARTITION BY e.upstream_task_id
                                      ORDER BY e.downstream_task_id, e.slot) = 1 AS takes
            FROM unnest(v_ids, v_carry, v_positions) AS f(id, carry, position)
            JOIN task_edges e ON e.upstream_task_id = f.id
            WHERE e.upstream_task_id = ANY (v_ids) AND e.slot IS NOT NULL
        ), per_slot AS (
            SELECT x.downstream_task_id, x.slot, count(*)::int AS n,
                   sum(CASE WHEN x.takes THEN x.carry ELSE 0 END)::int AS carry, max(x.position) AS position
            FROM edges x GROUP BY x.downstream_task_id, x.slot
        ), found AS (
            -- each slot row by its whole key (a lookup per slot, not every slot of its join),
            -- then updated by its row address: the rows are locked since tw_complete_attempts'
            -- first queries, so the address holds
            SELECT p.*, x.row_address
            FROM per_slot p
            CROSS JOIN LATERAL (SELECT s.ctid AS row_address FROM join_slots s
                                WHERE s.task_id = p.downstream_task_id AND s.slot = p.slot OFFSET 0) x
        ), counted AS (
            UPDATE join_slots s SET remaining = s.remaining - p.n, arrived = s.arrived + p.n,
                                    carried = s.carried + p.carry
            FROM found p
            WHERE s.ctid = ANY (ARRAY(SELECT f2.row_address FROM found f2)) AND s.ctid = p.row_address
            RETURNING s.task_id, s.run_id, s.remaining, s.arrived, s.carried, p.position
        )
        SELECT COALESCE(array_agg(c.task_id) FILTER (WHERE c.remaining = 0), '{}'),
               COALESCE(array_agg(c.arrived) FILTER (WHERE c.remaining = 0), '{}'),
               COALESCE(array_agg(c.carried) FILTER (WHERE c.remaining = 0), '{}'),
               COALESCE(array_agg(c.position) FILTER (WHERE c.remaining = 0), '{}'),
               COALESCE(array_agg(c.run_id) FILTER (WHERE c.remaining = 0), '{}')
          INTO v_slot_ids, v_slot_n, v_slot_carried, v_slot_positions, v_slot_runs
        FROM counted c;
    END IF;

    -- 3. The wave.
    WITH ends AS (
        SELECT * FROM unnest(v_ids, v_runs_of, v_carry, v_positions, v_slotted)
                      AS f(id, run_id, carry, position, slotted)
    ), plain_edges AS (  -- successors not counted through a slot
        SELECT f.id AS upstream_id, f.carry, f.position, f.slotted, e.downstream_task_id AS id
        FROM ends f JOIN task_edges e ON e.upstream_task_id = f.id
        WHERE e.upstream_task_id = ANY (v_ids) AND e.slot IS NULL
    ), slot_hits AS (  -- joins of the slots completed here
        SELECT * FROM unnest(v_slot_ids, v_slot_n, v_slot_carried, v_slot_positions, v_slot_runs)
                      AS s(id, n, carried, position, run_id)
    ), locked AS (
        SELECT t.id, t.run_id, t.unfinished_deps, t.failed_deps, t.skipped_deps, t.trigger_rule, t.kind,
               t.map_width, t.map_max_concurrency, t.priority
        FROM tasks t
        WHERE t.id = ANY (ARRAY(SELECT p.id FROM plain_edges p UNION SELECT s.id FROM slot_hits s))
          AND t.status = ANY (v_pending)
        ORDER BY t.id FOR UPDATE OF t
    ), targets AS (  -- where each task's carry goes when it counts on no slot: its first pending successor
        SELECT DISTINCT ON (p.upstream_id) p.upstream_id, p.id
        FROM plain_edges p JOIN locked l ON l.id = p.id
        WHERE NOT p.slotted
        ORDER BY p.upstream_id, p.id
    ), hits AS (
        SELECT h.id, sum(h.n)::int AS n, sum(h.carried_in)::int AS carried_in, max(h.position) AS position
        FROM (SELECT p.id, 1 AS n, CASE WHEN tg.id IS NOT NULL THEN p.carry ELSE 0 END AS carried_in, p.position
              FROM plain_edges p LEFT JOIN targets tg ON tg.upstream_id = p.upstream_id AND tg.id = p.id
              UNION ALL
              SELECT s.id, s.n, s.carried, s.position FROM slot_hits s) h
        GROUP BY h.id
    ), decided AS (
        SELECT l.id, h.n, h.carried_in, h.position, l.kind, l.priority,
               CASE WHEN l.unfinished_deps - h.n > 0 THEN 'pending'
                    WHEN l.map_width IS NOT NULL OR CASE l.trigger_rule
                             WHEN 'all_done' THEN true
                             WHEN 'none_failed' THEN l.failed_deps = 0
                             WHEN 'one_failed' THEN l.failed_deps > 0
                             ELSE l.skipped_deps = 0
                         END THEN CASE WHEN l.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END
                    ELSE 'skipped' END AS next_status,
               l.kind NOT IN ('map', 'approval', 'manual') AND l.map_max_concurrency IS NULL AS runnable
        FROM locked l JOIN hits h ON h.id = l.id
    ), ranked AS (
        SELECT d.*, d.next_status = 'ready' AND d.runnable
                    AND row_number() OVER (PARTITION BY d.next_status = 'ready' AND d.runnable
                                           ORDER BY d.priority DESC, d.id) <= GREATEST(p_claim_limit, 0) AS claim
        FROM decided d
        -- a successor skipped by its rule, or a map node to expand or settle: the engine's (below)
        WHERE NOT EXISTS (SELECT 1 FROM decided x
                          WHERE x.next_status = 'skipped' OR (x.kind = 'map' AND x.next_status <> 'pending'))
    ), advanced AS (
        UPDATE tasks t SET
            unfinished_deps = t.unfinished_deps - r.n,
            status = CASE WHEN r.claim THEN 'dispatched' ELSE r.next_status END,
            available_at = CASE WHEN r.next_status = 'pending' THEN t.available_at ELSE p_now END,
            wait_expires_at = CASE WHEN t.kind IN ('approval', 'manual') AND t.timeout_s IS NOT NULL
                                   THEN p_now + make_interval(secs => t.timeout_s) END,
            attempt = CASE WHEN r.claim THEN t.attempt + 1 ELSE t.attempt END,
            claim_token = CASE WHEN r.claim THEN gen_random_uuid() ELSE t.claim_token END,
            dispatched_at = CASE WHEN r.claim THEN p_now ELSE t.dispatched_at END,
            lease_expires_at = CASE WHEN r.claim THEN LEAST(
                p_now + make_interval(secs => 2 * t.heartbeat_s),
                p_now + make_interval(secs => COALESCE(t.timeout_s, 2147483647))) ELSE t.lease_expires_at END,
            progress = CASE WHEN r.claim THEN NULL ELSE t.progress END,
            message = CASE WHEN r.claim THEN NULL ELSE t.message END,
            carried_tasks = t.carried_tasks + r.carried_in
        FROM ranked r
        WHERE t.id = ANY (ARRAY(SELECT r2.id FROM ranked r2)) AND t.id = r.id AND t.status = ANY (v_pending)
        RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                  t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                  t.timeout_s, t.lease_expires_at, t.dispatched_at, t.status, r.position
    ), attempts AS (
        INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
        SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM advanced c
        WHERE c.status = 'dispatched'
    ), to_runs AS (  -- what reaches the runs' counters: carries with nowhere to go
        SELECT f.run_id, f.carry AS n FROM ends f
        WHERE NOT f.slotted AND NOT EXISTS (SELECT 1 FROM targets tg WHERE tg.upstream_id = f.id)
        UNION ALL  -- a slot completed for a join no longer pending: what it carried
        SELECT s.run_id, s.carried FROM slot_hits s WHERE NOT EXISTS (SELECT 1 FROM locked l WHERE l.id = s.id)
    )
    SELECT (SELECT COALESCE(jsonb_agg(to_jsonb(c) - ARRAY['status', 'position']), '[]')
            FROM advanced c WHERE c.status = 'dispatched'),
           (SELECT COALESCE(array_agg(c.position), '{}') FROM advanced c WHERE c.status IN ('ready', 'dispatched')),
           (SELECT COALESCE(jsonb_object_agg(x.run_id, x.n), '{}')
            FROM (SELECT r.run_id, sum(r.n)::int AS n FROM to_runs r GROUP BY r.run_id HAVING sum(r.n) > 0) x),
           EXISTS (SELECT 1 FROM decided x WHERE x.next_status = 'skipped' OR (x.kind = 'map' AND x.next_status <> 'pending'))
      INTO v_claimed, v_ready_by, v_landed_to_run, v_engine;
    IF v_engine THEN
        RAISE EXCEPTION 'for the engine' USING ERRCODE = 'TW001';
    END IF;

    -- The answers, in the batch's order: the ended tasks' (with the successors each made ready,
    -- counted on the last of their upstreams in the batch), and the refused ones'.
    SELECT jsonb_agg(COALESCE(
               v_answers->((a.n - 1)::text)
                   || jsonb_build_object('newly_ready', (SELECT count(*) FROM unnest(v_ready_by) AS r(p)
                                                         WHERE r.p = a.n - 1)),
               jsonb_build_object('task_id', a.x->>'task_id', 'accepted', false, 'position', a.n - 1))
           ORDER BY a.n)
      INTO v_results
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS a(x, n);

    RETURN jsonb_build_object('results', v_results, 'claimed', v_claimed, 'runs', v_landed_to_run);
END
$$;

ALTER FUNCTION tw_complete_successes(jsonb, integer, timestamptz) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tw_complete_successes(jsonb, integer, timestamptz) SET enable_seqscan = off;

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
    v_plain boolean := false;
    v_set jsonb;
    v_item_ids uuid[];
BEGIN
    -- 0030's function; a plain batch of successes is recorded by tw_complete_successes (see the
    -- top of this file), answered by the query that locks the batch's tasks.
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
        v_item_ids := ARRAY(SELECT (x->>'task_id')::uuid FROM jsonb_array_elements(p_items) AS x);
        WITH l AS (
            SELECT t.workspace_id, t.pipeline_id, t.output_names, t.map_targets, t.map_max_concurrency
            FROM tasks t
            WHERE t.id = ANY (v_item_ids)
            ORDER BY t.id FOR UPDATE
        )
        SELECT COALESCE(bool_and(COALESCE(cardinality(l.output_names), 0) = 0 AND l.map_targets IS NULL
                                 AND l.map_max_concurrency IS NULL), true)
               AND NOT COALESCE((SELECT bool_or((SELECT w.max_active_tasks IS NOT NULL OR p.max_active_tasks IS NOT NULL
                                                  FROM pipelines p JOIN workspaces w ON w.id = p.workspace_id
                                                  WHERE p.workspace_id = k.workspace_id AND p.id = k.pipeline_id))
                                 FROM (SELECT DISTINCT l2.workspace_id, l2.pipeline_id FROM l l2) k), false)
          INTO v_plain
        FROM l;
        -- a batch of successes only (the caller's catch = false: no outcome may fail), each task once
        v_plain := v_plain AND NOT p_catch
                   AND (SELECT count(DISTINCT x->>'task_id') FROM jsonb_array_elements(p_items) AS x)
                       = jsonb_array_length(p_items);
        -- (0030's two queries, each join from the batch's edges to a table given an `= ANY` of
        -- keys or a lookup by the whole key: a join of 1,000 read its 1,000 edges per slot, per
        -- batch, when the plan was made on statistics taken before the run started, and every
        -- slot of each join the batch reached; the batch's own tasks, above, were read by a scan
        -- of the whole key in its order.) The slots are locked one by one in key order: a nested
        -- loop over the sorted keys.
        PERFORM 1
        FROM (SELECT DISTINCT e.downstream_task_id, e.slot FROM task_edges e
              WHERE e.upstream_task_id = ANY (v_item_ids) AND e.slot IS NOT NULL
              ORDER BY e.downstream_task_id, e.slot) k
        CROSS JOIN LATERAL (SELECT 1 FROM join_slots s WHERE s.task_id = k.downstream_task_id AND s.slot = k.slot
                            FOR UPDATE) x;
        PERFORM 1 FROM tasks j
        WHERE j.id = ANY (ARRAY(SELECT e.downstream_task_id FROM task_edges e
                                WHERE e.upstream_task_id = ANY (v_item_ids) AND e.slot IS NOT NULL))
        ORDER BY j.id FOR UPDATE;
    END IF;
    IF v_plain THEN
        v_set := tw_complete_successes(p_items, v_budget, v_now);
        v_results := v_set->'results';
        v_claimed := v_set->'claimed';
        v_runs := v_set->'runs';
        v_budget := GREATEST(v_budget - jsonb_array_length(v_claimed), 0);
    ELSE
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
    END IF;

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
