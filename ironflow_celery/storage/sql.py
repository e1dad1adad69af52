"""Every SQL statement the engine runs, in one readable place.

Times that decide leases, backoff and ``fire_at`` are PostgreSQL's ``now()``; intervals
are passed as float seconds. Statements that finish or fail a claimed row carry the
lease-token guard ``locked_by = :token``: a stale worker changes nothing.
"""

from __future__ import annotations

from sqlalchemy import TextClause, text

# -- channels -----------------------------------------------------------------------
EFFECTS_CHANNEL = "ironflow_effects"
TIMERS_CHANNEL = "ironflow_timers"

# -- unit of work -------------------------------------------------------------------

# Row-lock the instance and load its events in one round trip (migration 0006 explains why
# this is a PL/pgSQL function and not a single statement). No rows: no such instance; a
# NULL sequence (migration 0007): no events, which a JSON null payload cannot fake.
LOCK_AND_LOAD = text("""
    SELECT completed, sequence, payload FROM ironflow.celery_lock_and_load(:wt, :wid)
""")

# Creators of the same new instance queue on a transaction advisory lock (single-bigint key
# space, apart from the two-int4 keys of migrations and projections) instead of racing inside
# the speculative insert: with the unique-key index present, two concurrent ON CONFLICT
# inserts of one primary key can deadlock in PostgreSQL. No conflict target: a clash on the
# primary key (a racing creator won) or on the active unique key (another instance holds it)
# both return no row instead of raising, so a caller's own transaction (``connection=``)
# stays usable after a `UniqueKeyConflict`; the store tells the two apart by looking.
INSERT_INSTANCE = text("""
    WITH queued AS (
        SELECT pg_advisory_xact_lock(
            hashtextextended(CAST(:wt AS text) || chr(31) || CAST(:wid AS text), 1768083310))
    )
    INSERT INTO ironflow.workflow_instances (workflow_type, workflow_id, unique_key)
    SELECT :wt, :wid, CAST(:unique_key AS text) FROM queued
    ON CONFLICT DO NOTHING
    RETURNING true
""")

UNIQUE_KEY_HELD = text("""
    SELECT 1 FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND unique_key = :unique_key AND completed_at IS NULL
""")

DELETE_NEW_INSTANCE = text("""
    DELETE FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND workflow_id = :wid AND event_count = 0
""")

# One round trip for a decision's events, effects, instance counters and wake-up.
WRITE_DECISION = text("""
    WITH ev AS (
        INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)
        SELECT :wt, :wid, s, CAST(p AS jsonb)
        FROM unnest(CAST(:seqs AS bigint[]), CAST(:events AS text[])) AS u(s, p)
        RETURNING 1
    ), ob AS (
        INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, celery_trace_context)
        SELECT :wt, :wid, CAST(p AS jsonb), CAST(:trace AS text)
        FROM unnest(CAST(:effects AS text[])) AS u(p)
        RETURNING 1
    ), inst AS (
        UPDATE ironflow.workflow_instances
        SET event_count = event_count + :n_events,
            last_event_at = CASE WHEN :n_events > 0 THEN now() ELSE last_event_at END,
            completed_at = CASE WHEN :completed THEN now() ELSE completed_at END
        WHERE workflow_type = :wt AND workflow_id = :wid AND (:n_events > 0 OR :completed)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ev) AS events,
           (SELECT count(*) FROM ob) AS effects,
           (SELECT count(*) FROM inst) AS instances,
           CASE WHEN cardinality(CAST(:effects AS text[])) > 0
                THEN pg_notify('ironflow_effects', :wt) END AS notified
""")

CANCEL_TIMERS = text("""
    UPDATE ironflow.timers
    SET processed_at = now(), locked_until = NULL, locked_by = NULL
    WHERE workflow_type = :wt AND workflow_id = :wid
      AND processed_at IS NULL AND key = ANY(CAST(:keys AS text[]))
""")

