-- 0006: templates (reusable node bodies) with immutable versions, and which template version
-- each pipeline version resolved its templated nodes against.

CREATE TABLE templates (
    workspace_id     text NOT NULL REFERENCES workspaces (id),
    id               text NOT NULL CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    current_version  integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT tw_now(),
    updated_at       timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, id)
);

-- Immutable, like pipeline_versions: a pipeline version that resolved against a template
-- version must be able to show that version's body for as long as the pipeline version exists.
CREATE TABLE template_versions (
    workspace_id  text NOT NULL,
    template_id   text NOT NULL,
    version       integer NOT NULL CHECK (version >= 1),
    sha256        text NOT NULL,
    body          jsonb NOT NULL,
    created_by    text,
    created_at    timestamptz NOT NULL DEFAULT tw_now(),
    PRIMARY KEY (workspace_id, template_id, version),
    FOREIGN KEY (workspace_id, template_id) REFERENCES templates (workspace_id, id)
);

-- One row per templated node of a pipeline version. A table rather than a jsonb column so that
-- "which pipelines use template X" is an indexed lookup, and the foreign key guarantees the
-- template version a pipeline version names really exists.
CREATE TABLE pipeline_template_refs (
    workspace_id      text NOT NULL,
    pipeline_id       text NOT NULL,
    pipeline_version  integer NOT NULL,
    node_id           text NOT NULL,
    template_id       text NOT NULL,
    template_version  integer NOT NULL,
    PRIMARY KEY (workspace_id, pipeline_id, pipeline_version, node_id),
    FOREIGN KEY (workspace_id, pipeline_id, pipeline_version)
        REFERENCES pipeline_versions (workspace_id, pipeline_id, version),
    FOREIGN KEY (workspace_id, template_id, template_version)
        REFERENCES template_versions (workspace_id, template_id, version)
);
CREATE INDEX pipeline_template_refs_template_idx
    ON pipeline_template_refs (workspace_id, template_id, pipeline_id, pipeline_version);

-- `definition` holds the resolved (executable) definition, which every reader of pipeline
-- versions understands; the definition as written (with `template:` and the node overrides) is
-- kept here, NULL when the pipeline uses no template (then it equals `definition`).
ALTER TABLE pipeline_versions ADD COLUMN source_definition jsonb;
