-- 0013: the worker routes read with every dispatch also name the registered service. A
-- registered http endpoint's dispatches are signed with a secret derived from (workspace,
-- service, endpoint) (orchestrator/storage/signatures.py), so the dispatcher needs the service.
-- Same signature as 0011's function; only the routes aggregate gains 'service'.

CREATE OR REPLACE FUNCTION tw_dispatch_context(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb)
    LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT
        (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                    'task_id', e.downstream_task_id, 'node_id', u.node_id, 'key', u.output->>'key')), '[]')
         FROM task_edges e JOIN tasks u ON u.id = e.upstream_task_id
         WHERE e.downstream_task_id = ANY(p_task_ids) AND u.status = 'succeeded' AND u.output ? 'key'),
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
         WHERE (wt.workspace_id, wt.task_name) IN (SELECT * FROM unnest(p_workspaces, p_task_names)));
END
$$;
