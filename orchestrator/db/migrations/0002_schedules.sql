-- 0002: cron schedules, recorded slot decisions, queued runs, and a shiftable database clock.

-- The clock: a session setting (one connection) or the tw_clock row (every connection) shifts
-- database time; production sets neither, and tw_now() is now(). Tests move time for the whole
-- system through the row, so pooled connections and racing ticks agree on "now".
CREATE TABLE tw_clock (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    "offset"   interval NOT NULL
);

CREATE OR REPLACE FUNCTION tw_now() RETURNS timestamptz
    LANGUAGE sql STABLE
    AS $$ SELECT now()
          + COALESCE(NULLIF(current_setting('tickweave.clock_offset', true), ''), '0')::interval
          + COALESCE((SELECT "offset" FROM tw_clock WHERE singleton), '0'::interval) $$;

CREATE TABLE schedules (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id      text NOT NULL,
    pipeline_id       text NOT NULL,
    position          integer NOT NULL,           -- index in the pipeline's `schedule` list
    cron              text NOT NULL,
    timezone          text NOT NULL,
    catchup           text NOT NULL CHECK (catchup IN ('none', 'latest', 'all')),
    max_catchup_runs  integer NOT NULL,
    overlap           text NOT NULL CHECK (overlap IN ('allow', 'skip', 'buffer_one', 'cancel_other')),
    jitter_s          integer NOT NULL DEFAULT 0,
    start_at          timestamptz,
    end_at            timestamptz,
    state             text NOT NULL CHECK (state IN ('active', 'paused', 'ended')),
    next_slot         timestamptz,                -- the next nominal cron slot
    next_fire_at      timestamptz,                -- next_slot + its jitter: when a tick fires it
    last_fired_slot   timestamptz,
    last_fired_at     timestamptz,
    created_at        timestamptz NOT NULL DEFAULT tw_now(),
    updated_at        timestamptz NOT NULL DEFAULT tw_now(),
    UNIQUE (workspace_id, pipeline_id, position),
    FOREIGN KEY (workspace_id, pipeline_id) REFERENCES pipelines (workspace_id, id)
);
-- The tick's first step: `WHERE state = 'active' AND next_fire_at <= tw_now() ORDER BY next_fire_at`.
CREATE INDEX schedules_due_idx ON schedules (next_fire_at) WHERE state = 'active';

-- Slots a schedule decided not to run (overlap: skip, a full buffer), so a skipped slot is visible.
CREATE TABLE schedule_skips (
    schedule_id  uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    slot         timestamptz NOT NULL,
    reason       text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (schedule_id, slot)
);

ALTER TABLE runs ADD COLUMN schedule_id uuid REFERENCES schedules (id) ON DELETE SET NULL;
-- One run per schedule slot, whatever races: the insert of a second one does nothing.
CREATE UNIQUE INDEX runs_schedule_slot_idx ON runs (schedule_id, scheduled_at) WHERE schedule_id IS NOT NULL;
-- Active and queued runs per pipeline: overlap and max_active_runs decisions.
CREATE INDEX runs_pipeline_open_idx ON runs (workspace_id, pipeline_id, created_at)
    WHERE status IN ('pending', 'running');
-- The limit that queued a run (concurrency.max_active_runs, or 1 under overlap: buffer_one):
-- a queued run starts when fewer runs of its pipeline than this are running.
ALTER TABLE runs ADD COLUMN max_active_runs integer;
