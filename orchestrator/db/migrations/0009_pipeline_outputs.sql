-- 0009: the multi-pipeline layer: pipeline-level dependencies, persisted outputs, orchestrations,
-- the upstream outputs each run consumes, and later triggers.

-- Each pipeline's current pipeline-level `depends`, kept in step with its current version by the
-- transaction that saves it (like schedules). Dependants of a pipeline are an index probe, and
-- the workspace's pipeline graph is read without parsing every definition.
CREATE TABLE pipeline_dependencies (
    workspace_id          text NOT NULL,
    pipeline_id           text NOT NULL,
    upstream_pipeline_id  text NOT NULL,
    outputs               text[] NOT NULL,
    trigger               text NOT NULL CHECK (trigger IN ('on_success', 'on_complete', 'none')),
    PRIMARY KEY (workspace_id, pipeline_id, upstream_pipeline_id),
    FOREIGN KEY (workspace_id, pipeline_id) REFERENCES pipelines (workspace_id, id)
);
CREATE INDEX pipeline_dependencies_upstream_idx ON pipeline_dependencies (workspace_id, upstream_pipeline_id);

-- The outputs the current version declares, so that validating a dependant needs no definition.
ALTER TABLE pipelines ADD COLUMN declared_outputs text[] NOT NULL DEFAULT '{}';

-- A set of runs created together, started in topological order.
CREATE TABLE orchestrations (
    id               uuid PRIMARY KEY,
    workspace_id     text NOT NULL REFERENCES workspaces (id),
    root_pipeline_id text,                             -- the pipeline named by an include trigger
    include          text NOT NULL CHECK (include IN ('upstream', 'downstream', 'list')),
    pipelines        text[] NOT NULL,                  -- in topological order
    versions         text[],                           -- as requested; NULL: each root's own
    params           jsonb NOT NULL DEFAULT '{}',
    idempotency_key  text,
    triggered_by     text,
    created_at       timestamptz NOT NULL DEFAULT tw_now()
);
CREATE UNIQUE INDEX orchestrations_idempotency_idx ON orchestrations (workspace_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A run of an orchestration waits (status `pending`) until `blocked_upstreams` reaches 0: each
-- upstream run of the same orchestration that completes takes one off, under the run's row lock.
ALTER TABLE runs ADD COLUMN orchestration_id uuid REFERENCES orchestrations (id);
ALTER TABLE runs ADD COLUMN blocked_upstreams integer NOT NULL DEFAULT 0 CHECK (blocked_upstreams >= 0);
CREATE INDEX runs_orchestration_idx ON runs (orchestration_id) WHERE orchestration_id IS NOT NULL;
-- Lineage: the runs a run triggered later.
CREATE INDEX runs_trigger_source_idx ON runs (trigger_source_execution_id)
    WHERE trigger_source_execution_id IS NOT NULL;

-- Ordering edges between the runs of one orchestration.
CREATE TABLE run_dependencies (
    downstream_run_id     uuid NOT NULL REFERENCES runs (id),
    upstream_run_id       uuid NOT NULL REFERENCES runs (id),
    upstream_pipeline_id  text NOT NULL,
    trigger               text NOT NULL CHECK (trigger IN ('on_success', 'on_complete', 'none')),
    PRIMARY KEY (downstream_run_id, upstream_run_id)
);
CREATE INDEX run_dependencies_upstream_idx ON run_dependencies (upstream_run_id);

-- Which tasks produce a declared output: set from the definition when the run's tasks are created.
ALTER TABLE tasks ADD COLUMN output_names text[];

-- Persisted pipeline outputs: one object per (execution, version, output), written when the
-- producing task succeeds, after its JSON Schema check. Readers take only those of succeeded runs.
CREATE TABLE pipeline_outputs (
    id                uuid PRIMARY KEY,
    workspace_id      text NOT NULL,
    pipeline_id       text NOT NULL,
    run_id            uuid NOT NULL REFERENCES runs (id),
    pipeline_version  integer NOT NULL,
    version           text NOT NULL,
    output            text NOT NULL,
    node_id           text NOT NULL,
    task_id           uuid NOT NULL REFERENCES tasks (id),
    key               text NOT NULL,
    size              bigint NOT NULL CHECK (size >= 0),
    sha256            text NOT NULL,
    schema_sha256     text,
    created_at        timestamptz NOT NULL DEFAULT tw_now(),
    UNIQUE (run_id, version, output)
);
-- Hydration and GET /api/outputs: the newest outputs of a pipeline, by version and name.
CREATE INDEX pipeline_outputs_lookup_idx
    ON pipeline_outputs (workspace_id, pipeline_id, version, output, created_at DESC);
CREATE INDEX pipeline_outputs_workspace_idx ON pipeline_outputs (workspace_id, created_at DESC, id DESC);

-- The upstream pipeline outputs a run reads, resolved before its tasks start: from a run of the
-- same orchestration, or hydrated from the latest succeeded execution of the upstream pipeline.
CREATE TABLE run_inputs (
    run_id                uuid NOT NULL REFERENCES runs (id),
    version               text NOT NULL,
    upstream_pipeline_id  text NOT NULL,
    output                text NOT NULL,
    output_id             uuid NOT NULL REFERENCES pipeline_outputs (id),
    source_run_id         uuid NOT NULL REFERENCES runs (id),
    mode                  text NOT NULL CHECK (mode IN ('orchestration', 'hydrated')),
    PRIMARY KEY (run_id, version, upstream_pipeline_id, output)
);
CREATE INDEX run_inputs_source_idx ON run_inputs (source_run_id);

-- Later triggers decided when an upstream run completed, waiting for the engine to create the
-- dependant's run (after the upstream's transaction committed, so a dependant that cannot start
-- never holds back the upstream's callback). Unique: one run per (source run, dependant).
CREATE TABLE pipeline_triggers (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id        text NOT NULL,
    pipeline_id         text NOT NULL,
    source_run_id       uuid NOT NULL REFERENCES runs (id),
    source_pipeline_id  text NOT NULL,
    versions            text[] NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT tw_now(),
    UNIQUE (source_run_id, pipeline_id)
);
