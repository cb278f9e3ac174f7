-- 0008: backfills: one run per schedule slot in a past range, throttled, cancellable as a whole.

CREATE TABLE backfills (
    id               uuid PRIMARY KEY,
    workspace_id     text NOT NULL,
    pipeline_id      text NOT NULL,
    start_at         timestamptz NOT NULL,
    end_at           timestamptz NOT NULL,
    versions         text[],
    max_active_runs  integer,
    reprocess        text NOT NULL CHECK (reprocess IN ('none', 'failed', 'all')),
    status           text NOT NULL CHECK (status IN ('running', 'cancelled')),
    created_by       text,
    created_at       timestamptz NOT NULL DEFAULT tw_now(),
    cancelled_at     timestamptz,
    FOREIGN KEY (workspace_id, pipeline_id) REFERENCES pipelines (workspace_id, id)
);
CREATE INDEX backfills_workspace_idx ON backfills (workspace_id, created_at DESC);

ALTER TABLE runs ADD COLUMN backfill_id uuid REFERENCES backfills (id);
-- One run per slot of a backfill; and finding a pipeline's runs of a slot (what already ran).
CREATE UNIQUE INDEX runs_backfill_slot_idx ON runs (backfill_id, scheduled_at) WHERE backfill_id IS NOT NULL;
CREATE INDEX runs_pipeline_slot_idx ON runs (workspace_id, pipeline_id, scheduled_at) WHERE scheduled_at IS NOT NULL;
