-- A run marker: set by a task's start guard, cleared by every outcome it records (processed,
-- failure, dead letter). A start guard that finds it still set knows the previous run never
-- finished (its worker process died, e.g. a handler that crashes the interpreter, or it
-- lost its lease) and counts that run as a failed attempt, so a poison pill ends as a dead
-- letter after max_attempts instead of being re-run forever (ironflow's weak spot).
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS run_started_at timestamptz;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS run_started_at timestamptz;