# Keyed timers replace the pending timer with the same key (same row, retry state reset);
# un-keyed timers never conflict.
SCHEDULE_TIMERS = text("""
    WITH t AS (
        INSERT INTO ironflow.timers
            (workflow_type, workflow_id, fire_at, input, key, celery_trace_context)
        SELECT :wt, :wid, now() + make_interval(secs => d), CAST(i AS jsonb), k,
               CAST(:trace AS text)
        FROM unnest(CAST(:delays AS float8[]), CAST(:inputs AS text[]), CAST(:keys AS text[]))
             AS u(d, i, k)
        ON CONFLICT (workflow_type, workflow_id, key) WHERE key IS NOT NULL AND processed_at IS NULL
        DO UPDATE SET fire_at = EXCLUDED.fire_at, input = EXCLUDED.input, created_at = now(),
                      attempts = 0, last_error = NULL, locked_until = NULL, locked_by = NULL,
                      dead_lettered_at = NULL, run_started_at = NULL,
                      celery_trace_context = EXCLUDED.celery_trace_context
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM t) AS scheduled, pg_notify('ironflow_timers', :wt) AS notified
""")

INSERT_OBSERVATION = text("""
    INSERT INTO ironflow.input_observations
        (workflow_type, workflow_id, input_type, payload, outcome, rejection_payload)
    VALUES (:wt, :wid, :input_type, CAST(:payload AS jsonb), :outcome,
            CAST(:rejection AS jsonb))
""")

# -- queries ------------------------------------------------------------------------

LIST_WORKFLOWS = text("""
    SELECT workflow_type, workflow_id, created_at, event_count, last_event_at, completed_at
    FROM ironflow.workflow_instances
    WHERE (CAST(:wt AS text) IS NULL OR workflow_type = :wt)
    ORDER BY last_event_at DESC NULLS LAST, created_at DESC
    LIMIT :limit OFFSET :offset
""")

FETCH_WORKFLOW_EVENTS = text("""
    SELECT global_sequence, workflow_type, workflow_id, sequence, payload, created_at
    FROM ironflow.events
    WHERE workflow_type = :wt AND workflow_id = :wid
    ORDER BY sequence
""")

# -- effect relay -------------------------------------------------------------------
# A row's max attempts: its workflow type's own (`config.AttemptLimits`, a workflow's
# `retry_policy`) or the global one. An array lookup per row, not a join: the claim still
# walks the partial index on created_at / fire_at and filters as before.
MAX_ATTEMPTS = (
    "COALESCE((CAST(:max_values AS int[]))"
    "[array_position(CAST(:max_types AS text[]), workflow_type)], :max_attempts)"
)

# Claims walk ironflow's partial index on created_at (fire_at for timers) and stop after
# :limit rows; `id = ANY(ARRAY(…))` makes the outer UPDATE probe the primary key. An
# `ORDER BY created_at, id` cannot use that index: with a backlog of 20,000 the planner
# sorted every pending row on each claim (6.7 ms vs 1.3 ms per claim of 100). Rows with
# equal created_at come in index (insertion) order; the store sorts each batch by (time, id).

CLAIM_EFFECTS = text(f"""
    UPDATE ironflow.outbox
    SET locked_until = now() + make_interval(secs => :lease), locked_by = :token
    WHERE id = ANY(ARRAY(
        SELECT id FROM ironflow.outbox
        WHERE processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < {MAX_ATTEMPTS}
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = ANY(CAST(:types AS text[]))
        ORDER BY created_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              payload->>'type' AS effect_type,
              -- when the row became due: the end of its previous backoff or lease (a
              -- sub-select sees the row as it was before this UPDATE), else its creation
              COALESCE((SELECT p.locked_until FROM ironflow.outbox AS p WHERE p.id = outbox.id),
                       created_at) AS due_at
""")

RELEASE_EFFECTS = text("""
    UPDATE ironflow.outbox SET locked_until = NULL, locked_by = NULL
    WHERE id = ANY(CAST(:ids AS uuid[])) AND locked_by = :token AND processed_at IS NULL
""")

