"""Every SQL statement the runtime runs, in one place, by name.

One kind of SQL lives elsewhere, on purpose: the migrations (``storage/schema/migrations``)
with the migration runner's own bookkeeping (its advisory lock and
``celery_schema_migrations``, in `storage.schema`), which run before anything here may
exist. Everything else is here and runs through `storage.store.PostgresStore`, except the
testing kit's test-clock and scratch-database statements (the last section): the kit runs
those on the connections it opens to create a database or move its clock, where no store
exists (its row reads go through the store); and the two statements sent on raw psycopg
connections outside the store's pool, `listen` (the relays' wake-up connection) and
`PROBE` (the database gate's probe).

Statements on effects (``ironflow.outbox``) and timers (``ironflow.timers``) are written
once as templates and rendered per table into a `RowStatements` each (`EFFECT_STATEMENTS`,
`TIMER_STATEMENTS`), which `storage.kinds` hands out with the rest of a row kind's data.

Times that decide leases, backoff and ``fire_at`` are PostgreSQL's ``now()``; intervals
are passed as float seconds. Statements that finish or fail a claimed row carry the
lease-token guard ``locked_by = :token``: a stale worker changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import TextClause, TextualSelect, column, text

__all__ = [
    "ADVANCE_PROJECTION",
    "ADVISORY_LOCK_KEY",
    "CANCEL_TIMERS",
    "CLAIM_LIMITED_EFFECTS",
    "CLAIM_PLANNER_SETTINGS",
    "COUNT_INSTANCES",
    "CURRENT_DATABASE",
    "DATABASE_NOW",
    "DELETE_NEW_INSTANCE",
    "EFFECTS_CHANNEL",
    "EFFECT_STATEMENTS",
    "ENSURE_PROJECTION_POSITION",
    "EVENTS_HEAD_FOR_TYPES",
    "FETCH_EVENTS_FOR_PROJECTION",
    "FETCH_EVENTS_SINCE",
    "FETCH_WORKFLOW_EVENTS",
    "FIND_EXECUTE_RECORD",
    "GET_INSTANCE",
    "INSERT_OBSERVATION",
    "INSPECT_STATEMENTS",
    "LIMITED_TYPES_LOCK_CLASS",
    "LIST_INSTANCES",
    "LIST_WORKFLOWS",
    "LOAD_PROJECTION_POSITION",
    "LOCK_AND_LOAD_OR_CREATE",
    "LOCK_IDEMPOTENCY_KEY",
    "LOCK_INSTANCE_FOR_CANCEL",
    "LOCK_LIMITED_TYPES",
    "LOCK_PROJECTION",
    "MARK_EFFECTS_PROCESSED",
    "MAX_ATTEMPTS",
    "NEXT_EFFECT_DUE",
    "NEXT_TIMER_DUE",
    "NOTIFY_TYPES",
    "OUTBOX",
    "OUTBOX_PAYLOAD",
    "PROBE",
    "PROJECTION_FENCE_MARK",
    "PROJECTION_FENCE_XID",
    "PROJECTION_HEAD_ALL",
    "PROJECTION_STATUS",
    "PURGE_OBSERVATIONS",
    "QUEUE_STATUS",
    "RECORD_PROJECTION_ERROR",
    "RELAXES_ITSELF",
    "RESET_PROJECTION_POSITION",
    "ROW_STATES",
    "SCHEDULE_TIMERS",
    "SERVER_PING",
    "SET_TEST_CLOCK",
    "START_EFFECTS",
    "STORE_PROJECTION_POSITION",
    "TEST_AFTER_WORKER",
    "TEST_CLOCK_DDL",
    "TEST_CLOCK_SCHEMA",
    "TEST_NEXT_DUE",
    "TEST_ROWS",
    "TEST_ROW_BODY",
    "TEST_SEARCH_PATH",
    "TEST_UNFINISHED",
    "TIMERS",
    "TIMERS_CHANNEL",
    "TIMERS_PAYLOAD",
    "TIMER_STATEMENTS",
    "TRY_LOCK_PROJECTION",
    "UNLISTEN_ALL",
    "WAKE_RELAYS",
    "WRITE_DECISION",
    "InspectStatements",
    "RowStatements",
    "create_database",
    "drop_database",
    "listen",
    "set_test_search_path",
]

# -- channels -----------------------------------------------------------------------
EFFECTS_CHANNEL = "ironflow_effects"
TIMERS_CHANNEL = "ironflow_timers"


def listen(channel: str) -> str:
    """``LISTEN`` on one of the channels above (raw psycopg, autocommit: the relays'
    wake-up connection, which must not hold a pooled connection)."""
    return f"LISTEN {channel}"


UNLISTEN_ALL = "UNLISTEN *"
"""Stop listening on every channel (raw psycopg): a waker whose effect relays all let
others answer (only a backend listening on nothing is spared the wake-up of every NOTIFY)."""


PROBE = "SELECT 1"
"""The database gate's probe: whether PostgreSQL answers at all (raw psycopg)."""

# -- advisory locks ---------------------------------------------------------------------
# The key of ironflow_celery's transaction advisory locks (an arbitrary constant): the seed
# of the single-bigint keys of new instances, and the class of the two-int4 keys of
# projections. Concurrency-limited types use class ADVISORY_LOCK_KEY + 2; the migrations
# use their own class (`storage.schema.LOCK_NAMESPACE`).
ADVISORY_LOCK_KEY = 1768083310
LIMITED_TYPES_LOCK_CLASS = ADVISORY_LOCK_KEY + 2

# -- the attempt history (migration 0011) ------------------------------------------------
# `celery_attempts`: a JSON array with one object per attempt, oldest first, at most
# ATTEMPT_HISTORY_LIMIT. It is written only inside the UPDATEs that already run: the start
# guard appends an open entry (who runs it, since when) and closes one left open by a run
# that never recorded its outcome ("lost"); each outcome closes the open entry. An entry
# that is closed already, or a row ironflow ran itself (empty history), is left as it is.

ATTEMPT_HISTORY_LIMIT = 20
"""Attempts a row's history keeps (the oldest are dropped): a hot row stays small."""
ATTEMPT_ERROR_CHARS = 500
"""Characters of an attempt's error its history entry keeps (``last_error`` keeps 4,000)."""


def _close_attempt(history: str, outcome: str, error: str | None = None) -> str:
    """SQL: `history` with its last entry, when still open (no outcome), closed now with
    `outcome` (a literal) and `error` (an SQL expression, or None)."""
    last = f"{history} -> -1"
    with_error = (
        "" if error is None else f", 'error', left(CAST({error} AS text), {ATTEMPT_ERROR_CHARS})"
    )
    fields = f"jsonb_build_object('finished', now(), 'outcome', '{outcome}'{with_error})"
    return (
        f"CASE WHEN jsonb_typeof({last}) = 'object' AND ({last} -> 'outcome') IS NULL\n"
        f"            THEN jsonb_set({history}, ARRAY['-1'], ({last}) || {fields})\n"
        f"            ELSE {history} END"
    )


def _begin_attempt(history: str, attempts: str, run_started_at: str) -> str:
    """SQL: the start guard's new `history`: an open entry left by a lost run closed, this
    run's entry appended (attempt number, worker, pid, Celery task id, start), the oldest
    dropped beyond ATTEMPT_HISTORY_LIMIT (one per append, so the bound holds; CASE runs
    one branch, so the appended expression is evaluated once)."""
    number = f"{attempts} + CASE WHEN {run_started_at} IS NULL THEN 1 ELSE 2 END"
    entry = (
        f"jsonb_build_object('n', {number}, 'worker', CAST(:worker AS text), "
        "'pid', CAST(:pid AS integer), 'task', CAST(:task_id AS text), 'started', now())"
    )
    closed = _close_attempt(history, "lost", ":lost_error")
    appended = f"({closed})\n            || jsonb_build_array({entry})"
    return (
        f"CASE WHEN jsonb_array_length({history}) >= {ATTEMPT_HISTORY_LIMIT}\n"
        f"            THEN ({appended}) - 0\n"
        f"            ELSE {appended} END"
    )


