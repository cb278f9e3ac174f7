-- 0005: registered worker services, task routing by registration, and task code versions.

-- A worker service as it last registered: where it is reached and by which transport.
CREATE TABLE workers (
    workspace_id   text NOT NULL REFERENCES workspaces (id),
    service        text NOT NULL,
    version        text NOT NULL,
    transport      text NOT NULL CHECK (transport IN ('http', 'lambda', 'sqs')),
    endpoint       text NOT NULL,                  -- URL, function name/ARN, or queue URL
    registered_at  timestamptz NOT NULL DEFAULT tw_now(),
    last_seen_at   timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, service)
);

-- Routing: a task name is served by the service that registered it last.
CREATE TABLE worker_tasks (
    workspace_id   text NOT NULL,
    task_name      text NOT NULL,
    service        text NOT NULL,
    code_hash      text NOT NULL,
    input_schema   jsonb,
    registered_at  timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, task_name),
    FOREIGN KEY (workspace_id, service) REFERENCES workers (workspace_id, service) ON DELETE CASCADE
);

-- Every code version a task name has had, kept: a changed hash is a new row.
CREATE TABLE task_code_versions (
    workspace_id     text NOT NULL,
    task_name        text NOT NULL,
    code_hash        text NOT NULL,
    service          text NOT NULL,
    service_version  text NOT NULL,
    first_seen_at    timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, task_name, code_hash)
);

-- The code version each attempt was dispatched to (NULL: an unregistered, configured worker).
ALTER TABLE task_attempts ADD COLUMN code_version text;
ALTER TABLE tasks ADD COLUMN code_version text;
