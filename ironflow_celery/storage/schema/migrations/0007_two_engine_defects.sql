-- Two defects where our additions disagreed with what the rows say.

-- 1. A revived dead letter is live for both engines (DESIGN invariant 12).
--
-- ironflow retries a dead letter with its own SQL: `SET attempts = 0, locked_until = NULL,
-- locked_by = NULL, last_error = NULL WHERE id = $1 AND processed_at IS NULL`. It knows
-- nothing of our dead_lettered_at, which then stayed set: the row was never claimed again
-- by ironflow_celery and still counted as a dead letter. This trigger clears our markers
-- whenever an update lowers the attempts of an open dead letter, whichever engine (or
-- operator) wrote it. Our own retry clears dead_lettered_at itself, so the WHEN clause is
-- false for it, as it is for every ordinary update (claims, start guards, acks): PostgreSQL
-- evaluates WHEN without calling the function, and `UPDATE OF attempts` skips statements
-- that do not set attempts at all, so the cost per update is negligible.
CREATE OR REPLACE FUNCTION ironflow.celery_revive_dead_letter() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.dead_lettered_at := NULL;
    NEW.run_started_at := NULL;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS celery_revive_dead_letter ON ironflow.outbox;
CREATE TRIGGER celery_revive_dead_letter
    BEFORE UPDATE OF attempts ON ironflow.outbox
    FOR EACH ROW
    WHEN (OLD.dead_lettered_at IS NOT NULL AND NEW.dead_lettered_at IS NOT NULL
          AND NEW.processed_at IS NULL AND NEW.attempts < OLD.attempts)
    EXECUTE FUNCTION ironflow.celery_revive_dead_letter();

DROP TRIGGER IF EXISTS celery_revive_dead_letter ON ironflow.timers;
CREATE TRIGGER celery_revive_dead_letter
    BEFORE UPDATE OF attempts ON ironflow.timers
    FOR EACH ROW
    WHEN (OLD.dead_lettered_at IS NOT NULL AND NEW.dead_lettered_at IS NOT NULL
          AND NEW.processed_at IS NULL AND NEW.attempts < OLD.attempts)
    EXECUTE FUNCTION ironflow.celery_revive_dead_letter();

-- 2. An event whose payload is JSON null is an event.
--
-- 0006's version marked "no events" with a row whose payload is SQL NULL, and the store
-- dropped NULL payloads, so an event stored as JSON `null` (jsonb 'null', which is not SQL
-- NULL, but arrives in Python as None all the same) vanished from the replay: decide saw a
-- state without it and the write then failed on the events primary key. This version
-- returns each event's sequence too; the "no events" row has sequence NULL. The columns
-- completed and payload keep their names, so a process still running the previous release
-- reads the new function unchanged. A new return type needs DROP + CREATE (same
-- transaction, so callers never see it missing).
DROP FUNCTION IF EXISTS ironflow.celery_lock_and_load(text, text);
CREATE FUNCTION ironflow.celery_lock_and_load(p_type text, p_id text)
RETURNS TABLE (completed boolean, sequence bigint, payload jsonb)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    is_completed boolean;
BEGIN
    SELECT i.completed_at IS NOT NULL INTO is_completed
    FROM ironflow.workflow_instances i
    WHERE i.workflow_type = p_type AND i.workflow_id = p_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF is_completed THEN
        RETURN QUERY SELECT true, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT false, e.sequence, e.payload
        FROM ironflow.events e
        WHERE e.workflow_type = p_type AND e.workflow_id = p_id
        ORDER BY e.sequence;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::jsonb;
    END IF;
END
$$;
