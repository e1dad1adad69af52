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

-- Projections never skip an event: each event records the first transaction id that was
-- not yet assigned just after its global_sequence was drawn. A reader delivers an event
-- only once every transaction below that id has finished (its snapshot's xmin has passed
-- it), so no transaction that drew a lower global_sequence can still commit later.
-- The function takes the sequence value as an argument so it runs after nextval();
-- being VOLATILE plpgsql it sees a fresh snapshot under READ COMMITTED.
CREATE OR REPLACE FUNCTION ironflow.event_horizon(drawn bigint DEFAULT NULL) RETURNS xid8
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    RETURN pg_snapshot_xmax(pg_current_snapshot());
END
$fn$;
ALTER TABLE ironflow.events ADD COLUMN IF NOT EXISTS commit_horizon xid8;
ALTER TABLE ironflow.events ALTER COLUMN commit_horizon SET DEFAULT ironflow.event_horizon();

-- Projection health: a projection stopped by a poison event says so here.
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS failed_sequence bigint;
ALTER TABLE ironflow.projection_positions ADD COLUMN IF NOT EXISTS failed_at timestamptz;
