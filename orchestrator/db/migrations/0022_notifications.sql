-- 0022: notifications (issue 18): an outbox written by the transaction that causes each event.
--
-- Events are written by AFTER triggers, so every path that fails a run, makes an approval wait,
-- escalates it or dead-letters a task writes its event in its own transaction: the engine's
-- Python paths and the one-statement callback (tw_complete_attempts) alike. A transaction that
-- rolls back (or a TW001 block of the callback that does) takes its events with it; one that
-- commits cannot lose them. Each trigger has a narrow WHEN clause, so an ordinary task
-- transition costs one predicate evaluation and no function call.
--
-- An event is written only when the pipeline (its current definition's `notify`) or, for a
-- pipeline without `notify`, the workspace default has a target that wants it; then one
-- delivery row per target, which the tick sends (orchestrator.engine.notifications).

-- Per workspace: the default targets (for pipelines without `notify`) and the secret webhook
-- bodies are signed with. The previous secret keeps signing alongside the new one for a while
-- after a rotation, so receivers can switch without losing deliveries.
CREATE TABLE notification_settings (
    workspace_id                text PRIMARY KEY REFERENCES workspaces (id),
    targets                     jsonb CHECK (targets IS NULL OR jsonb_typeof(targets) = 'array'),
    signing_secret              text,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    secret_rotated_at           timestamptz,
    updated_at                  timestamptz NOT NULL DEFAULT tw_now()
);

CREATE TABLE notification_events (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id  text NOT NULL,
    type          text NOT NULL CHECK (type IN ('run.failed', 'run.succeeded_with_failures', 'approval.waiting',
                                                'approval.escalated', 'task.dead_lettered')),
    pipeline_id   text NOT NULL,
    run_id        uuid NOT NULL,
    task_id       uuid,
    data          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT tw_now()
);
-- Retention: the tick deletes old events (with their deliveries) oldest first.
CREATE INDEX notification_events_created_idx ON notification_events (created_at);

CREATE TABLE notification_deliveries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id         uuid NOT NULL REFERENCES notification_events (id) ON DELETE CASCADE,
    workspace_id     text NOT NULL,
    target_kind      text NOT NULL CHECK (target_kind IN ('webhook', 'sns')),
    target           text NOT NULL,
    -- pending: due at next_attempt_at; sending: claimed by a tick until next_attempt_at (its
    -- lease; past it, another tick sends again); delivered; failed (gave up).
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz DEFAULT tw_now(),
    claim_token      uuid,
    http_status      integer,
    last_error       text,
    history          jsonb NOT NULL DEFAULT '[]',  -- one entry per attempt (bounded by the attempt limit)
    created_at       timestamptz NOT NULL DEFAULT tw_now(),
    updated_at       timestamptz NOT NULL DEFAULT tw_now(),
    delivered_at     timestamptz,
    UNIQUE (event_id, target),
    CHECK ((status IN ('pending', 'sending')) = (next_attempt_at IS NOT NULL))
);
-- The tick's claim: due rows in due order, pending ones and lapsed leases alike.
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (next_attempt_at)
    WHERE status IN ('pending', 'sending');
-- GET /api/notifications, newest first, with or without a status filter.
CREATE INDEX notification_deliveries_workspace_idx ON notification_deliveries (workspace_id, created_at DESC, id DESC);
CREATE INDEX notification_deliveries_status_idx
    ON notification_deliveries (workspace_id, status, created_at DESC, id DESC);

-- The targets of (workspace, pipeline) that want event p_type, as [{kind, target}], or NULL;
-- and the pipeline's display name. The pipeline's current definition decides (a change of
-- `notify` applies to runs already going); a definition without `notify` takes the workspace
-- default; `notify: []` means none.
CREATE FUNCTION tw_notify_targets(p_workspace text, p_pipeline text, p_type text,
                                  OUT targets jsonb, OUT pipeline_name text)
    LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_notify jsonb;
BEGIN
    SELECT v.definition->'notify', v.definition->>'name' INTO v_notify, pipeline_name
    FROM pipelines p JOIN pipeline_versions v
      ON v.workspace_id = p.workspace_id AND v.pipeline_id = p.id AND v.version = p.current_version
    WHERE p.workspace_id = p_workspace AND p.id = p_pipeline;
    IF jsonb_typeof(v_notify) IS DISTINCT FROM 'array' THEN
        SELECT s.targets INTO v_notify FROM notification_settings s WHERE s.workspace_id = p_workspace;
    END IF;
    IF jsonb_typeof(v_notify) IS DISTINCT FROM 'array' THEN
        RETURN;
    END IF;
    SELECT jsonb_agg(DISTINCT jsonb_build_object(
               'kind', CASE WHEN t ? 'webhook' THEN 'webhook' ELSE 'sns' END,
               'target', COALESCE(t->>'webhook', t->>'sns')))
      INTO targets
    FROM jsonb_array_elements(v_notify) t
    WHERE (NOT t ? 'events' OR jsonb_typeof(t->'events') = 'null' OR t->'events' ? p_type)
      AND COALESCE(t->>'webhook', t->>'sns') IS NOT NULL;
END
$$;

-- One event and its deliveries (p_targets from tw_notify_targets, not NULL).
CREATE FUNCTION tw_notify_write(p_targets jsonb, p_type text, p_workspace text, p_pipeline text, p_run uuid,
                                p_task uuid, p_data jsonb)
    RETURNS void
    LANGUAGE plpgsql
