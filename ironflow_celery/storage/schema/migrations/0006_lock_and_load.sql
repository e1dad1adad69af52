-- One round trip for the start of every unit of work: lock the instance row and load its
-- events (ironflow_celery's store calls it; ironflow does not).
--
-- Why a function and not one statement: under READ COMMITTED a single statement reads with
-- the snapshot taken when it started, so a CTE that waits on the row lock would then miss
-- the events the previous lock holder committed while it waited. A VOLATILE PL/pgSQL
-- function takes a fresh snapshot for each statement it runs: the event load after the lock
-- sees everything committed before the lock was granted, exactly like two statements.
--
-- Returns no row when the instance does not exist; one row with completed = true and no
-- payload for a completed instance; else one row per event in sequence order (or a single
-- row with a NULL payload when it has none).
CREATE OR REPLACE FUNCTION ironflow.celery_lock_and_load(p_type text, p_id text)
RETURNS TABLE (completed boolean, payload jsonb)
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
        RETURN QUERY SELECT true, NULL::jsonb;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT false, e.payload
        FROM ironflow.events e
        WHERE e.workflow_type = p_type AND e.workflow_id = p_id
        ORDER BY e.sequence;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::jsonb;
    END IF;
END
$$;