# Start guard: the row is still held by the claim's token. It moves to a per-delivery run
# token (so a duplicate broker delivery finds the claim token gone), renews the lease and
# loads the payload, in one round trip. It also sets the run marker `run_started_at`, which
# every recorded outcome clears: finding it still set means the previous run never recorded
# one (its worker died, lost the lease, or lost the database), and that run counts as a
# failed attempt. A handler that kills its process thus ends as a dead letter.
START_EFFECT = text("""
    UPDATE ironflow.outbox
    SET locked_by = :run_token, locked_until = now() + make_interval(secs => :lease),
        run_started_at = now(),
        attempts = attempts + CASE WHEN run_started_at IS NULL THEN 0 ELSE 1 END,
        last_error = CASE WHEN run_started_at IS NULL THEN last_error ELSE :lost_error END
    WHERE id = :id AND locked_by = :token AND processed_at IS NULL
    RETURNING workflow_type, workflow_id, payload, attempts, created_at, last_error
""")

# The start guard of a worker-side batch (engine/batches.py): START_EFFECT for each
# (id, claim token, run token), in one statement; rows no longer held are simply absent.
START_EFFECTS = text("""
    UPDATE ironflow.outbox AS o
    SET locked_by = a.run_token, locked_until = now() + make_interval(secs => :lease),
        run_started_at = now(),
        attempts = o.attempts + CASE WHEN o.run_started_at IS NULL THEN 0 ELSE 1 END,
        last_error = CASE WHEN o.run_started_at IS NULL THEN o.last_error ELSE :lost_error END
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[]), CAST(:run_tokens AS text[]))
         AS a(id, token, run_token)
    WHERE o.id = a.id AND o.locked_by = a.token AND o.processed_at IS NULL
    RETURNING o.id, o.workflow_type, o.workflow_id, o.payload, o.attempts, o.created_at,
              o.last_error
""")

MARK_EFFECT_PROCESSED = text("""
    UPDATE ironflow.outbox
    SET processed_at = now(), locked_until = NULL, locked_by = NULL, run_started_at = NULL
    WHERE id = :id AND locked_by = :token
""")

MARK_EFFECTS_PROCESSED = text("""
    UPDATE ironflow.outbox AS o
    SET processed_at = now(), locked_until = NULL, locked_by = NULL, run_started_at = NULL
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
    WHERE o.id = a.id AND o.locked_by = a.token
    RETURNING o.id
""")

RECORD_EFFECT_FAILURE = text("""
    UPDATE ironflow.outbox
    SET attempts = attempts + 1, last_error = :error, locked_by = NULL,
        locked_until = now() + make_interval(secs => :backoff), run_started_at = NULL
    WHERE id = :id AND locked_by = :token
    RETURNING attempts
""")

# A dead letter's attempts are max_attempts (ironflow's convention), or more when the
# max was lowered or lost runs already counted past it.
DEAD_LETTER_EFFECT = text("""
    UPDATE ironflow.outbox
    SET attempts = GREATEST(attempts, :max_attempts), last_error = :error,
        locked_until = NULL, locked_by = NULL, dead_lettered_at = now(), run_started_at = NULL
    WHERE id = :id AND locked_by = :token
    RETURNING attempts
""")

# A dead letter whose workflow accepted its on_dead_letter input is handled: it stays in
# the table for audit (dead_lettered_at, discard_reason) but is no longer open.
MARK_EFFECT_DEAD_LETTER_HANDLED = text("""
    UPDATE ironflow.outbox
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason
    WHERE id = :id AND processed_at IS NULL
""")

# The lease keeper: extends the leases of running handlers' rows (run tokens).
RENEW_EFFECT_LEASES = text("""
    UPDATE ironflow.outbox AS o
    SET locked_until = now() + make_interval(secs => :lease)
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
    WHERE o.id = a.id AND o.locked_by = a.token AND o.processed_at IS NULL
    RETURNING o.id
""")

