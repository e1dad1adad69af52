-- The relays' claims as functions, so that PostgreSQL plans each claim once per session
-- instead of on every call. ironflow_celery's claim must be planned with enable_sort and
-- jit off (storage/sql.py says why: after a VACUUM of an empty queue the planner preferred
-- to read and sort a whole burst), and a planner setting only counts when the statement is
-- planned. Until 0014 the claim therefore travelled as one simple query behind its
-- SET LOCALs, parsed and planned every time: about 250 us of backend CPU a claim, against
-- 80-125 us for these functions, whose SET clauses hold the settings for their own plans.
-- PL/pgSQL keeps the plan for the session, behind a transaction pooler too.
--
-- A kept plan is only as good as the statistics it was made with: planned while the
-- table was empty, the claim's UPDATE read its rows by a sequential scan, and kept doing
-- so, one scan of the whole table per claim, until an ANALYZE invalidated the plan.
-- enable_seqscan = off makes that plan the planner's last resort: a claim reads the table
-- only through its due-order index and the primary key, whatever the statistics said.
--
-- Each body is storage/sql.py's claim template (`_CLAIM`) for its table, the binds turned
-- into the p_ arguments (a test keeps them the same). p_relaxed commits the claim without
-- waiting for its WAL flush (lease bookkeeping, DESIGN invariant 9), as the SET LOCAL did.
-- No search_path is pinned: every table is schema-qualified, and now() must resolve as the
-- caller's session resolves it (ironflow_celery.testing puts a test clock's now() first).
-- Additive; ironflow never calls them.

CREATE OR REPLACE FUNCTION ironflow.celery_claim_effects(
    p_token text, p_types text[], p_lease double precision, p_max_attempts integer,
    p_max_types text[], p_max_values integer[], p_limit integer, p_relaxed boolean
)
RETURNS TABLE (
    id uuid, workflow_type text, workflow_id text, attempts integer, created_at timestamptz,
    fire_at timestamptz, server_started timestamptz, celery_trace_context text,
    effect_type text, due_at timestamptz
)
LANGUAGE plpgsql VOLATILE
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    IF p_relaxed THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY
    UPDATE ironflow.outbox AS r
    SET locked_until = now() + make_interval(secs => p_lease), locked_by = p_token,
        celery_claim_after = now() + make_interval(secs => p_lease)
    WHERE id = ANY(ARRAY(
        SELECT id FROM ironflow.outbox
        WHERE GREATEST(created_at, celery_claim_after) <= GREATEST(now(), pg_catalog.now())
          AND processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < COALESCE((CAST(p_max_values AS int[]))[array_position(CAST(p_max_types AS text[]), workflow_type)], p_max_attempts)
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = ANY(CAST(p_types AS text[]))
        ORDER BY GREATEST(created_at, celery_claim_after), id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at, CAST(NULL AS timestamptz) AS fire_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              payload->>'type' AS effect_type,
              COALESCE((SELECT p.locked_until FROM ironflow.outbox AS p WHERE p.id = r.id), created_at) AS due_at;
END
$$;

CREATE OR REPLACE FUNCTION ironflow.celery_claim_timers(
    p_token text, p_types text[], p_lease double precision, p_max_attempts integer,
    p_max_types text[], p_max_values integer[], p_limit integer, p_relaxed boolean
)
RETURNS TABLE (
    id uuid, workflow_type text, workflow_id text, attempts integer, created_at timestamptz,
    fire_at timestamptz, server_started timestamptz, celery_trace_context text,
    effect_type text, due_at timestamptz
)
LANGUAGE plpgsql VOLATILE
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
AS $$
#variable_conflict use_column
BEGIN
    IF p_relaxed THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY
    UPDATE ironflow.timers AS r
    SET locked_until = now() + make_interval(secs => p_lease), locked_by = p_token,
        celery_claim_after = now() + make_interval(secs => p_lease)
    WHERE id = ANY(ARRAY(
        SELECT id FROM ironflow.timers
        WHERE GREATEST(fire_at, celery_claim_after) <= GREATEST(now(), pg_catalog.now())
          AND fire_at <= now()
          AND processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < COALESCE((CAST(p_max_values AS int[]))[array_position(CAST(p_max_types AS text[]), workflow_type)], p_max_attempts)
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = ANY(CAST(p_types AS text[]))
        ORDER BY GREATEST(fire_at, celery_claim_after), id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at, fire_at AS fire_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              input->>'type' AS effect_type,
              GREATEST(fire_at, (SELECT p.locked_until FROM ironflow.timers AS p WHERE p.id = r.id)) AS due_at;
END
$$;
