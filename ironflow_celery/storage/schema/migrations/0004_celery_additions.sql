-- ironflow_celery's additive columns (ironflow ignores them; see docs/schema.md).

-- Explicit dead letters: the moment a row was dead-lettered, so dead-letter status no
-- longer depends on the max_attempts a reader happens to configure; and a "handled"
-- marker that keeps a discarded dead letter for audit.
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS dead_lettered_at timestamptz;
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS discarded_at timestamptz;
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS discard_reason text;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS dead_lettered_at timestamptz;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS discarded_at timestamptz;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS discard_reason text;

-- Projection health: a projection stopped by a poison event says so here.
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS failed_sequence bigint;
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS failed_at timestamptz;
