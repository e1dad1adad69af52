-- One round trip, and one durable commit, for an input that starts a new instance: the
-- instance's creation and its first decision in one statement, run on its own (autocommit,
-- so the statement is the transaction). ironflow_celery's service calls it when the input,
-- decided against the workflow's initial state, is accepted with no timers (an instance that
-- does not exist yet has exactly that state, so the decision is the one the usual path would
-- take); ironflow never calls it. Until 0013 such an input took four round trips: BEGIN with
-- celery_lock_and_load_or_create (0012), the decision's write, and COMMIT.
--
-- The function writes only when it creates the instance. When the instance exists (or a
-- racing creator's row, ironflow's included, appears first), or the unique key is held by
-- another active instance, it writes nothing and returns false: the caller then takes the
-- usual path (lock, load, decide on the real state, write), which tells those cases apart
-- and reports them exactly as before. Creation is 0012's: creators of one new instance
-- queue on the same transaction advisory lock, the insert has no conflict target and never
-- raises. The writes are WRITE_DECISION's (storage.sql) for a first decision: events from
-- sequence 1, effects with the input's trace context, the instance's counters, completion,
-- and the effects' wake-up NOTIFY, so the rows are the ones the usual path writes.
CREATE OR REPLACE FUNCTION ironflow.celery_create_with_decision(
    p_type text, p_id text, p_unique_key text,
    p_events jsonb, p_effects jsonb, p_trace text, p_completed boolean
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    n_events bigint := jsonb_array_length(p_events);
BEGIN
    IF EXISTS (
        SELECT 1 FROM ironflow.workflow_instances i
        WHERE i.workflow_type = p_type AND i.workflow_id = p_id
    ) THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(p_type || chr(31) || p_id, 1768083310));
    INSERT INTO ironflow.workflow_instances
        (workflow_type, workflow_id, unique_key, event_count, last_event_at)
    VALUES (p_type, p_id, p_unique_key, n_events, CASE WHEN n_events > 0 THEN now() END)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)
    SELECT p_type, p_id, u.n, u.p
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS u(p, n);
    INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, celery_trace_context)
    SELECT p_type, p_id, u.p, p_trace
    FROM jsonb_array_elements(p_effects) AS u(p);
    IF p_completed THEN
        -- Completed after the insert, as the usual path does: an active unique key held by
        -- another instance clashes with this one's insert whatever its first decision.
        UPDATE ironflow.workflow_instances SET completed_at = now()
        WHERE workflow_type = p_type AND workflow_id = p_id;
    END IF;
    IF jsonb_array_length(p_effects) > 0 THEN
        PERFORM pg_notify('ironflow_effects', p_type);
    END IF;
    RETURN true;
END
$$;