# The history expressions of the row templates below, by outcome (rendered per table).
_ATTEMPT_STARTED = _begin_attempt("celery_attempts", "attempts", "run_started_at")
_ATTEMPT_PROCESSED = _close_attempt("celery_attempts", "processed")
_ATTEMPT_FAILED = _close_attempt("celery_attempts", "failed", ":error")
_ATTEMPT_DEAD_LETTERED = _close_attempt("celery_attempts", "dead-lettered", ":error")
_ATTEMPT_CANCELLED = _close_attempt("celery_attempts", "cancelled", ":reason")
# A keyed timer re-armed while one of its runs is open (its own execution re-arms it, or
# another input does while it runs): that run's processed mark finds the row re-armed and
# changes nothing, so the re-arm closes its entry.
_ATTEMPT_REARMED = _close_attempt("timers.celery_attempts", "re-armed")


# -- unit of work -------------------------------------------------------------------


def _with_columns(statement: TextClause, *names: str) -> TextualSelect:
    """`statement` with its result columns named up front, in order: SQLAlchemy then keeps
    the result's metadata with the cached compiled statement instead of building it from
    the cursor's description on every execution (about 20 µs a statement; the hot path's)."""
    return statement.columns(*(column(name) for name in names))


# Start a unit of work in one round trip: row-lock the instance and load its events, or
# create it when there is none (migrations 0006, 0007 and 0012 explain the function). Each
# row says whether the instance was created and whether it is completed; an existing one's
# rows carry its events in order, and a NULL sequence means no events, which a JSON null
# payload cannot fake. No row: the unique key is held by another active instance; nothing
# was written and nothing raised, so a caller's own transaction (``connection=``) stays
# usable after a `UniqueKeyConflict`. Creators of one new instance queue inside the function
# on a transaction advisory lock keyed by ADVISORY_LOCK_KEY (single-bigint key space, apart
# from the two-int4 keys of migrations and projections).
LOCK_AND_LOAD_OR_CREATE = _with_columns(
    text("""
    SELECT created, completed, sequence, payload
    FROM ironflow.celery_lock_and_load_or_create(:wt, :wid, CAST(:unique_key AS text))
"""),
    "created",
    "completed",
    "sequence",
    "payload",
)

# A new instance's creation and first decision in one statement, run on its own (migration
# 0013): true when it created the instance and wrote the decision; false, having written
# nothing, when the instance exists, a racing creator won, or the unique key is taken.
CREATE_WITH_DECISION = _with_columns(
    text("""
    SELECT ironflow.celery_create_with_decision(
        :wt, :wid, CAST(:unique_key AS text), CAST(:events AS jsonb), CAST(:effects AS jsonb),
        CAST(:trace AS text), :completed
    ) AS created
"""),
    "created",
)

DELETE_NEW_INSTANCE = text("""
    DELETE FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND workflow_id = :wid AND event_count = 0
""")

# One round trip for a decision's events, effects, instance counters and wake-up. Events
# and effects arrive as one JSON array each (the elements in decision order, events
# numbered from :first): psycopg dumps a JSON text in a few µs, where a text[] of JSON
# texts cost it some 40 µs of quoting per execution.
WRITE_DECISION = _with_columns(
    text(f"""
    WITH ev AS (
        INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)
        SELECT :wt, :wid, CAST(:first AS bigint) + u.n - 1, u.p
        FROM jsonb_array_elements(CAST(:events AS jsonb)) WITH ORDINALITY AS u(p, n)
        RETURNING 1
    ), ob AS (
        INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, celery_trace_context)
        SELECT :wt, :wid, u.p, CAST(:trace AS text)
        FROM jsonb_array_elements(CAST(:effects AS jsonb)) AS u(p)
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
           CASE WHEN jsonb_array_length(CAST(:effects AS jsonb)) > 0
                THEN pg_notify('{EFFECTS_CHANNEL}', :wt) END AS notified
"""),
    "events",
    "effects",
    "instances",
    "notified",
)

# Row counts ("row counts" below): a statement that joins a table to the rows of a JSON
# array bound as one parameter caps them with a LIMIT of the array's length, which keeps
# every row. A function scan's rows are estimated at 100, and against a table that looks
# small (a churned outbox's partial index of unprocessed rows, say) the planner then hashes
# a scan of the table instead of looking each row up by key. The LIMIT gives it the true
# count when it plans for the values, and 10 rows in a generic plan, as unnest of an array
# parameter did.

# Several instances' lock-and-load in one round trip (a group's follow-up inputs): the
# function runs once per key, in the given order (callers sort the keys, so two groups lock
# in the same order), and, being volatile, reads each instance's events after its lock. The
# keys arrive as one JSON array of [type, id] pairs (a JSON text costs psycopg a few µs to
# dump, where text[] arrays cost it per-element quoting).
LOCK_AND_LOAD_MANY = _with_columns(
    text("""
    SELECT k.n, f.completed, f.sequence, f.payload
    FROM jsonb_array_elements(CAST(:keys AS jsonb)) WITH ORDINALITY AS k(key, n)
    CROSS JOIN LATERAL ironflow.celery_lock_and_load(k.key ->> 0, k.key ->> 1) AS f
    ORDER BY k.n, f.sequence
"""),
    "n",
    "completed",
    "sequence",
    "payload",
)

# `WRITE_DECISION` for several instances at once (each instance once), as one JSON array
# with an object per decision: its instance (`wt`, `wid`), `first` (the sequence of its
# first event), `events` and `effects` (JSON arrays, in decision order), `trace` (its
# effects' trace context) and `completed`. Its instance counters move by its event count.
WRITE_DECISIONS = _with_columns(
    text(f"""
    WITH d AS (
        SELECT *
        FROM jsonb_to_recordset(CAST(:decisions AS jsonb))
             AS x(wt text, wid text, first bigint, events jsonb, effects jsonb, trace text,
                  completed boolean)
        LIMIT jsonb_array_length(CAST(:decisions AS jsonb))  -- every row: see "row counts"
    ), ev AS (
        INSERT INTO ironflow.events (workflow_type, workflow_id, sequence, payload)
        SELECT d.wt, d.wid, d.first + u.n - 1, u.p
        FROM d CROSS JOIN LATERAL jsonb_array_elements(d.events) WITH ORDINALITY AS u(p, n)
        RETURNING 1
    ), ob AS (
        INSERT INTO ironflow.outbox (workflow_type, workflow_id, payload, celery_trace_context)
        SELECT d.wt, d.wid, u.p, d.trace
        FROM d CROSS JOIN LATERAL jsonb_array_elements(d.effects) AS u(p)
        RETURNING 1
    ), inst AS (
        UPDATE ironflow.workflow_instances AS i
        SET event_count = i.event_count + u.n,
            last_event_at = CASE WHEN u.n > 0 THEN now() ELSE i.last_event_at END,
            completed_at = CASE WHEN u.c THEN now() ELSE i.completed_at END
        FROM (SELECT d.wt, d.wid, jsonb_array_length(d.events) AS n, d.completed AS c FROM d)
             AS u
        WHERE i.workflow_type = u.wt AND i.workflow_id = u.wid AND (u.n > 0 OR u.c)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ev) AS events,
           (SELECT count(*) FROM ob) AS effects,
           (SELECT count(*) FROM inst) AS instances,
           (SELECT count(pg_notify('{EFFECTS_CHANNEL}', x.wt))
            FROM (SELECT DISTINCT d.wt FROM d WHERE jsonb_array_length(d.effects) > 0) AS x)
               AS notified
"""),
    "events",
    "effects",
    "instances",
    "notified",
)

CANCEL_TIMERS = text("""
    UPDATE ironflow.timers
    SET processed_at = now(), locked_until = NULL, locked_by = NULL
    WHERE workflow_type = :wt AND workflow_id = :wid
      AND processed_at IS NULL AND key = ANY(CAST(:keys AS text[]))
""")

