-- 0003: dead letters, dispatch-failure accounting, human steps, cancellation and redrive.

-- Tasks whose attempts are used up (or whose failure was not retryable) become `dead` and get
-- an entry here: what a person needs to decide whether to retry.
CREATE TABLE dead_letters (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id   text NOT NULL,
    pipeline_id    text NOT NULL,
    run_id         uuid NOT NULL REFERENCES runs (id),
    task_id        uuid NOT NULL REFERENCES tasks (id),
    node_id        text NOT NULL,
    version        text NOT NULL,
    task_name      text,
    inputs         jsonb NOT NULL DEFAULT '{}',   -- node id -> output reference, at the time of death
    attempts       jsonb NOT NULL DEFAULT '[]',   -- every attempt with its error
    error          jsonb,                         -- the last error
    code_version   text,                          -- pipeline version (and worker code hash when known)
    created_at     timestamptz NOT NULL DEFAULT tw_now(),
    retried_at     timestamptz
);
CREATE INDEX dead_letters_workspace_idx ON dead_letters (workspace_id, created_at DESC, id DESC);
CREATE INDEX dead_letters_pipeline_idx ON dead_letters (workspace_id, pipeline_id, created_at DESC, id DESC);
-- At most one open entry per task: a task dies at most once between two retries.
CREATE UNIQUE INDEX dead_letters_open_task_idx ON dead_letters (task_id) WHERE retried_at IS NULL;

-- Dispatches that never reached a worker do not spend attempts; this counts them, and past a
-- limit the task is dead-lettered with the dispatch error.
ALTER TABLE tasks ADD COLUMN dispatch_failures integer NOT NULL DEFAULT 0;
-- Approvals: when a waiting gate times out, and whether it was escalated.
ALTER TABLE tasks ADD COLUMN wait_expires_at timestamptz;
ALTER TABLE tasks ADD COLUMN escalated_at timestamptz;
ALTER TABLE tasks ADD COLUMN on_timeout text;
CREATE INDEX tasks_wait_idx ON tasks (wait_expires_at) WHERE status = 'waiting' AND wait_expires_at IS NOT NULL;

ALTER TABLE task_attempts DROP CONSTRAINT task_attempts_status_check;
ALTER TABLE task_attempts ADD CONSTRAINT task_attempts_status_check
    CHECK (status IN ('dispatched', 'running', 'succeeded', 'failed', 'expired', 'dispatch_failed', 'cancelled'));

