-- One round trip for the start of every unit of work, a new instance's too: lock and load
-- the instance (celery_lock_and_load, unchanged), or create it when there is none
-- (ironflow_celery's store calls it; ironflow does not). Until 0012 the store sent the
-- creation as a second statement, a round trip more for every new instance.
--
-- Creation is what the store's statements did, in the same order, now inside the function:
-- creators of one new instance queue on a transaction advisory lock (the single-bigint key
-- hashtextextended(type || chr(31) || id, 1768083310), storage.sql.ADVISORY_LOCK_KEY), so
-- two ON CONFLICT inserts of one primary key never race with the unique-key index present
-- (which can deadlock). The insert has no conflict target and never raises: a clash with a
-- racing creator's row and a clash with an active unique key held by another instance both
-- insert nothing, and the function tells them apart by looking again, each look a statement
-- of its own with a fresh snapshot under READ COMMITTED (see 0006). No exception is raised
-- or caught, so no subtransaction is used, and a caller's own transaction stays usable
-- after a unique-key conflict.
--
-- Rows: as celery_lock_and_load's for an existing instance, with created = false; one row
-- (created = true, completed = false, sequence and payload NULL) for the instance it
-- created; no row when the unique key is held by another active instance (nothing created).
CREATE OR REPLACE FUNCTION ironflow.celery_lock_and_load_or_create(
    p_type text, p_id text, p_unique_key text
)
RETURNS TABLE (created boolean, completed boolean, sequence bigint, payload jsonb)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    lost_race boolean := false;
BEGIN
    LOOP
        RETURN QUERY SELECT false, l.completed, l.sequence, l.payload
            FROM ironflow.celery_lock_and_load(p_type, p_id) AS l;
        IF FOUND THEN
            RETURN;
        END IF;
        -- No row and the insert clashed: the key's holder is another, active instance.
        -- (Neither a row nor a holder: the winner's row was deleted since; insert again.)
        IF lost_race AND p_unique_key IS NOT NULL AND EXISTS (
            SELECT 1 FROM ironflow.workflow_instances i
            WHERE i.workflow_type = p_type AND i.unique_key = p_unique_key
              AND i.completed_at IS NULL
        ) THEN
            RETURN;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended(p_type || chr(31) || p_id, 1768083310));
        INSERT INTO ironflow.workflow_instances (workflow_type, workflow_id, unique_key)
        VALUES (p_type, p_id, p_unique_key)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            -- A new instance has no events: every writer (ironflow too) creates the
            -- instance row in the transaction of its first events.
            RETURN QUERY SELECT true, false, NULL::bigint, NULL::jsonb;
            RETURN;
        END IF;
        lost_race := true;
    END LOOP;
END
$$;
