-- 0018: tw_finish_attempt (0016) also returns map_max_concurrency. An item of a map node with
-- max_concurrency that finishes (or goes back to wait for its retry) frees a place under that
-- limit while making nothing newly ready (its siblings were ready all along): the callback claims
-- for the run anyway, so the next item starts at once instead of at the next tick.

DROP FUNCTION tw_finish_attempt(uuid, integer, uuid, boolean, boolean, jsonb, jsonb);
CREATE FUNCTION tw_finish_attempt(
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
                  t.pipeline_id, t.output_names, t.map_targets, t.map_max_concurrency
    )
    SELECT * FROM finished;
END
$$;

