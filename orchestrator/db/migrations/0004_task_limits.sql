-- 0004: limits on tasks out with workers at once, per pipeline and per workspace, enforced by
-- the claim itself.

-- Mirrors concurrency.max_active_tasks of the pipeline's current version (NULL: no limit).
ALTER TABLE pipelines ADD COLUMN max_active_tasks integer CHECK (max_active_tasks >= 1);
-- Set by an operator (`tickweave workspaces limit`); NULL: no limit.
ALTER TABLE workspaces ADD COLUMN max_active_tasks integer CHECK (max_active_tasks >= 1);
-- Counting a pipeline's (or, by its prefix, a workspace's) active tasks is an index range.
CREATE INDEX tasks_active_idx ON tasks (workspace_id, pipeline_id) WHERE status IN ('dispatched', 'running');
-- Every claim looks up the limited scopes first: with no limits anywhere that must be an empty
-- index probe, not a scan of every pipeline.
CREATE INDEX pipelines_limited_idx ON pipelines (workspace_id, id) WHERE max_active_tasks IS NOT NULL;
CREATE INDEX workspaces_limited_idx ON workspaces (id) WHERE max_active_tasks IS NOT NULL;