# A relay keeps its published, unstarted rows leased (invariant 10) -- but only while the
# server that granted their claims still runs. Start guards commit without a WAL flush, so
# a crash may lose one whose handler already ran (its message consumed): that row would be
# back under the claim token, and renewing it would strand it. After any restart, rows
# claimed before it are left to expire once and are published again.
_RELAY_TABLES = {"effect": "ironflow.outbox", "timer": "ironflow.timers"}

RENEW_DISPATCHES = {
    kind: text(f"""
        UPDATE {table} AS r
        SET locked_until = now() + make_interval(secs => :lease)
        FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
        WHERE r.id = a.id AND r.locked_by = a.token AND r.processed_at IS NULL
          AND pg_postmaster_start_time() = CAST(:server_started AS timestamptz)
        RETURNING r.id
    """)
    for kind, table in _RELAY_TABLES.items()
}

# Back-pressure: which of a relay's published rows still wait to start, i.e. are still held
# by the claim's own token (the start guard moves a row to a run token; finishing, failing
# or releasing it clears the token; another relay's re-claim replaces it).
STILL_DISPATCHED = {
    kind: text(f"""
        SELECT r.id FROM {table} AS r
        JOIN unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
          ON r.id = a.id AND r.locked_by = a.token
        WHERE r.processed_at IS NULL
    """)
    for kind, table in _RELAY_TABLES.items()
}

# -- timer relay --------------------------------------------------------------------

CLAIM_TIMERS = text(f"""
    UPDATE ironflow.timers
    SET locked_until = now() + make_interval(secs => :lease), locked_by = :token
    WHERE id = ANY(ARRAY(
        SELECT id FROM ironflow.timers
        WHERE fire_at <= now()
          AND processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < {MAX_ATTEMPTS}
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = ANY(CAST(:types AS text[]))
        ORDER BY fire_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at, fire_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              input->>'type' AS effect_type,
              GREATEST(fire_at, (SELECT p.locked_until FROM ironflow.timers AS p
                                 WHERE p.id = timers.id)) AS due_at
""")

RELEASE_TIMERS = text("""
    UPDATE ironflow.timers SET locked_until = NULL, locked_by = NULL
    WHERE id = ANY(CAST(:ids AS uuid[])) AND locked_by = :token AND processed_at IS NULL
""")

# Seconds until the next timer can be claimed: the earliest free due time, or the end of
# the earliest backoff/lease among due timers. NULL when nothing is pending.
NEXT_TIMER_DUE = text(f"""
    SELECT EXTRACT(EPOCH FROM (LEAST(
        (SELECT fire_at FROM ironflow.timers
          WHERE processed_at IS NULL AND dead_lettered_at IS NULL
            AND attempts < {MAX_ATTEMPTS} AND locked_until IS NULL
            AND workflow_type = ANY(CAST(:types AS text[]))
          ORDER BY fire_at LIMIT 1),
        (SELECT min(GREATEST(fire_at, locked_until)) FROM ironflow.timers
          WHERE processed_at IS NULL AND dead_lettered_at IS NULL
            AND attempts < {MAX_ATTEMPTS} AND locked_until IS NOT NULL
            AND fire_at <= now() + interval '1 hour'
            AND workflow_type = ANY(CAST(:types AS text[])))
    ) - now())) AS seconds
""")

START_TIMER = text("""
    UPDATE ironflow.timers
    SET locked_by = :run_token, locked_until = now() + make_interval(secs => :lease),
        run_started_at = now(),
        attempts = attempts + CASE WHEN run_started_at IS NULL THEN 0 ELSE 1 END,
        last_error = CASE WHEN run_started_at IS NULL THEN last_error ELSE :lost_error END
    WHERE id = :id AND locked_by = :token AND processed_at IS NULL
    RETURNING workflow_type, workflow_id, input, attempts, created_at, fire_at, key, last_error
""")

LOCK_TIMER = text("""
    SELECT 1 FROM ironflow.timers
    WHERE id = :id AND locked_by = :token AND processed_at IS NULL
    FOR UPDATE
""")

