-- 0033: a chain's link advanced by a small query.
--
-- A deep DAG's callback (one successor, counted by this end alone) ran the general wave query of
-- tw_complete_one: a union of the hits with the completed slots, a sort to lock them in id
-- order, two window functions for the claim budget and the count carried, and their CTEs. With
-- one row, none of that decides anything, but every node of the plan is started and ended on
-- every call: the bench `backend` part put a fifth of a deep callback's server CPU in
-- starting plans (standard_ExecutorStart: ExecInitSort, ExecInitWindowAgg, ExecInitAppend,
-- ExecInitCteScan, ExecInitLockRows, ExecInitFunctionScan), more than in reading rows.
--
-- The first wave with exactly one successor not counted through a slot, and no slot completed
-- by this end, now runs a query written for that one row: the successor locked by its key, its
-- next status decided by the same expression with n = 1 and no skip, the claim taken when the
-- budget is at least 1 (the window's rank is 1), the run's count carried to it when it is not
-- skipped (rank 1 of the rows not skipped). Every other wave (several successors, slots, a
-- skip wave) runs the general query as before. The answer and the writes are the same:
-- test_chain_link_wave.py runs both queries over the same cases and compares the rows.
--
-- The function is 0030's otherwise; it has no settings of its own (it runs with
-- tw_complete_attempts').

CREATE OR REPLACE FUNCTION tw_complete_one(
    p_task_id uuid, p_attempt integer, p_claim_token uuid, p_ok boolean, p_retryable boolean,
    p_output jsonb, p_error jsonb, p_claim_limit integer, p_single boolean, p_now timestamptz
) RETURNS jsonb
    LANGUAGE plpgsql
AS $$
-- 0030's function, with a first wave of one successor and no slot run by the small query (see
-- the top of this file).
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
        IF v_skip = 0 AND cardinality(v_hit_ids) = 1 AND cardinality(v_slot_ids) = 0 THEN
        -- The first wave with one successor counted by this end alone and no slot completed (a
        -- chain's link): the general query below with its one row written out. No union of
        -- hits, no sort for the locks, no window for the budget and the carry: a plan a third of
        -- the size, started and ended on every callback. Same decisions, same writes.
        WITH locked AS (
            SELECT t.id,
                   CASE WHEN t.unfinished_deps - 1 > 0 THEN 'pending'
                        WHEN t.map_width IS NOT NULL OR CASE t.trigger_rule
                                 WHEN 'all_done' THEN true
                                 WHEN 'none_failed' THEN t.failed_deps = 0
                                 WHEN 'one_failed' THEN t.failed_deps > 0
                                 ELSE t.skipped_deps = 0
                             END THEN CASE WHEN t.kind IN ('approval', 'manual') THEN 'waiting' ELSE 'ready' END
                        ELSE 'skipped' END AS next_status,
                   t.kind NOT IN ('map', 'approval', 'manual') AND t.map_max_concurrency IS NULL AS runnable
            FROM tasks t
            WHERE t.id = v_hit_ids[1] AND t.status = 'pending' FOR UPDATE OF t
        ), ranked AS (
            SELECT l.id, l.next_status, l.next_status = 'ready' AND l.runnable AND v_budget >= 1 AS claim,
                   v_carry > 0 AND l.next_status <> 'skipped' AS carry
            FROM locked l
        ), advanced AS (
            UPDATE tasks t SET
                unfinished_deps = t.unfinished_deps - 1,
                status = CASE WHEN r.claim THEN 'dispatched' ELSE r.next_status END,
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
                carried_tasks = t.carried_tasks + CASE WHEN r.carry THEN v_carry ELSE 0 END
            FROM ranked r WHERE t.id = r.id AND t.status = 'pending'
            RETURNING t.id, t.run_id, t.workspace_id, t.pipeline_id, t.node_id, t.version, t.kind,
                      t.task_name, t.params, t.transport, t.attempt, t.claim_token, t.heartbeat_s,
                      t.timeout_s, t.lease_expires_at, t.dispatched_at, t.status, t.carried_tasks, r.carry
        ), attempts AS (
            INSERT INTO task_attempts (task_id, attempt, claim_token, status, dispatched_at)
            SELECT c.id, c.attempt, c.claim_token, 'dispatched', c.dispatched_at FROM advanced c
            WHERE c.status = 'dispatched'
        )
        SELECT COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'skipped'), '{}'),
               COALESCE(array_agg(c.id) FILTER (WHERE c.status = 'ready' AND c.kind <> 'map'), '{}'),
               COALESCE(bool_or(c.kind = 'map' AND c.status <> 'pending'), false),
               COALESCE(jsonb_agg(to_jsonb(c) - ARRAY['status', 'carried_tasks', 'carry'])
                        FILTER (WHERE c.status = 'dispatched'), '[]'),
               count(*) FILTER (WHERE c.status = 'dispatched'),
               COALESCE(bool_or(c.carry), false),
               COALESCE(sum(c.carried_tasks) FILTER (WHERE c.status = 'skipped'), 0),
               0
          INTO v_next, v_wave_ready, v_map, v_wave_claimed, v_wave_count, v_landed, v_wave_carry, v_slot_applied
        FROM advanced c;
        ELSE
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
        END IF;
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

