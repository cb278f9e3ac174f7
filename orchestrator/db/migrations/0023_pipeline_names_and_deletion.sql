-- 0023: deleted pipelines, DLQ retention.
--
-- A pipeline is deleted softly: its row stays (its versions are what its runs, tasks, outputs
-- and dead letters point at, and those stay readable), marked by deleted_at. Posting a
-- definition with the same id revives the row with a new version (the numbering continues, so
-- the old runs keep pinning theirs). Every read of "the pipelines" filters deleted_at IS NULL;
-- the delete removes the pipeline's schedules and dependency edges in its transaction, so the
-- tick's due-schedule claim (schedules_due_idx) never sees them and stays O(due work).
ALTER TABLE pipelines ADD COLUMN deleted_at timestamptz;

-- The tick's retention purge: `WHERE created_at < tw_now() - retention ORDER BY created_at
-- LIMIT n` across every workspace, oldest first; an idle tick reads one index entry.
CREATE INDEX dead_letters_created_idx ON dead_letters (created_at);
