-- Claims whose cost does not grow with the rows already leased (issue 20 §3).
--
-- ironflow's claim indexes (outbox_immediate_idx on created_at, timers_due_idx on fire_at,
-- both WHERE processed_at IS NULL) keep a leased row where it was: every claim fetched and
-- filtered out every row leased before it (50,000 leased rows: 50,000 heap fetches, 7 ms
-- instead of 1.6 ms per claim). These indexes order rows by when they are next due
-- instead: a free row by its creation (effects) or fire time (timers), a row our claim
-- leased or our failure path backed off by the end of that lease or backoff. A claim scans
-- `due <= now()`, so leased rows lie past the end of its range and are never read.
--
-- Why a column of our own and not locked_until in the index: every index column (key or
-- predicate) makes the updates that change it non-HOT. The start guard and lease renewals
-- write locked_until; they do not write celery_claim_after (renewals only when the hint is
-- about to run out), so they stay HOT. The claim must move the row in some index to take it
-- out of later claims' way: it is the one update this costs.
--
-- celery_claim_after is a hint, never more than locked_until: a row is claimable only by
-- the real conditions (locked_until, attempts, ...). The trigger keeps the hint at most
-- locked_until whatever writes the row (ironflow's retry_dead_letter and keyed timer
-- upsert clear locked_until and know nothing of the hint), so a row that becomes
-- claimable is always inside the claim's range. Rows ironflow leases keep their hint
-- (NULL): our claims step over them as before; ironflow's own claims are unchanged.
--
-- On a big table, build the two indexes first with CREATE INDEX CONCURRENTLY (same
-- definitions): the IF NOT EXISTS below then skips them (docs/scaling.md).
ALTER TABLE ironflow.outbox ADD COLUMN IF NOT EXISTS celery_claim_after timestamptz;
ALTER TABLE ironflow.timers ADD COLUMN IF NOT EXISTS celery_claim_after timestamptz;

CREATE INDEX IF NOT EXISTS outbox_celery_claim_idx
    ON ironflow.outbox ((GREATEST(created_at, celery_claim_after)), id)
    WHERE processed_at IS NULL AND dead_lettered_at IS NULL;
CREATE INDEX IF NOT EXISTS timers_celery_claim_idx
    ON ironflow.timers ((GREATEST(fire_at, celery_claim_after)), id)
    WHERE processed_at IS NULL AND dead_lettered_at IS NULL;

CREATE OR REPLACE FUNCTION ironflow.celery_cap_claim_after() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.celery_claim_after := NEW.locked_until;
    RETURN NEW;
END
$$;

-- Evaluated without calling the function for the ordinary update (hint <= lease).
DROP TRIGGER IF EXISTS celery_cap_claim_after ON ironflow.outbox;
CREATE TRIGGER celery_cap_claim_after
    BEFORE UPDATE ON ironflow.outbox
    FOR EACH ROW
    WHEN (NEW.celery_claim_after > COALESCE(NEW.locked_until, '-infinity'::timestamptz))
    EXECUTE FUNCTION ironflow.celery_cap_claim_after();

DROP TRIGGER IF EXISTS celery_cap_claim_after ON ironflow.timers;
CREATE TRIGGER celery_cap_claim_after
    BEFORE UPDATE ON ironflow.timers
    FOR EACH ROW
    WHEN (NEW.celery_claim_after > COALESCE(NEW.locked_until, '-infinity'::timestamptz))
    EXECUTE FUNCTION ironflow.celery_cap_claim_after();