# A no-op when the timer's own execution re-armed the same key (the upsert cleared
# locked_by): the re-armed timer stays pending.
MARK_TIMER_PROCESSED = text("""
    UPDATE ironflow.timers
    SET processed_at = now(), locked_until = NULL, locked_by = NULL, run_started_at = NULL
    WHERE id = :id AND locked_by = :token
""")

RECORD_TIMER_FAILURE = text("""
    UPDATE ironflow.timers
    SET attempts = attempts + 1, last_error = :error, locked_by = NULL,
        locked_until = now() + make_interval(secs => :backoff), run_started_at = NULL
    WHERE id = :id AND locked_by = :token
    RETURNING attempts
""")

DEAD_LETTER_TIMER = text("""
    UPDATE ironflow.timers
    SET attempts = GREATEST(attempts, :max_attempts), last_error = :error,
        locked_until = NULL, locked_by = NULL, dead_lettered_at = now(), run_started_at = NULL
    WHERE id = :id AND locked_by = :token
    RETURNING attempts
""")

MARK_TIMER_DEAD_LETTER_HANDLED = text("""
    UPDATE ironflow.timers
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason
    WHERE id = :id AND processed_at IS NULL
""")

RENEW_TIMER_LEASES = text("""
    UPDATE ironflow.timers AS t
    SET locked_until = now() + make_interval(secs => :lease)
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
    WHERE t.id = a.id AND t.locked_by = a.token AND t.processed_at IS NULL
    RETURNING t.id
""")

# -- projections ---------------------------------------------------------------------

FETCH_EVENTS_SINCE = text("""
    SELECT global_sequence, workflow_type, workflow_id, sequence, payload, created_at
    FROM ironflow.events
    WHERE global_sequence > :after
    ORDER BY global_sequence
    LIMIT :limit
""")

ENSURE_PROJECTION_POSITION = text("""
    INSERT INTO ironflow.projection_positions (projection_name) VALUES (:name)
    ON CONFLICT (projection_name) DO NOTHING
""")

LOAD_PROJECTION_POSITION = text("""
    SELECT last_sequence FROM ironflow.projection_positions WHERE projection_name = :name
""")

# Positions only move forward (ironflow's plain UPDATE can move them backwards).
STORE_PROJECTION_POSITION = text("""
    INSERT INTO ironflow.projection_positions (projection_name, last_sequence, updated_at)
    VALUES (:name, :seq, now())
    ON CONFLICT (projection_name) DO UPDATE
    SET last_sequence = GREATEST(ironflow.projection_positions.last_sequence,
                                 EXCLUDED.last_sequence),
        updated_at = now()
""")

# -- projection runner (ironflow_celery.operations.projections) ---------------------------------
# No skipped events: a "fence" is the sequence's high-water mark G read first, then a fresh
# transaction id y drawn after it. Every writer holds its xid before it draws a
# global_sequence (it locks the instance row first), so every event <= G was drawn by a
# transaction whose xid is < y. Once the reading snapshot's xmin has passed y, all of them
# have finished, and the events <= G visible in that snapshot are all there will ever be.
PROJECTION_FENCE_MARK = text("""
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS high_water
    FROM ironflow.events_global_sequence_seq
""")

PROJECTION_FENCE_XID = text("SELECT CAST(pg_current_xact_id() AS text) AS fence_xid")

TRY_LOCK_PROJECTION = text("""
    SELECT pg_try_advisory_xact_lock(1768083310, hashtext(:name)) AS locked
""")

LOCK_PROJECTION = text("SELECT pg_advisory_xact_lock(1768083310, hashtext(:name))")

