-- 0025: the callback's statements never scan a table (issue 16).
--
-- tw_complete_attempts and tw_dispatch_context run with force_generic_plan (0020): each
-- connection plans their statements once and keeps the plans until the next ANALYZE of a
-- table they read. A plan made while a table is small, or empty by its statistics (a fresh
-- deployment, task_attempts before the first dispatch), is a sequential scan, and it stays one
-- as the table grows: measured in the lifecycle benchmark on 2,000 tasks, every callback read
-- every row of tasks (the hash join that orders a batch by run) and of task_attempts (the
-- attempt's end), 0.6 ms of the 1.7 ms the statement took. Every statement of these functions
-- reads rows by key (task and attempt ids, run ids, edges by upstream, scopes by id), so a
-- scan is never the plan wanted: with sequential scans disabled for the call (restored after
-- it, like plan_cache_mode: no session state) the planner takes the key's index at any size.
-- The functions they call (tw_complete_one, tw_claim_ready_tasks, the notification triggers)
-- run under the caller's setting.
ALTER FUNCTION tw_complete_attempts(jsonb, integer, boolean) SET enable_seqscan = off;
ALTER FUNCTION tw_dispatch_context(uuid[], text[], text[]) SET enable_seqscan = off;
