-- 0019: the dispatch context of 0016 (items and manifests) with the registered service in its
-- routes again. 0016 rewrote the function from 0011's text and dropped the 'service' that 0013
-- had added, so a dispatch to a registered HTTP worker failed (the signature names the service).

DROP FUNCTION tw_dispatch_context(uuid[], text[], text[]);
CREATE FUNCTION tw_dispatch_context(p_task_ids uuid[], p_workspaces text[], p_task_names text[])
    RETURNS TABLE (inputs jsonb, upstream jsonb, routes jsonb, maps jsonb)
    LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY SELECT
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
         WHERE t.id = ANY(p_task_ids));
END
$$;