# One row always: whether the fence has passed in this statement's snapshot, then the
# events (none unless it has). Rows and xmin come from the same snapshot.
FETCH_EVENTS_FOR_PROJECTION = text("""
    WITH snap AS (
        SELECT pg_snapshot_xmin(pg_current_snapshot()) > CAST(:fence_xid AS xid8) AS passed
    )
    SELECT snap.passed, e.global_sequence, e.workflow_type, e.workflow_id, e.sequence,
           e.payload, e.created_at
    FROM snap
    LEFT JOIN LATERAL (
        SELECT global_sequence, workflow_type, workflow_id, sequence, payload, created_at
        FROM ironflow.events
        WHERE snap.passed
          AND global_sequence > :after AND global_sequence <= :high_water
          AND (CAST(:types AS text[]) IS NULL OR workflow_type = ANY(CAST(:types AS text[])))
        ORDER BY global_sequence
        LIMIT :limit
    ) AS e ON true
    ORDER BY e.global_sequence
""")

ADVANCE_PROJECTION = text("""
    UPDATE ironflow.projection_positions
    SET last_sequence = GREATEST(last_sequence, :seq), updated_at = now(),
        last_error = NULL, failed_sequence = NULL, failed_at = NULL
    WHERE projection_name = :name
""")

RECORD_PROJECTION_ERROR = text("""
    UPDATE ironflow.projection_positions
    SET last_sequence = GREATEST(last_sequence, :seq), updated_at = now(),
        last_error = :error, failed_sequence = :failed_sequence,
        -- stuck since: the first failure at this event, kept while it is retried
        failed_at = CASE WHEN failed_sequence IS NOT DISTINCT FROM :failed_sequence
                         THEN coalesce(failed_at, now()) ELSE now() END
    WHERE projection_name = :name
""")

RESET_PROJECTION_POSITION = text("""
    INSERT INTO ironflow.projection_positions (projection_name, last_sequence, updated_at)
    VALUES (:name, 0, now())
    ON CONFLICT (projection_name) DO UPDATE
    SET last_sequence = 0, updated_at = now(),
        last_error = NULL, failed_sequence = NULL, failed_at = NULL
""")

PROJECTION_STATUS = text("""
    SELECT p.projection_name, p.last_sequence, p.updated_at, p.last_error,
           p.failed_sequence, p.failed_at,
           COALESCE((SELECT max(global_sequence) FROM ironflow.events), 0) AS head
    FROM ironflow.projection_positions AS p
    ORDER BY p.projection_name
""")

PROJECTION_HEAD_ALL = text("SELECT COALESCE(max(global_sequence), 0) FROM ironflow.events")

EVENTS_HEAD_FOR_TYPES = text("""
    SELECT COALESCE(max(global_sequence), 0) FROM ironflow.events
    WHERE workflow_type = ANY(CAST(:types AS text[]))
""")

# -- cancel and revoke (ironflow_celery.operations.cancel) ---------------------------------------
# A row is *running* while a handler holds it: started (run_started_at) under a live lease.
# A claimed row whose message still waits in the broker is not running: closing it makes
# its start guard fail, so the handler never runs. A cancelled row is closed as a discarded
# dead letter is (processed_at, discarded_at, discard_reason) and kept for audit.

_RUNNING = "(run_started_at IS NOT NULL AND locked_by IS NOT NULL AND locked_until > now())"

_CANCEL_TABLES = {
    "effect": ("ironflow.outbox", "payload"),
    "timer": ("ironflow.timers", "input"),
}


def _per_kind(template: str) -> dict[str, TextClause]:
    return {
        kind: text(template.format(table=table, payload=payload))
        for kind, (table, payload) in _CANCEL_TABLES.items()
    }


LOCK_ROW_FOR_CANCEL = _per_kind(f"""
    SELECT id, workflow_type, workflow_id, {{payload}} AS payload, attempts, processed_at,
           discarded_at, discard_reason, locked_by, locked_until, run_started_at,
           {_RUNNING} AS running
    FROM {{table}} WHERE id = :id
    FOR UPDATE
""")

CANCEL_ROW = _per_kind("""
    UPDATE {table}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason,
        locked_until = NULL, locked_by = NULL, run_started_at = NULL
    WHERE id = :id AND processed_at IS NULL
""")

