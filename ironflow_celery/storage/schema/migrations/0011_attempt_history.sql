-- A per-row attempt history (issue 22 §6): who ran each attempt of an effect or timer,
-- when, and how it ended -- the evidence a double run leaves (River keeps `attempted_by`
-- and `errors[]` on its job rows for the same reason).
--
-- A JSON array of objects, oldest first, at most the last 20 attempts:
--   {"n": 2, "worker": "celery@host", "pid": 4711, "task": "<celery task id>",
--    "started": "<timestamptz>", "finished": "<timestamptz>",
--    "outcome": "processed" | "failed" | "dead-lettered" | "lost" | "re-armed" | "cancelled",
--    "error": "<the first 500 characters of the error>"}
-- A worker's start guard appends an open entry (no outcome yet) and closes an entry left
-- open by a run that never recorded its outcome as "lost"; the statements that record an
-- outcome close it. Every write is part of an UPDATE that already runs: no extra
-- statement, and no index covers the column, so the start guard stays a HOT update.
--
-- Additive: ironflow does not know the column. Rows it inserts get the empty history;
-- rows it runs itself leave it unchanged. Adding a column with a constant default
-- rewrites nothing (PostgreSQL 11+).
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS celery_attempts jsonb NOT NULL DEFAULT '[]';
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS celery_attempts jsonb NOT NULL DEFAULT '[]';