# Keyed timers replace the pending timer with the same key (same row, retry state reset);
# un-keyed timers never conflict.
SCHEDULE_TIMERS = text(f"""
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
                      celery_trace_context = EXCLUDED.celery_trace_context,
                      celery_attempts = {_ATTEMPT_REARMED}
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM t) AS scheduled, pg_notify('{TIMERS_CHANNEL}', :wt) AS notified
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


# -- claimable rows: effects and timers -------------------------------------------------
# Rows found by key. The statements that name their rows by id write "still open" as
# `(processed_at IS NULL) IS TRUE`, which means the same, but which the planner cannot
# match to a partial index on `processed_at IS NULL` (ironflow's `outbox_immediate_idx`,
# `timers_due_idx`, the workflow indexes). A VACUUM that finds the queue empty leaves those
# indexes looking empty to the planner until the next ANALYZE; a burst then arrives, and a
# statement written `processed_at IS NULL` scans the whole backlog through one of them
# instead of probing the primary key: behind 150,000 pending rows, one row's start guard
# took 21 ms instead of 0.05, a group's 24 ms instead of 1. The claim and the due-time
# reads, which walk a partial index on purpose, keep the plain form.

# Effects live in the outbox, timers in their own table; both go through the same states
# with the same statements. Each statement below is a template rendered once per table by
# `_row_statements` at the end of this module. Fields: {table} and {payload} (the JSON
# column a handler runs); {order}, the column a row is due by (created_at / fire_at); {due},
# the timer's extra "has fired" condition; {fire_at} and {key}, columns only timers have;
# {due_at}, when a claimed row became claimable.

OUTBOX = "ironflow.outbox"
OUTBOX_PAYLOAD = "payload"
TIMERS = "ironflow.timers"
TIMERS_PAYLOAD = "input"

# A row's max attempts: its workflow type's own (`config.AttemptLimits`, a workflow's
# `retry_policy`) or the global one. An array lookup per row, not a join: the claim still
# walks the partial index on created_at / fire_at and filters as before.
MAX_ATTEMPTS = (
    "COALESCE((CAST(:max_values AS int[]))"
    "[array_position(CAST(:max_types AS text[]), workflow_type)], :max_attempts)"
)

# Claims walk our due-order index (migration 0009: `outbox_celery_claim_idx`,
# `timers_celery_claim_idx`) over `due <= now()` and stop after :limit rows; `id =
# ANY(ARRAY(…))` makes the outer UPDATE probe the primary key. A row's due time is its
# creation (effects) or fire time (timers), or the end of the lease or backoff our own
# claim or failure path gave it (`celery_claim_after`, a hint the claim sets). Rows leased
# by a claim therefore lie beyond the scanned range: a claim's cost does not grow with the
# rows already leased (ironflow's created_at / fire_at indexes put them first, and every
# claim fetched and filtered each one: 50,000 leased rows, 7 ms per claim instead of 1.6).
# Retries whose backoff ended and expired leases take their turn by when they became due,
# among fresh rows, neither ahead of rows waiting longer nor starved. The real
# claimability conditions stay in the WHERE clause: the hint only skips rows. The range
# ends at the later of `now()` and `pg_catalog.now()`, the same instant in production: the
# testing kit's clock (its own `now()`) may stand behind the real time that created_at
# defaults to, and the range must still hold every claimable row.
_CLAIM = """
    UPDATE {table} AS r
    SET locked_until = now() + make_interval(secs => :lease), locked_by = :token,
        celery_claim_after = now() + make_interval(secs => :lease)
    WHERE id = ANY(ARRAY(
        SELECT id FROM {table}
        WHERE {claim_due} <= GREATEST(now(), pg_catalog.now())
          AND {due}processed_at IS NULL
          AND dead_lettered_at IS NULL
          AND attempts < {max_attempts}
          AND (locked_until IS NULL OR locked_until < now())
          AND workflow_type = ANY(CAST(:types AS text[]))
        ORDER BY {claim_due}, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id, workflow_type, workflow_id, attempts, created_at, {fire_at} AS fire_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              {payload}->>'type' AS effect_type,
              {due_at} AS due_at
"""

# The claim as the client sends it: a call of migration 0014's function for the table,
# which runs `_CLAIM` (see below for why a function).
_CLAIM_CALL = """
    SELECT * FROM {claim_function}(
        :token, CAST(:types AS text[]), CAST(:lease AS float8), CAST(:max_attempts AS int),
        CAST(:max_types AS text[]), CAST(:max_values AS int[]), CAST(:limit AS int),
        CAST(:relaxed AS boolean))
"""

# The claim sorts nothing: it walks our due-order index, already in order. A query that
# sorts can walk ironflow's `outbox_immediate_idx` / `timers_due_idx` instead, and sort,
# and the planner takes that plan when those indexes look empty -- as they do after a
# VACUUM that found the queue empty, until the next ANALYZE sees the burst that followed:
# each claim then read and sorted the whole burst (150,000 rows: 89 ms a claim of 100,
# which held a 150,000-effect drain to 3,356 effects/s). So the claim is planned with
# ``enable_sort = off``: a plan that needs a sort is then the planner's last resort. Such a
# plan (our index missing, say) costs ten billion on paper; ``jit = off`` keeps PostgreSQL
# from compiling it. Planner settings must hold when the statement is planned, and a
# prepared statement is planned once for many executions, so the claim runs inside a
# PL/pgSQL function of migration 0014 whose ``SET`` clauses hold them: PostgreSQL keeps
# the function's plan for the session (prepared, in effect, behind any pooler too) and the
# client sends a short call, prepared in turn. As one simple query with ``SET LOCAL``s in
# front (until 0014), the claim was parsed and planned on every call: about 250 µs of
# backend CPU, against 80-125 µs for the function, a claim of an empty queue either way.
# A kept plan keeps the statistics it was made with: planned on an empty table, the UPDATE
# read its rows by a sequential scan, once per claim, until an ANALYZE (4,000 scans of the
# whole table in a 20 s run of benchmark row 4). ``enable_seqscan = off`` makes that plan
# the last resort too: a claim reads only its index and the primary key.
# `claim_body` below is the body that migration wrote; a test keeps the two the same.
CLAIM_PLANNER_SETTINGS = {"enable_sort": "off", "enable_seqscan": "off", "jit": "off"}
"""The claim functions' ``SET`` clauses (migration 0014)."""

# Lease bookkeeping commits without waiting for its WAL flush (`PostgresStore._commit_mode`).
# Sent with ``SET LOCAL synchronous_commit = off`` in front, a statement travels as a simple
# query, parsed and planned on every call (a start guard: about 250 µs of backend CPU,
# against 80-90 µs prepared). The hot path's bookkeeping statements therefore set it
# themselves from a ``:relaxed`` bind, in a condition PostgreSQL evaluates once, before any
# row is read (a one-time filter; `set_config(…, true)` is ``SET LOCAL``); they are then
# prepared like any other statement. Run inside a caller's transaction it relaxes that
# whole transaction, as the ``SET LOCAL`` did: the store runs them on their own.
RELAXES_ITSELF = "ironflow_relaxes_itself"
"""A statement's execution option: it takes a ``:relaxed`` bind and sets its own
transaction's ``synchronous_commit`` from it (`storage.db.run_statement` passes it)."""
_RELAX = """(SELECT set_config('synchronous_commit', CASE WHEN CAST(:relaxed AS boolean)
            THEN 'off' ELSE current_setting('synchronous_commit') END, true)) IS NOT NULL"""


_Statement = TypeVar("_Statement", TextClause, TextualSelect)


def _relaxes_itself(statement: _Statement) -> _Statement:
    return statement.execution_options(**{RELAXES_ITSELF: True})


def _function_body(query: str) -> str:
    """A rendered template as a PL/pgSQL body: each bind becomes the argument of the same
    name with a ``p_`` prefix (``:token`` -> ``p_token``)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"p_\1", query)


# When a claimed row became due (a sub-select sees the row as it was before the claim's
# UPDATE). An effect: the end of its previous backoff or lease, else its creation. A timer:
# its fire time, or the end of its previous backoff or lease if later.
_PREVIOUS_LEASE_END = "(SELECT p.locked_until FROM {table} AS p WHERE p.id = r.id)"
_EFFECT_DUE_AT = f"COALESCE({_PREVIOUS_LEASE_END}, created_at)"
_TIMER_DUE_AT = f"GREATEST(fire_at, {_PREVIOUS_LEASE_END})"

# A renewal moves the claim hint (see `_CLAIM`) only when it would run out within half a
# lease: the other renewals leave every indexed column as it was and stay HOT updates.
# The hint never passes the new locked_until.
_RENEW_HINT = """CASE WHEN r.celery_claim_after > now() + make_interval(secs => :lease / 2)
            THEN r.celery_claim_after ELSE now() + make_interval(secs => :lease) END"""

_RELEASE = """
    UPDATE {table} SET locked_until = NULL, locked_by = NULL
    WHERE id = ANY(CAST(:ids AS uuid[])) AND locked_by = :token
      AND (processed_at IS NULL) IS TRUE  -- by key: see "Rows found by key"
      AND {relax}
"""

# Start guard: the row is still held by the claim's token. It moves to a per-delivery run
# token (so a duplicate broker delivery finds the claim token gone), renews the lease and
# loads the payload, in one round trip. It also sets the run marker `run_started_at`, which
# every recorded outcome clears: finding it still set means the previous run never recorded
# one (its worker died, lost the lease, or lost the database), and that run counts as a
# failed attempt. A handler that kills its process thus ends as a dead letter.
_START = """
    UPDATE {table}
    SET locked_by = :run_token, locked_until = now() + make_interval(secs => :lease),
        run_started_at = now(),
        attempts = attempts + CASE WHEN run_started_at IS NULL THEN 0 ELSE 1 END,
        last_error = CASE WHEN run_started_at IS NULL THEN last_error ELSE :lost_error END,
        celery_attempts = {attempt_started}
    WHERE id = :id AND locked_by = :token AND (processed_at IS NULL) IS TRUE AND {relax}
    RETURNING workflow_type, workflow_id, {payload} AS payload, attempts, created_at,
              {key} AS key, last_error
"""

# Row-lock a started row still held by its run token, inside the acknowledging transaction
# (a timer's input runs under it).
_LOCK_RUNNING = """
    SELECT 1 FROM {table}
    WHERE id = :id AND locked_by = :token AND (processed_at IS NULL) IS TRUE
    FOR UPDATE
"""

# A no-op for a timer whose own execution re-armed the same key (the upsert cleared
# locked_by): the re-armed timer stays pending. Clearing the claim hint here spares the
# trigger that caps it (migration 0009) a call on every acknowledgement.
_MARK_PROCESSED = """
    UPDATE {table}
    SET processed_at = now(), locked_until = NULL, locked_by = NULL, run_started_at = NULL,
        celery_claim_after = NULL, celery_attempts = {attempt_processed}
    WHERE id = :id AND locked_by = :token
"""

# The NOTIFY wakes idle relays so they learn when the backoff ends (they sleep until the
# next due time instead of polling; see `NEXT_EFFECT_DUE`).
_RECORD_FAILURE = """
    UPDATE {table}
    SET attempts = attempts + 1, last_error = :error, locked_by = NULL,
        locked_until = now() + make_interval(secs => :backoff), run_started_at = NULL,
        celery_claim_after = now() + make_interval(secs => :backoff),
        celery_attempts = {attempt_failed}
    WHERE id = :id AND locked_by = :token
    RETURNING attempts, pg_notify('{channel}', workflow_type) AS notified
"""

# A dead letter's attempts are max_attempts (ironflow's convention), or more when the
# max was lowered or lost runs already counted past it.
_DEAD_LETTER = """
    UPDATE {table}
    SET attempts = GREATEST(attempts, :max_attempts), last_error = :error,
        locked_until = NULL, locked_by = NULL, dead_lettered_at = now(), run_started_at = NULL,
        celery_attempts = {attempt_dead_lettered}
    WHERE id = :id AND locked_by = :token
    RETURNING attempts
"""

# A dead letter whose workflow accepted its on_dead_letter input is handled: it stays in
# the table for audit (dead_lettered_at, discard_reason) but is no longer open.
_MARK_DEAD_LETTER_HANDLED = """
    UPDATE {table}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason
    WHERE id = :id AND (processed_at IS NULL) IS TRUE
"""

# Renewals name their rows as (id, token) pairs. Joined to the table, the pairs were
# planned as a hash join over every unprocessed row whenever the table looked small to the
# planner, a cost that grows with the backlog (see `_NO_LONGER_DISPATCHED`). Each pair is
# looked up by primary key instead (a LATERAL with LIMIT 1, never turned into a join), and
# the UPDATE takes the rows found by key. Its own token condition (any of the given
# tokens: claim and run tokens are never reused) is re-checked on a row a concurrent
# transaction changed, which the look-up alone would not be.
_HELD = """ANY(ARRAY(
        SELECT a.id FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS a(id, token)
        CROSS JOIN LATERAL (
            SELECT 1 FROM {table} AS h
            WHERE h.id = a.id AND h.locked_by = a.token AND (h.processed_at IS NULL) IS TRUE
            LIMIT 1
        ) AS h))
      AND r.locked_by = ANY(ARRAY(SELECT DISTINCT unnest(CAST(:tokens AS text[]))))
      AND (r.processed_at IS NULL) IS TRUE"""

# The lease keeper: extends the leases of running handlers' rows (run tokens).
_RENEW_LEASES = f"""
    UPDATE {{table}} AS r
    SET locked_until = now() + make_interval(secs => :lease),
        celery_claim_after = {{renew_hint}}
    WHERE r.id = {_HELD}
      AND {{relax}}
    RETURNING r.id
"""

# A relay keeps its published, unstarted rows leased (invariant 10) -- but only while the
# server that granted their claims still runs. Start guards commit without a WAL flush, so
# a crash may lose one whose handler already ran (its message consumed): that row would be
# back under the claim token, and renewing it would strand it. After any restart, rows
# claimed before it are left to expire once and are published again.
_RENEW_DISPATCHED = f"""
    UPDATE {{table}} AS r
    SET locked_until = now() + make_interval(secs => :lease),
        celery_claim_after = {{renew_hint}}
    WHERE r.id = {_HELD}
      AND pg_postmaster_start_time() = CAST(:server_started AS timestamptz)
      AND {{relax}}
    RETURNING r.id
"""

# Back-pressure: which of a relay's published rows no longer wait to start, i.e. are no
# longer held by the claim's own token (the start guard moves a row to a run token;
# finishing, failing or releasing it clears the token; another relay's re-claim replaces
# it). A relay asks about a few hundred rows at a time, mostly still waiting: the ids go
# as one bytea of 16-byte UUIDs, grouped by claim token (psycopg dumps a list of UUIDs
# element by element, about 4 µs each on a busy host); :starts gives, as text, the offset
# of each token's first id, and `width_bucket` finds an id's token. Only the rows that
# left come back. Each id is one primary-key probe: a LATERAL with LIMIT 1, which the
# planner cannot turn into a join, and "still open" in the form no partial index matches
# (see "Rows found by key"). As a NOT EXISTS it was planned as a hash anti-join over
# every unprocessed row, a cost that grows with the backlog (208 ms a call behind 13,000
# pending rows; at the in-flight limit it runs every 50 ms). One generate_series over all
# the ids, not one per token: the planner counts a thousand rows per call, and with one
# call per token (a relay tracking 190 lone-row claims) the estimate passed the JIT
# threshold, and each check spent 100 ms compiling.
_NO_LONGER_DISPATCHED = """
    SELECT a.id FROM (
        SELECT CAST(encode(substring(CAST(:ids AS bytea) FROM n * 16 + 1 FOR 16), 'hex')
                    AS uuid) AS id,
               (CAST(:tokens AS text[]))[
                   width_bucket(n, CAST(string_to_array(:starts, ',') AS int[]))] AS token
        FROM generate_series(0, length(CAST(:ids AS bytea)) / 16 - 1) AS n
    ) AS a
    LEFT JOIN LATERAL (
        SELECT true AS held FROM {table} AS r
        WHERE r.id = a.id AND r.locked_by = a.token AND (r.processed_at IS NULL) IS TRUE
        LIMIT 1
    ) AS h ON true
    WHERE h.held IS NULL
"""

# Why a start guard found nothing: read only on the stale path, so a skipped delivery can
# say what actually happened.
_DESCRIBE_STALE = """
    SELECT workflow_type, processed_at IS NOT NULL AS processed,
           discarded_at IS NOT NULL AS discarded,
           dead_lettered_at IS NOT NULL AS dead_lettered, attempts, locked_by,
           coalesce(locked_until > now(), false) AS lease_live
    FROM {table} WHERE id = :id
"""

# Seconds until the next effect can be claimed (negative: one is claimable now): the oldest
# free row, or the earliest end of a backoff or lease (a row another relay or a handler
# holds comes back when its holder stops renewing it). NULL when nothing is pending. An
# idle relay sleeps until then (or a NOTIFY) instead of polling with claims.
NEXT_EFFECT_DUE = text(f"""
    SELECT EXTRACT(EPOCH FROM (LEAST(
        (SELECT created_at FROM ironflow.outbox
          WHERE processed_at IS NULL AND dead_lettered_at IS NULL
            AND attempts < {MAX_ATTEMPTS} AND locked_until IS NULL
            AND workflow_type = ANY(CAST(:types AS text[]))
          ORDER BY created_at LIMIT 1),
        (SELECT min(locked_until) FROM ironflow.outbox
          WHERE processed_at IS NULL AND dead_lettered_at IS NULL
            AND attempts < {MAX_ATTEMPTS} AND locked_until IS NOT NULL
            AND workflow_type = ANY(CAST(:types AS text[])))
    ) - now())) AS seconds
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

# -- dead letters (ironflow_celery.service.dead_letters) ---------------------------------
# A dead letter: unprocessed, and dead-lettered explicitly or out of attempts. Filters use
# the ``CAST(:x AS …) IS NULL OR …`` form so one prepared statement serves every query.

_DEAD = f"processed_at IS NULL AND (dead_lettered_at IS NOT NULL OR attempts >= {MAX_ATTEMPTS})"
_LIVE_LEASE = "locked_by IS NOT NULL AND locked_until > now()"
_DEAD_LETTER_FILTERS = """
      AND (CAST(:wt AS text) IS NULL OR workflow_type = :wt)
      AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)
      AND (CAST(:error AS text) IS NULL
           OR strpos(lower(coalesce(last_error, '')), lower(:error)) > 0)
      AND (CAST(:older AS float8) IS NULL
           OR created_at < now() - make_interval(secs => :older))
      AND (CAST(:newer AS float8) IS NULL
           OR created_at >= now() - make_interval(secs => :newer))
"""
_DEAD_LETTER_COLUMNS = "{row_columns}, {payload} AS payload"

_FETCH_DEAD_LETTERS = f"""
    SELECT {_DEAD_LETTER_COLUMNS}
    FROM {{table}}
    WHERE {_DEAD} {_DEAD_LETTER_FILTERS}
      AND (CAST(:after_at AS timestamptz) IS NULL
           OR (created_at, id) < (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid)))
    ORDER BY created_at DESC, id DESC
    LIMIT :limit
"""

_COUNT_DEAD_LETTERS = f"SELECT count(*) FROM {{table}} WHERE {_DEAD} {_DEAD_LETTER_FILTERS}"

# The row with what decides whether it may be retried or discarded: read (`explain`,
# `get`), or locked for the retry or discard that follows.
_GET_DEAD_LETTER = f"""
    SELECT {_DEAD_LETTER_COLUMNS}
    FROM {{table}} WHERE id = :id
"""

_LOCK_DEAD_LETTER = f"""
    SELECT {_DEAD_LETTER_COLUMNS}
    FROM {{table}} WHERE id = :id
    FOR UPDATE
"""

_RETRY_DEAD_LETTER = """
    UPDATE {table}
    SET attempts = 0, last_error = NULL, locked_until = NULL, locked_by = NULL,
        dead_lettered_at = NULL, run_started_at = NULL
    WHERE id = :id
    RETURNING workflow_type, pg_notify(:channel, workflow_type) AS notified
"""

# A batch of the bulk retry; rows dead-lettered after the run began (a retried row that
# failed again at once) are left alone so the loop always ends.
_RETRY_DEAD_LETTERS = f"""
    UPDATE {{table}}
    SET attempts = 0, last_error = NULL, locked_until = NULL, locked_by = NULL,
        dead_lettered_at = NULL, run_started_at = NULL
    WHERE id IN (
        SELECT id FROM {{table}}
        WHERE {_DEAD} {_DEAD_LETTER_FILTERS}
          AND NOT ({_LIVE_LEASE})
          AND (dead_lettered_at IS NULL OR dead_lettered_at <= :cutoff)
        ORDER BY created_at, id
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    )
    RETURNING workflow_type
"""

_DISCARD_DEAD_LETTER = """
    UPDATE {table}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason,
        locked_until = NULL, locked_by = NULL
    WHERE id = :id
"""

NOTIFY_TYPES = text("SELECT pg_notify(:channel, wt) FROM unnest(CAST(:types AS text[])) AS u(wt)")

# The database's clock (a test clock's, in the testing kit).
DATABASE_NOW = text("SELECT now()")

# -- cancel and revoke (ironflow_celery.operations.cancel) -------------------------------
# A row is *running* while a handler holds it: started (run_started_at) under a live lease.
# A claimed row whose message still waits in the broker is not running: closing it makes
# its start guard fail, so the handler never runs. A cancelled row is closed as a discarded
# dead letter is (processed_at, discarded_at, discard_reason) and kept for audit.

_RUNNING = "(run_started_at IS NOT NULL AND locked_by IS NOT NULL AND locked_until > now())"

_LOCK_FOR_CANCEL = f"""
    SELECT {_DEAD_LETTER_COLUMNS}
    FROM {{table}} WHERE id = :id
    FOR UPDATE
"""

_CANCEL = """
    UPDATE {table}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason,
        locked_until = NULL, locked_by = NULL, run_started_at = NULL,
        celery_attempts = {attempt_cancelled}
    WHERE id = :id AND (processed_at IS NULL) IS TRUE
"""

LOCK_INSTANCE_FOR_CANCEL = text("""
    SELECT completed_at FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND workflow_id = :wid
    FOR UPDATE
""")

# Plain reads: a running row may be locked by its ack, which waits for the instance lock
# this transaction holds, so locking it here could deadlock.
_RUNNING_OF_INSTANCE = f"""
    SELECT id, locked_by, run_started_at FROM {{table}}
    WHERE workflow_type = :wt AND workflow_id = :wid AND processed_at IS NULL AND {_RUNNING}
    ORDER BY id
"""

_CANCEL_OF_INSTANCE = f"""
    UPDATE {{table}}
    SET processed_at = now(), discarded_at = now(), discard_reason = :reason,
        locked_until = NULL, locked_by = NULL, run_started_at = NULL,
        celery_attempts = {{attempt_cancelled}}
    WHERE workflow_type = :wt AND workflow_id = :wid AND processed_at IS NULL
      AND NOT {_RUNNING}
    RETURNING id
"""

# -- retention (ironflow_celery.operations.retention) ------------------------------------
# Each batch: the oldest processed rows first (``*_processed_idx``), rows another purge
# has locked are skipped.
_PURGE_PROCESSED = """
    DELETE FROM {table} WHERE id IN (
        SELECT id FROM {table}
        WHERE processed_at < now() - make_interval(secs => :age)
          AND (:include_discarded OR discarded_at IS NULL)
        ORDER BY processed_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED)
"""

# Observations of instances completed more than `age` ago (the instance row and its
# events stay: they are the workflow's history).
PURGE_OBSERVATIONS = text("""
    DELETE FROM ironflow.input_observations WHERE id IN (
        SELECT o.id FROM ironflow.input_observations o
        JOIN ironflow.workflow_instances i
          ON i.workflow_type = o.workflow_type AND i.workflow_id = o.workflow_id
        WHERE i.completed_at < now() - make_interval(secs => :age)
        LIMIT :batch
        FOR UPDATE OF o SKIP LOCKED)
""")

# -- queue status (ironflow_celery.operations.status) --------------------------------------
# Every unprocessed row in exactly one state, per workflow type; one statement over both
# tables (their states differ: only timers have a fire time).
_UNPROCESSED_DEAD = f"(dead_lettered_at IS NOT NULL OR attempts >= {MAX_ATTEMPTS})"

QUEUE_STATUS = text(f"""
    WITH e AS (
        SELECT workflow_type, created_at, locked_by, locked_until, {_UNPROCESSED_DEAD} AS dead
        FROM ironflow.outbox WHERE processed_at IS NULL
    ), t AS (
        SELECT workflow_type, fire_at, locked_by, locked_until, {_UNPROCESSED_DEAD} AS dead
        FROM ironflow.timers WHERE processed_at IS NULL
    ), effects AS (
        SELECT workflow_type,
            count(*) FILTER (WHERE NOT dead AND (locked_until IS NULL OR locked_until <= now()))
                AS pending,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NOT NULL AND locked_until > now())
                AS in_flight,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NULL AND locked_until > now())
                AS backing_off,
            count(*) FILTER (WHERE dead) AS dead,
            EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE NOT dead)) AS oldest
        FROM e GROUP BY workflow_type
    ), timers AS (
        SELECT workflow_type,
            count(*) FILTER (WHERE NOT dead AND fire_at <= now()
                             AND (locked_until IS NULL OR locked_until <= now())) AS due,
            count(*) FILTER (WHERE NOT dead AND fire_at > now()
                             AND (locked_until IS NULL OR locked_until <= now())) AS pending,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NOT NULL AND locked_until > now())
                AS in_flight,
            count(*) FILTER (WHERE NOT dead AND locked_by IS NULL AND locked_until > now())
                AS backing_off,
            count(*) FILTER (WHERE dead) AS dead,
            EXTRACT(EPOCH FROM now() - min(fire_at) FILTER (
                WHERE NOT dead AND fire_at <= now()
                  AND (locked_until IS NULL OR locked_until <= now()))) AS oldest
        FROM t GROUP BY workflow_type
    )
    SELECT coalesce(e.workflow_type, t.workflow_type) AS workflow_type,
           coalesce(e.pending, 0) AS e_pending, coalesce(e.in_flight, 0) AS e_in_flight,
           coalesce(e.backing_off, 0) AS e_backing_off, coalesce(e.dead, 0) AS e_dead,
           e.oldest AS e_oldest,
           coalesce(t.due, 0) AS t_due, coalesce(t.pending, 0) AS t_pending,
           coalesce(t.in_flight, 0) AS t_in_flight, coalesce(t.backing_off, 0) AS t_backing_off,
           coalesce(t.dead, 0) AS t_dead, t.oldest AS t_oldest
    FROM effects e FULL JOIN timers t ON e.workflow_type = t.workflow_type
    ORDER BY 1
""")

# -- execute tasks' idempotency keys (ironflow_celery.engine.inputs) -----------------------
# Two deliveries of one key queue on a transaction advisory lock on the key, so the second
# sees the first's record (an input observation, written with INSERT_OBSERVATION).
LOCK_IDEMPOTENCY_KEY = text("SELECT pg_advisory_xact_lock(hashtextextended(:lock, 0))")

FIND_EXECUTE_RECORD = text("""
    SELECT payload -> 'outcome' AS outcome
    FROM ironflow.input_observations
    WHERE workflow_type = :wt AND workflow_id = :wid AND input_type = :record
      AND payload ->> 'idempotency_key' = :key
    ORDER BY id LIMIT 1
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

TRY_LOCK_PROJECTION = text(f"""
    SELECT pg_try_advisory_xact_lock({ADVISORY_LOCK_KEY}, hashtext(:name)) AS locked
""")

LOCK_PROJECTION = text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY}, hashtext(:name))")

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


# -- per-type policies (issue 14 §6) ---------------------------------------------------
# A workflow type's concurrency limit is a database invariant: at most `limit` of its
# effects leased at once (claimed and waiting in the broker, or running), across every
# relay. Claimers of limited types queue on a transaction advisory lock per type (two-int4
# key space, class LIMITED_TYPES_LOCK_CLASS, apart from migrations and projections), taken
# in type order in its own statement BEFORE the claim: under READ COMMITTED each statement
# takes a fresh snapshot, so the claim's count sees every claim committed by the previous
# lock holder. A count in the same statement as the lock would use a snapshot taken before
# the wait and miss them (the race behind pgqueuer's concurrency_limit bug fixed in its 1.4).
LOCK_LIMITED_TYPES = text(f"""
    SELECT count(pg_advisory_xact_lock({LIMITED_TYPES_LOCK_CLASS}, hashtext(t)))
    FROM (SELECT t FROM unnest(CAST(:types AS text[])) AS u(t) ORDER BY t) AS s
""")

# Leased = held by some token under a live lease. A failed row in backoff has no token and
# a dead relay's expired claim is claimable again: neither counts. The count walks the
# type's pending rows (outbox_workflow_idx); an index on `locked_by` would make every claim
# and start guard a non-HOT update for all types, limited or not.
CLAIM_LIMITED_EFFECTS = text(f"""
    UPDATE ironflow.outbox
    SET locked_until = now() + make_interval(secs => :lease), locked_by = :token,
        celery_claim_after = now() + make_interval(secs => :lease)
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
              CAST(NULL AS timestamptz) AS fire_at,
              pg_postmaster_start_time() AS server_started, celery_trace_context,
              payload->>'type' AS effect_type,
              -- as the effect claim: the end of its previous backoff or lease, else its creation
              COALESCE((SELECT p.locked_until FROM ironflow.outbox AS p WHERE p.id = outbox.id),
                       created_at) AS due_at
""")

# -- one outbox or timer row, as read (inspection, dead letters, cancel) ---------------------
# A row's state is one CASE over the columns every writer keeps current, in the order
# `operations.status` counts them: closed (cancelled or discarded: discarded_at; else
# processed), dead, leased (in flight), backing off, a timer whose fire time is ahead
# (scheduled), else pending. `due_at` is when the row became or becomes claimable:
# created_at (fire_at for timers), or the end of its backoff.

ROW_STATES: tuple[str, ...] = (
    "pending",
    "scheduled",
    "in_flight",
    "backing_off",
    "dead",
    "cancelled",
    "processed",
)

_INSPECT_STATE = f"""CASE
        WHEN processed_at IS NOT NULL AND discarded_at IS NOT NULL THEN 'cancelled'
        WHEN processed_at IS NOT NULL THEN 'processed'
        WHEN dead_lettered_at IS NOT NULL OR attempts >= {MAX_ATTEMPTS} THEN 'dead'
        WHEN locked_by IS NOT NULL AND locked_until > now() THEN 'in_flight'
        WHEN locked_until > now() THEN 'backing_off'
        {{scheduled}}
        ELSE 'pending' END"""

_INSPECT_DUE = """CASE
        WHEN processed_at IS NULL AND locked_by IS NULL AND locked_until IS NOT NULL
        THEN GREATEST(locked_until, {order}) ELSE {order} END"""

_INSPECT_COLUMNS = """id, workflow_type, workflow_id, {payload}->>'type' AS effect_type,
        attempts, {max_attempts} AS max_attempts, last_error, created_at,
        {fire_at} AS fire_at, {key} AS key, locked_by, locked_until, run_started_at,
        processed_at, dead_lettered_at, discarded_at, discard_reason,
        {state} AS state, {due} AS due_at, now() AS read_at"""


def row_columns(payload: str, order: str, *, timer: bool) -> str:
    """The columns of one outbox or timer row as `storage.inspection.RowInfo` reads them
    (state, due time and ``read_at``, the database's clock); binds `MAX_ATTEMPTS`."""
    scheduled = "WHEN fire_at > now() THEN 'scheduled'" if timer else ""
    return _INSPECT_COLUMNS.format(
        payload=payload,
        max_attempts=MAX_ATTEMPTS,
        fire_at="fire_at" if timer else "CAST(NULL AS timestamptz)",
        key="key" if timer else "CAST(NULL AS text)",
        state=_INSPECT_STATE.format(scheduled=scheduled),
        due=_INSPECT_DUE.format(order=order),
    )


# -- the statements of each row kind -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowStatements:
    """Every statement on one claimable table, each written once above as a template."""

    claim: TextClause
    """A call of the kind's claim function (migration 0014), which runs `claim_body`."""
    claim_query: TextClause
    """`_CLAIM` for this table, with binds: what the function runs, for EXPLAIN (under
    `CLAIM_PLANNER_SETTINGS`)."""
    claim_limited: TextClause | None
    """The claim under per-type concurrency limits (effects only; None: not limited)."""
    next_due: TextClause
    """Seconds until a row can next be claimed (an idle relay sleeps until then)."""
    release: TextClause
    start: TextualSelect
    lock_running: TextClause
    mark_processed: TextClause
    record_failure: TextClause
    dead_letter: TextClause
    mark_dead_letter_handled: TextClause
    renew_leases: TextClause
    renew_dispatched: TextClause
    no_longer_dispatched: TextClause
    describe_stale: TextClause
    fetch_dead_letters: TextClause
    count_dead_letters: TextClause
    get_dead_letter: TextClause
    lock_dead_letter: TextClause
    retry_dead_letter: TextClause
    retry_dead_letters: TextClause
    discard_dead_letter: TextClause
    lock_for_cancel: TextClause
    cancel: TextClause
    running_of_instance: TextClause
    cancel_of_instance: TextClause
    purge_processed: TextClause

    @property
    def claim_body(self) -> str:
        """The claim's UPDATE as that function's body: `claim_query`, its binds as ``p_``
        arguments."""
        return _function_body(self.claim_query.text)


def _row_statements(
    *,
    table: str,
    payload: str,
    order: str,
    due: str,
    fire_at: str,
    key: str,
    due_at: str,
    channel: str,
    claim_function: str,
    next_due: TextClause,
    timer: bool,
    claim_limited: TextClause | None = None,
) -> RowStatements:
    fields = {
        "table": table,
        "payload": payload,
        "order": order,
        "due": due,
        "fire_at": fire_at,
        "key": key,
        "max_attempts": MAX_ATTEMPTS,
        "due_at": due_at.format(table=table),
        "claim_due": f"GREATEST({order}, celery_claim_after)",
        "renew_hint": _RENEW_HINT,
        "attempt_started": _ATTEMPT_STARTED,
        "attempt_processed": _ATTEMPT_PROCESSED,
        "attempt_failed": _ATTEMPT_FAILED,
        "attempt_dead_lettered": _ATTEMPT_DEAD_LETTERED,
        "attempt_cancelled": _ATTEMPT_CANCELLED,
        "channel": channel,
        "claim_function": claim_function,
        "relax": _RELAX,
        "row_columns": row_columns(payload, order, timer=timer),
    }

    def render(template: str) -> TextClause:
        return text(template.format(**fields))

    return RowStatements(
        claim=_relaxes_itself(render(_CLAIM_CALL)),
        claim_query=render(_CLAIM),
        claim_limited=claim_limited,
        next_due=next_due,
        release=_relaxes_itself(render(_RELEASE)),
        start=_relaxes_itself(
            _with_columns(
                render(_START),
                *("workflow_type", "workflow_id", "payload", "attempts", "created_at", "key"),
                "last_error",
            )
        ),
        lock_running=render(_LOCK_RUNNING),
        mark_processed=render(_MARK_PROCESSED),
        record_failure=render(_RECORD_FAILURE),
        dead_letter=render(_DEAD_LETTER),
        mark_dead_letter_handled=render(_MARK_DEAD_LETTER_HANDLED),
        renew_leases=_relaxes_itself(render(_RENEW_LEASES)),
        renew_dispatched=_relaxes_itself(render(_RENEW_DISPATCHED)),
        no_longer_dispatched=render(_NO_LONGER_DISPATCHED),
        describe_stale=render(_DESCRIBE_STALE),
        fetch_dead_letters=render(_FETCH_DEAD_LETTERS),
        count_dead_letters=render(_COUNT_DEAD_LETTERS),
        get_dead_letter=render(_GET_DEAD_LETTER),
        lock_dead_letter=render(_LOCK_DEAD_LETTER),
        retry_dead_letter=render(_RETRY_DEAD_LETTER),
        retry_dead_letters=render(_RETRY_DEAD_LETTERS),
        discard_dead_letter=render(_DISCARD_DEAD_LETTER),
        lock_for_cancel=render(_LOCK_FOR_CANCEL),
        cancel=render(_CANCEL),
        running_of_instance=render(_RUNNING_OF_INSTANCE),
        cancel_of_instance=render(_CANCEL_OF_INSTANCE),
        purge_processed=render(_PURGE_PROCESSED),
    )


EFFECT_STATEMENTS = _row_statements(
    table=OUTBOX,
    payload=OUTBOX_PAYLOAD,
    order="created_at",
    due="",
    fire_at="CAST(NULL AS timestamptz)",
    key="CAST(NULL AS text)",
    due_at=_EFFECT_DUE_AT,
    channel=EFFECTS_CHANNEL,
    claim_function="ironflow.celery_claim_effects",
    next_due=NEXT_EFFECT_DUE,
    timer=False,
    claim_limited=CLAIM_LIMITED_EFFECTS,
)

TIMER_STATEMENTS = _row_statements(
    table=TIMERS,
    payload=TIMERS_PAYLOAD,
    order="fire_at",
    due="fire_at <= now()\n          AND ",
    fire_at="fire_at",
    key="key",
    due_at=_TIMER_DUE_AT,
    channel=TIMERS_CHANNEL,
    claim_function="ironflow.celery_claim_timers",
    next_due=NEXT_TIMER_DUE,
    timer=True,
)


# -- groups of effects (engine/tasks.py `run_rows`, grouped completer; effects only) -------

# The start guard of a batch: the effect start guard for each (id, claim token, run token),
# in one statement; rows no longer held by their claim tokens are simply absent. The items
# arrive as one JSON array of {id, token, run_token} objects, as in `MARK_EFFECTS_PROCESSED`.
# A group's statements also name their rows as `id = ANY(<the items' ids>)`, an array the
# primary key looks up. Joined to the items alone, the outbox side was estimated from the
# statistics, and an outbox analyzed nearly empty (a new deployment, a quiet queue) has its
# open rows taken for one: the planner then looped over a scan of every open row, matching
# each against the 100 items (3,000 rows by 100 items, 72 ms a start guard instead of 2).
# With the array, the rows read are the group's, whatever the statistics say.
_ITEM_IDS = """ANY(ARRAY(
        SELECT CAST(e ->> 'id' AS uuid) FROM jsonb_array_elements(CAST(:items AS jsonb)) AS e))"""

START_EFFECTS = _relaxes_itself(
    _with_columns(
        text(f"""
    UPDATE ironflow.outbox AS o
    SET locked_by = a.run_token, locked_until = now() + make_interval(secs => :lease),
        run_started_at = now(),
        attempts = o.attempts + CASE WHEN o.run_started_at IS NULL THEN 0 ELSE 1 END,
        last_error = CASE WHEN o.run_started_at IS NULL THEN o.last_error ELSE :lost_error END,
        celery_attempts = {_begin_attempt("o.celery_attempts", "o.attempts", "o.run_started_at")}
    FROM (SELECT * FROM jsonb_to_recordset(CAST(:items AS jsonb))
                        AS x(id uuid, token text, run_token text)
          LIMIT jsonb_array_length(CAST(:items AS jsonb))) AS a  -- every row: see "row counts"
    WHERE o.id = a.id AND o.locked_by = a.token AND (o.processed_at IS NULL) IS TRUE
      AND o.id = {_ITEM_IDS} AND {_RELAX}
    RETURNING o.id, o.workflow_type, o.workflow_id, o.payload, o.attempts, o.created_at,
              o.last_error
"""),
        "id",
        "workflow_type",
        "workflow_id",
        "payload",
        "attempts",
        "created_at",
        "last_error",
    )
)

# A batch's processed marks, in its acknowledging transaction: the rows still held by
# their run tokens are marked and returned. The items arrive as one JSON array of
# {id, token} objects: psycopg dumps that text in a few µs, where uuid[] and text[] arrays
# cost it per-element quoting.
MARK_EFFECTS_PROCESSED = _with_columns(
    text(f"""
    UPDATE ironflow.outbox AS o
    SET processed_at = now(), locked_until = NULL, locked_by = NULL, run_started_at = NULL,
        celery_claim_after = NULL,
        celery_attempts = {_close_attempt("o.celery_attempts", "processed")}
    FROM (SELECT * FROM jsonb_to_recordset(CAST(:items AS jsonb)) AS x(id uuid, token text)
          LIMIT jsonb_array_length(CAST(:items AS jsonb))) AS a  -- every row: see "row counts"
    WHERE o.id = a.id AND o.locked_by = a.token AND o.id = {_ITEM_IDS}
    RETURNING o.id
"""),
    "id",
)


# == inspection: find and show effects, timers and instances ===============================
# (ironflow_celery.operations.inspection; read-only.) The columns: `row_columns`.
# Filters use the ``CAST(:x AS …) IS NULL OR …`` form, so one statement serves every query.

# Keyset pages on (created_at, id), newest or oldest first; `:open` (processed_at IS NULL)
# is derived from the state filter so open-row queries can use the partial indexes.
_INSPECT_LIST = """
    SELECT * FROM (
        SELECT {columns}
        FROM {table}
        WHERE (CAST(:wt AS text) IS NULL OR workflow_type = :wt)
          AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)
          AND (CAST(:effect_type AS text) IS NULL OR {payload}->>'type' = :effect_type)
          AND (CAST(:open AS boolean) IS NULL OR (processed_at IS NULL) = :open)
    ) AS r
    WHERE (CAST(:state AS text) IS NULL OR state = :state)
      AND (CAST(:due_before AS timestamptz) IS NULL OR due_at < :due_before)
      AND (CAST(:due_after AS timestamptz) IS NULL OR due_at >= :due_after)
      AND (CAST(:after_at AS timestamptz) IS NULL
           OR (created_at, id) {cmp} (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid)))
    ORDER BY created_at {direction}, id {direction}
    LIMIT :limit
"""

_INSPECT_GET = """
    SELECT {columns}, {payload} AS payload, celery_attempts AS attempt_history
    FROM {table} WHERE id = :id
"""


@dataclass(frozen=True, slots=True)
class InspectStatements:
    """The inspection statements of one row table (`INSPECT_STATEMENTS`)."""

    list_newest: TextClause
    list_oldest: TextClause
    get: TextClause


def _inspect_statements(table: str, payload: str, order: str, timer: bool) -> InspectStatements:
    columns = row_columns(payload, order, timer=timer)

    def listing(cmp: str, direction: str) -> TextClause:
        return text(
            _INSPECT_LIST.format(
                columns=columns, table=table, payload=payload, cmp=cmp, direction=direction
            )
        )

    return InspectStatements(
        list_newest=listing("<", "DESC"),
        list_oldest=listing(">", "ASC"),
        get=text(_INSPECT_GET.format(columns=columns, table=table, payload=payload)),
    )


INSPECT_STATEMENTS: dict[str, InspectStatements] = {
    OUTBOX: _inspect_statements(OUTBOX, OUTBOX_PAYLOAD, "created_at", timer=False),
    TIMERS: _inspect_statements(TIMERS, TIMERS_PAYLOAD, "fire_at", timer=True),
}
"""By table (`RowKind.table`)."""

GET_INSTANCE = text("""
    SELECT workflow_type, workflow_id, created_at, event_count, last_event_at, completed_at
    FROM ironflow.workflow_instances
    WHERE workflow_type = :wt AND workflow_id = :wid
""")

# An instance type's instances, most recently active first; `:completed` NULL = all.
LIST_INSTANCES = text("""
    SELECT workflow_type, workflow_id, created_at, event_count, last_event_at, completed_at
    FROM ironflow.workflow_instances
    WHERE workflow_type = :wt
      AND (CAST(:completed AS boolean) IS NULL OR (completed_at IS NOT NULL) = :completed)
    ORDER BY last_event_at DESC NULLS LAST, created_at DESC, workflow_id
    LIMIT :limit OFFSET :offset
""")

COUNT_INSTANCES = text("""
    SELECT count(*) FILTER (WHERE completed_at IS NULL) AS active,
           count(*) FILTER (WHERE completed_at IS NOT NULL) AS completed
    FROM ironflow.workflow_instances WHERE workflow_type = :wt
""")


# -- the testing kit (ironflow_celery.testing; production code never runs these) -------------
# The test clock: a schema whose now() shadows pg_catalog's through the database's
# search_path; no row in its table means the real time.
TEST_CLOCK_SCHEMA = "ironflow_test_clock"
# pg_catalog is searched first unless named in the path: naming it last lets the clock
# schema's now() win, while "$user" and public keep being where unqualified tables go.
TEST_SEARCH_PATH = f'"$user", public, {TEST_CLOCK_SCHEMA}, pg_catalog'
TEST_CLOCK_DDL: tuple[str, ...] = (
    f"CREATE SCHEMA IF NOT EXISTS {TEST_CLOCK_SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {TEST_CLOCK_SCHEMA}.clock (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            t timestamptz NOT NULL)""",
    # No row: the real time. STABLE like pg_catalog.now(), so a statement sees one time.
    f"""CREATE OR REPLACE FUNCTION {TEST_CLOCK_SCHEMA}.now() RETURNS timestamptz
            LANGUAGE sql STABLE
            AS $$ SELECT coalesce((SELECT t FROM {TEST_CLOCK_SCHEMA}.clock),
                                  pg_catalog.now()) $$""",
)
SET_TEST_CLOCK = text(f"""
    INSERT INTO {TEST_CLOCK_SCHEMA}.clock (one, t) VALUES (true, :t)
    ON CONFLICT (one) DO UPDATE SET t = EXCLUDED.t
""")
# Wake any relay waiting on these channels: something may be due at the new time.
WAKE_RELAYS = text(f"SELECT pg_notify('{EFFECTS_CHANNEL}', ''), pg_notify('{TIMERS_CHANNEL}', '')")
CURRENT_DATABASE = text("SELECT current_database()")
SERVER_PING = "SELECT 1"


# Scratch databases, on an autocommit connection to the server's maintenance database.
# Identifiers cannot be bound: the kit checks names (its prefix) before they get here.
def create_database(name: str, template: str | None = None) -> str:
    """``CREATE DATABASE`` (a clone of `template` when given)."""
    clause = f' TEMPLATE "{template}"' if template else ""
    return f'CREATE DATABASE "{name}"{clause}'


def set_test_search_path(name: str) -> str:
    """Make the test clock's ``now()`` win in `name` (for connections opened from now on)."""
    return f'ALTER DATABASE "{name}" SET search_path = {TEST_SEARCH_PATH}'


def drop_database(name: str) -> str:
    """``DROP DATABASE``, closing its connections."""
    return f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'


_TEST_BODY = {"ironflow.outbox": "payload", "ironflow.timers": "input"}

TEST_ROW_BODY = {
    table: text(f"SELECT {body} FROM {table} WHERE id = :id") for table, body in _TEST_BODY.items()
}
"""A row's stored effect (outbox) or input (timers), by table."""

# The earliest time at which a live row becomes claimable: a free timer at fire_at, a row
# backing off (or leased) just after locked_until (claims compare it with `<`).
TEST_NEXT_DUE = text(f"""
    SELECT min(due) FROM (
        SELECT locked_until + interval '1 microsecond' AS due FROM ironflow.outbox
        WHERE processed_at IS NULL AND dead_lettered_at IS NULL AND attempts < {MAX_ATTEMPTS}
          AND locked_until IS NOT NULL AND workflow_type = ANY(CAST(:types AS text[]))
        UNION ALL
        SELECT GREATEST(fire_at, locked_until + interval '1 microsecond') FROM ironflow.timers
        WHERE processed_at IS NULL AND dead_lettered_at IS NULL AND attempts < {MAX_ATTEMPTS}
          AND workflow_type = ANY(CAST(:types AS text[]))
    ) AS d
""")

# Rows of a worker round not finished yet: still held by the kit's claim or a run token.
# (The kit's own statement: the store's in-flight bookkeeping belongs to the relay.)
TEST_UNFINISHED = {
    table: text(f"""
        SELECT id FROM {table}
        WHERE id = ANY(CAST(:ids AS uuid[])) AND processed_at IS NULL
          AND dead_lettered_at IS NULL AND locked_by IS NOT NULL
    """)
    for table in _TEST_BODY
}

TEST_AFTER_WORKER = {
    table: text(f"""
        SELECT id, attempts, last_error, processed_at IS NOT NULL AS processed,
               dead_lettered_at IS NOT NULL AS dead
        FROM {table} WHERE id = ANY(CAST(:ids AS uuid[]))
    """)
    for table in _TEST_BODY
}

_TEST_ROWS_WHERE = {
    "pending": "processed_at IS NULL AND dead_lettered_at IS NULL",
    "dead": "dead_lettered_at IS NOT NULL",
}
TEST_ROWS = {
    (table, which): text(f"""
        SELECT id, workflow_type, workflow_id, {body} AS body, attempts, last_error,
               {"locked_until" if table == "ironflow.outbox" else "GREATEST(fire_at, locked_until)"}
                   AS due_at,
               {"NULL" if table == "ironflow.outbox" else "key"} AS key,
               processed_at IS NOT NULL AS handled
        FROM {table}
        WHERE {where}
          AND (CAST(:wt AS text) IS NULL OR workflow_type = :wt)
          AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)
        ORDER BY created_at, id
    """)
    for table, body in _TEST_BODY.items()
    for which, where in _TEST_ROWS_WHERE.items()
}
"""Pending or dead-lettered rows as a test sees them, by (table, "pending" | "dead")."""