AS $$
DECLARE
    v_event uuid;
BEGIN
    INSERT INTO notification_events (workspace_id, type, pipeline_id, run_id, task_id, data)
    VALUES (p_workspace, p_type, p_pipeline, p_run, p_task, p_data)
    RETURNING id INTO v_event;
    INSERT INTO notification_deliveries (event_id, workspace_id, target_kind, target)
    SELECT v_event, p_workspace, t->>'kind', t->>'target' FROM jsonb_array_elements(p_targets) t
    ON CONFLICT (event_id, target) DO NOTHING;
END
$$;

-- A run ended failed, or succeeded while some of its tasks failed (on_failure: continue, or
-- tolerated map items): runs.failed_task_count (0021) is kept by the statement that ends the
-- run, so the WHEN clause leaves out every run that simply succeeded.
CREATE FUNCTION tw_notify_run_ended() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    v_type text := CASE WHEN NEW.status = 'failed' THEN 'run.failed' ELSE 'run.succeeded_with_failures' END;
    m record;
BEGIN
    SELECT * INTO m FROM tw_notify_targets(NEW.workspace_id, NEW.pipeline_id, v_type);
    IF m.targets IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM tw_notify_write(m.targets, v_type, NEW.workspace_id, NEW.pipeline_id, NEW.id, NULL, jsonb_build_object(
        'pipeline_id', NEW.pipeline_id, 'pipeline_name', m.pipeline_name, 'pipeline_version', NEW.pipeline_version,
        'run_id', NEW.id, 'status', NEW.status, 'trigger', NEW.trigger, 'versions', to_jsonb(NEW.versions),
        'failed_tasks', NEW.failed_task_count, 'error', NEW.error, 'started_at', NEW.started_at,
        'finished_at', NEW.finished_at));
    RETURN NULL;
END
$$;

CREATE TRIGGER runs_notify_ended AFTER UPDATE OF status ON runs FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND (NEW.status = 'failed' OR (NEW.status = 'succeeded' AND NEW.failed_task_count > 0)))
    EXECUTE FUNCTION tw_notify_run_ended();

-- An approval started waiting for a decision (created waiting, or made waiting by its
-- upstreams), or was escalated when its timeout passed (`on_timeout: escalate`).
CREATE FUNCTION tw_notify_approval() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    v_type text := TG_ARGV[0];
    m record;
BEGIN
    SELECT * INTO m FROM tw_notify_targets(NEW.workspace_id, NEW.pipeline_id, v_type);
    IF m.targets IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM tw_notify_write(m.targets, v_type, NEW.workspace_id, NEW.pipeline_id, NEW.run_id, NEW.id, jsonb_build_object(
        'pipeline_id', NEW.pipeline_id, 'pipeline_name', m.pipeline_name, 'run_id', NEW.run_id, 'task_id', NEW.id,
        'node_id', NEW.node_id, 'version', NEW.version, 'kind', NEW.kind, 'waiting_since', NEW.available_at,
        'wait_expires_at', NEW.wait_expires_at, 'on_timeout', NEW.on_timeout, 'escalated_at', NEW.escalated_at));
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_approval_created AFTER INSERT ON tasks FOR EACH ROW
    WHEN (NEW.kind = 'approval' AND NEW.status = 'waiting')
    EXECUTE FUNCTION tw_notify_approval('approval.waiting');
CREATE TRIGGER tasks_notify_approval_waiting AFTER UPDATE OF status ON tasks FOR EACH ROW
    WHEN (NEW.kind = 'approval' AND NEW.status = 'waiting' AND OLD.status IS DISTINCT FROM 'waiting')
    EXECUTE FUNCTION tw_notify_approval('approval.waiting');
CREATE TRIGGER tasks_notify_approval_escalated AFTER UPDATE OF escalated_at ON tasks FOR EACH ROW
    WHEN (NEW.escalated_at IS NOT NULL AND OLD.escalated_at IS NULL)
    EXECUTE FUNCTION tw_notify_approval('approval.escalated');

-- A task was dead-lettered: its attempts are used up or its failure was final.
CREATE FUNCTION tw_notify_dead_letter() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    m record;
BEGIN
    SELECT * INTO m FROM tw_notify_targets(NEW.workspace_id, NEW.pipeline_id, 'task.dead_lettered');
    IF m.targets IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM tw_notify_write(m.targets, 'task.dead_lettered', NEW.workspace_id, NEW.pipeline_id, NEW.run_id, NEW.task_id,
        jsonb_build_object(
            'pipeline_id', NEW.pipeline_id, 'pipeline_name', m.pipeline_name, 'run_id', NEW.run_id,
            'task_id', NEW.task_id, 'dead_letter_id', NEW.id, 'node_id', NEW.node_id, 'version', NEW.version,
            'task_name', NEW.task_name,
            'attempts', CASE WHEN jsonb_typeof(NEW.attempts) = 'array' THEN jsonb_array_length(NEW.attempts) END,
            -- the last error's code and the start of its message; the whole record is the DLQ entry's
            'error', CASE WHEN jsonb_typeof(NEW.error) = 'object' THEN jsonb_build_object(
                'code', NEW.error->>'code', 'message', left(NEW.error->>'message', 1000)) END));
    RETURN NULL;
END
$$;

CREATE TRIGGER dead_letters_notify AFTER INSERT ON dead_letters FOR EACH ROW
    EXECUTE FUNCTION tw_notify_dead_letter();
