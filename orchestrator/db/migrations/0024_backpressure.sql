-- 0024: backpressure instead of death (issue 15, part 5).
--
-- 1. A throttled dispatch (Lambda TooManyRequestsException, SQS throttling, HTTP 429/503) is
--    not a failure: the claim is given back (attempt number restored, the attempt row removed,
--    since no worker was ever reached) and the task is ready again after a delay that grows with
--    `dispatch_deferrals`, the consecutive throttled or held-back dispatches of the task.
-- 2. A task whose lease lapsed while still `dispatched` (no worker started it) is retried with a
--    growing delay (`not_started_count`) and fails with code `not_started` only once
--    `not_started_since` (the dispatch of the first delivery nobody started) is older than the
--    give-up time. All three are reset where a worker starts the task (first heartbeat) and
--    where a finished task is made ready again (redrive, dead-letter retry).
-- 3. dispatch_targets: the capacity of each worker target (a Lambda function, an SQS queue, an
--    HTTP endpoint) while it pushes back, shared by every API environment (the tick and the
--    eager dispatch after a callback run in whichever Lambda environment is warm; memory of one
--    is not memory of the others). A healthy target has no row, so the steady state writes
--    nothing. `capacity` sends per window; a window opens at `window_ends_at` (`window_used`
--    counts the sends taken in the current one); a throttle halves `capacity` and rests the
--    target for a backoff doubling with `throttles`; a clean window grows it by half; at the
--    ceiling the row is deleted.
ALTER TABLE tasks ADD COLUMN dispatch_deferrals integer NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN not_started_count integer NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN not_started_since timestamptz;

CREATE TABLE dispatch_targets (
    target          text PRIMARY KEY,
    capacity        integer NOT NULL CHECK (capacity >= 1),
    throttles       integer NOT NULL DEFAULT 0 CHECK (throttles >= 0),
    window_ends_at  timestamptz NOT NULL,
    window_used     integer NOT NULL DEFAULT 0 CHECK (window_used >= 0),
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT tw_now()
);
