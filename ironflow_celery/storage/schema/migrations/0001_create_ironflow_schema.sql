-- ironflow migration 20251230000001_create_ironflow_schema, column for column.
-- Written with IF NOT EXISTS so that a database already migrated by ironflow is accepted.
CREATE SCHEMA IF NOT EXISTS ironflow;

CREATE TABLE IF NOT EXISTS ironflow.workflow_instances (
    workflow_type     text        NOT NULL,
    workflow_id       text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    event_count       bigint      NOT NULL DEFAULT 0,
    last_event_at     timestamptz,
    completed_at      timestamptz,
    snapshot_sequence bigint,
    snapshot_data     jsonb,
    snapshot_at       timestamptz,
    PRIMARY KEY (workflow_type, workflow_id)
);
CREATE INDEX IF NOT EXISTS workflow_instances_active_idx
    ON ironflow.workflow_instances (workflow_type, last_event_at DESC)
    WHERE completed_at IS NULL;
CREATE INDEX IF NOT EXISTS workflow_instances_completed_idx
    ON ironflow.workflow_instances (completed_at)
    WHERE completed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflow_instances_snapshot_candidates_idx
    ON ironflow.workflow_instances (workflow_type, event_count DESC)
    WHERE completed_at IS NULL;

CREATE TABLE IF NOT EXISTS ironflow.events (
    global_sequence bigserial   NOT NULL UNIQUE,
    workflow_type   text        NOT NULL,
    workflow_id     text        NOT NULL,
    sequence        bigint      NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_type, workflow_id, sequence)
);

CREATE TABLE IF NOT EXISTS ironflow.outbox (
    id            uuid        PRIMARY KEY DEFAULT uuidv7(),
    workflow_type text        NOT NULL,
    workflow_id   text        NOT NULL,
    payload       jsonb       NOT NULL,
    locked_until  timestamptz,
    locked_by     text,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_immediate_idx
    ON ironflow.outbox (created_at) WHERE processed_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_dead_letter_idx
    ON ironflow.outbox (attempts, created_at) WHERE processed_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_processed_idx
    ON ironflow.outbox (processed_at) WHERE processed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_workflow_idx
    ON ironflow.outbox (workflow_type, workflow_id) WHERE processed_at IS NULL;

CREATE TABLE IF NOT EXISTS ironflow.timers (
    id            uuid        PRIMARY KEY DEFAULT uuidv7(),
    workflow_type text        NOT NULL,
    workflow_id   text        NOT NULL,
    fire_at       timestamptz NOT NULL,
    input         jsonb       NOT NULL,
    key           text,
    locked_until  timestamptz,
    locked_by     text,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS timers_due_idx
    ON ironflow.timers (fire_at) WHERE processed_at IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS timers_key_idx
    ON ironflow.timers (workflow_type, workflow_id, key)
    WHERE key IS NOT NULL AND processed_at IS NULL;
CREATE INDEX IF NOT EXISTS timers_workflow_idx
    ON ironflow.timers (workflow_type, workflow_id) WHERE processed_at IS NULL;
CREATE INDEX IF NOT EXISTS timers_processed_idx
    ON ironflow.timers (processed_at) WHERE processed_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS ironflow.input_observations (
    id            bigserial   PRIMARY KEY,
    workflow_type text        NOT NULL,
    workflow_id   text        NOT NULL,
    input_type    text        NOT NULL,
    payload       jsonb       NOT NULL,
    observed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS input_observations_workflow_idx
    ON ironflow.input_observations (workflow_type, workflow_id, observed_at DESC);

CREATE TABLE IF NOT EXISTS ironflow.projection_positions (
    projection_name text        PRIMARY KEY,
    last_sequence   bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
