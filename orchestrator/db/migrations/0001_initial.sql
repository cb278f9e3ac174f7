-- 0001: workspaces, keys, pipelines and their immutable versions, runs, tasks, attempts.
--
-- Conventions: every row carries workspace_id and every query filters by it; state columns are
-- CHECK-constrained text; the clock is tw_now() (database time, shiftable per session in tests).

-- The only clock. Tests move time with `SET tickweave.clock_offset = '90 seconds'`; production
-- never sets it, so this is now(). STABLE lets the planner treat it as a constant per statement.
CREATE FUNCTION tw_now() RETURNS timestamptz
    LANGUAGE sql STABLE
    AS $$ SELECT now() + COALESCE(NULLIF(current_setting('tickweave.clock_offset', true), ''), '0')::interval $$;

CREATE TABLE workspaces (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    created_at  timestamptz NOT NULL DEFAULT tw_now()
);

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    key_hash      bytea NOT NULL UNIQUE,           -- sha256 of the key; keys are 32 random bytes
    prefix        text NOT NULL,                   -- first characters, to tell keys apart
    role          text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT tw_now(),
    revoked_at    timestamptz
);
CREATE INDEX api_keys_workspace_idx ON api_keys (workspace_id);

CREATE TABLE pipelines (
    workspace_id     text NOT NULL REFERENCES workspaces (id),
    id               text NOT NULL,
    current_version  integer NOT NULL,
    paused           boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT tw_now(),
    updated_at       timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, id)
);

CREATE TABLE pipeline_versions (
    workspace_id  text NOT NULL,
    pipeline_id   text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    sha256        text NOT NULL,
    definition    jsonb NOT NULL,
    created_by    text,
    created_at    timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, pipeline_id, version),
    FOREIGN KEY (workspace_id, pipeline_id) REFERENCES pipelines (workspace_id, id)
);

CREATE TABLE runs (
    id                           uuid PRIMARY KEY,
    workspace_id                 text NOT NULL,
    pipeline_id                  text NOT NULL,
    pipeline_version             integer NOT NULL,
    status                       text NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    trigger                      text NOT NULL
        CHECK (trigger IN ('manual', 'schedule', 'pipeline', 'event', 'api')),
    trigger_source_execution_id  uuid,
    trigger_source_pipeline_id   text,
    scheduled_at                 timestamptz,
    triggered_by                 text,
    idempotency_key              text,
    params                       jsonb NOT NULL DEFAULT '{}',
    versions                     text[] NOT NULL,
    -- Tasks not yet terminal; the transaction that takes it to 0 finishes the run, so two
    -- tasks finishing at once cannot both miss (or both make) the run's last transition.
    unfinished_tasks             integer NOT NULL CHECK (unfinished_tasks >= 0),
    failed_tasks                 integer NOT NULL DEFAULT 0,
    error                        text,
    created_at                   timestamptz NOT NULL DEFAULT tw_now(),
    started_at                   timestamptz,
    finished_at                  timestamptz,
    FOREIGN KEY (workspace_id, pipeline_id, pipeline_version)
        REFERENCES pipeline_versions (workspace_id, pipeline_id, version)
);
CREATE INDEX runs_workspace_created_idx ON runs (workspace_id, created_at DESC, id DESC);
CREATE INDEX runs_pipeline_created_idx ON runs (workspace_id, pipeline_id, created_at DESC, id DESC);
CREATE UNIQUE INDEX runs_idempotency_idx ON runs (workspace_id, pipeline_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE tasks (
    id                uuid PRIMARY KEY,
    run_id            uuid NOT NULL REFERENCES runs (id),
    workspace_id      text NOT NULL,
    pipeline_id       text NOT NULL,
    node_id           text NOT NULL,
    version           text NOT NULL,
    position          integer NOT NULL,            -- the node's index in the definition, for display
    kind              text NOT NULL CHECK (kind IN ('task', 'approval', 'manual')),
    task_name         text,
    params            jsonb NOT NULL DEFAULT '{}',
    transport         text NOT NULL,
    status            text NOT NULL CHECK (status IN ('pending', 'ready', 'dispatched', 'running',
                          'waiting', 'succeeded', 'failed', 'skipped', 'cancelled', 'dead')),
    priority          integer NOT NULL DEFAULT 0,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 1,
    retry             jsonb NOT NULL,
    timeout_s         integer,
    heartbeat_s       integer NOT NULL,
    on_failure        text NOT NULL CHECK (on_failure IN ('stop', 'continue')),
    trigger_rule      text NOT NULL,
    -- Readiness counters, decremented under the row lock by the transaction that finishes an
    -- upstream task: the one that reaches 0 decides ready or skipped, exactly once.
    unfinished_deps   integer NOT NULL CHECK (unfinished_deps >= 0),
    failed_deps       integer NOT NULL DEFAULT 0,
    skipped_deps      integer NOT NULL DEFAULT 0,
    claim_token       uuid,
    available_at      timestamptz NOT NULL DEFAULT tw_now(),
    lease_expires_at  timestamptz,
    progress          real,
    message           text,
    output            jsonb,
    error             jsonb,
    created_at        timestamptz NOT NULL DEFAULT tw_now(),
    dispatched_at     timestamptz,
    started_at        timestamptz,
    finished_at       timestamptz,
    UNIQUE (run_id, node_id, version)
);
-- The claim order of the tick: matches `WHERE status = 'ready' ORDER BY priority DESC, available_at`.
CREATE INDEX tasks_ready_idx ON tasks (priority DESC, available_at) WHERE status = 'ready';
-- Eager continuation claims the ready tasks of one run.
CREATE INDEX tasks_ready_run_idx ON tasks (run_id) WHERE status = 'ready';
-- Lease expiry scans only active tasks.
CREATE INDEX tasks_lease_idx ON tasks (lease_expires_at) WHERE status IN ('dispatched', 'running');

CREATE TABLE task_edges (
    upstream_task_id    uuid NOT NULL REFERENCES tasks (id),
    downstream_task_id  uuid NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (upstream_task_id, downstream_task_id)
);
CREATE INDEX task_edges_downstream_idx ON task_edges (downstream_task_id);

CREATE TABLE task_attempts (
    task_id        uuid NOT NULL REFERENCES tasks (id),
    attempt        integer NOT NULL,
    claim_token    uuid NOT NULL,
    status         text NOT NULL CHECK (status IN ('dispatched', 'running', 'succeeded', 'failed', 'expired', 'dispatch_failed')),
    dispatched_at  timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    error          jsonb,
    PRIMARY KEY (task_id, attempt)
);
