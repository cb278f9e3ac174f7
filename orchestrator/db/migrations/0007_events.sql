-- 0007: events posted to the API, and the runs they started.
--
-- The caller's event id is the idempotency key: the primary key makes a second post of the
-- same id (a retry, or two deliveries racing) find the first instead of starting runs again.

CREATE TABLE events (
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    id            text NOT NULL CHECK (length(id) BETWEEN 1 AND 255),
    name          text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    payload       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    received_by   text,
    received_at   timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, id)
);
-- GET /api/events: newest first, keyset-paginated on (received_at, id).
CREATE INDEX events_received_idx ON events (workspace_id, received_at DESC, id DESC);

-- A run started by an event points at that one event record: the run's source id and the
-- event's id are the same value, and only event-triggered runs carry one. NOT VALID skips a
-- scan of every existing run (all of them have event_id NULL, which satisfies both); new and
-- updated rows are checked all the same.
ALTER TABLE runs ADD COLUMN event_id text;
ALTER TABLE runs ADD CONSTRAINT runs_event_fk
    FOREIGN KEY (workspace_id, event_id) REFERENCES events (workspace_id, id) NOT VALID;
ALTER TABLE runs ADD CONSTRAINT runs_event_trigger_check
    CHECK (event_id IS NULL OR trigger = 'event') NOT VALID;
-- The runs of an event (the answer to a repeated post, and the event list) are an index probe.
CREATE INDEX runs_event_idx ON runs (workspace_id, event_id) WHERE event_id IS NOT NULL;