LOCK_INSTANCE_FOR_CANCEL = text("""
    SELECT completed_at FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND workflow_id = :wid
    FOR UPDATE
""")

# Plain reads: a running row may be locked by its ack, which waits for the instance lock
# this transaction holds, so locking it here could deadlock.
RUNNING_ROWS_OF_INSTANCE = _per_kind(f"""
    SELECT id, locked_by, run_started_at FROM {{table}}
    WHERE workflow_type = :wt AND workflow_id = :wid AND processed_at IS NULL AND {_RUNNING}
    ORDER BY id
""")

CANCEL_ROWS_OF_INSTANCE = _per_kind(f"""
    UPDATE {{table}}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason,
        locked_until = NULL, locked_by = NULL, run_started_at = NULL
    WHERE workflow_type = :wt AND workflow_id = :wid AND processed_at IS NULL
      AND NOT {_RUNNING}
    RETURNING id
""")

# -- stale deliveries (why a start guard found nothing) --------------------------------
# Read only on the stale path, so a skipped delivery can say what actually happened.

DESCRIBE_STALE_EFFECT = text("""
    SELECT processed_at IS NOT NULL AS processed, discarded_at IS NOT NULL AS discarded,
           dead_lettered_at IS NOT NULL AS dead_lettered, attempts, locked_by,
           coalesce(locked_until > now(), false) AS lease_live
    FROM ironflow.outbox WHERE id = :id
""")

DESCRIBE_STALE_TIMER = text("""
    SELECT processed_at IS NOT NULL AS processed, discarded_at IS NOT NULL AS discarded,
           dead_lettered_at IS NOT NULL AS dead_lettered, attempts, locked_by,
           coalesce(locked_until > now(), false) AS lease_live
    FROM ironflow.timers WHERE id = :id
""")

# -- per-type policies (issue 14 §6) ---------------------------------------------------
# A workflow type's concurrency limit is a database invariant: at most `limit` of its
# effects leased at once (claimed and waiting in the broker, or running), across every
# relay. Claimers of limited types queue on a transaction advisory lock per type (two-int4
# key space, class "iron"+2, apart from migrations and projections), taken in type order
# in its own statement BEFORE the claim: under READ COMMITTED each statement takes a fresh
# snapshot, so the claim's count sees every claim committed by the previous lock holder. A
# count in the same statement as the lock would use a snapshot taken before the wait and
# miss them (the race behind pgqueuer's concurrency_limit bug fixed in its 1.4).
LOCK_LIMITED_TYPES = text("""
    SELECT count(pg_advisory_xact_lock(1768083312, hashtext(t)))
    FROM (SELECT t FROM unnest(CAST(:types AS text[])) AS u(t) ORDER BY t) AS s
""")

# Leased = held by some token under a live lease. A failed row in backoff has no token and
# a dead relay's expired claim is claimable again: neither counts. The count walks the
# type's pending rows (outbox_workflow_idx); an index on `locked_by` would make every claim
# and start guard a non-HOT update for all types, limited or not.
CLAIM_LIMITED_EFFECTS = text(f"""
    UPDATE ironflow.outbox
    SET locked_until = now() + make_interval(secs => :lease), locked_by = :token
    WHERE id = ANY(ARRAY(
        SELECT id FROM ironflow.outbox
        WHERE processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < {MAX_ATTEMPTS}
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = :wt
        ORDER BY created_at
        LIMIT GREATEST(0, LEAST(:limit, :cap - (
            SELECT count(*) FROM ironflow.outbox
            WHERE workflow_type = :wt AND processed_at IS NULL
              AND locked_by IS NOT NULL AND locked_until >= now())))
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              payload->>'type' AS effect_type,
              -- as CLAIM_EFFECTS: the end of its previous backoff or lease, else its creation
              COALESCE((SELECT p.locked_until FROM ironflow.outbox AS p WHERE p.id = outbox.id),
                       created_at) AS due_at
""")
