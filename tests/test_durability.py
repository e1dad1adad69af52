"""Invariant 9: whatever another session can observe commits durably.

Triggers in the test's own database record the ``synchronous_commit`` mode of every write
that others can act on -- events, new outbox rows and timers, processed, failure and
dead-letter marks -- while every acknowledgement path runs through a real Celery worker:
a follow-up input, a failed attempt, a dead letter, a timer firing, a timer dead letter.
All of them must be ``on``. Lease bookkeeping (claims, start guards, renewals) may be
``off``: losing it only makes a row claimable again (tests/test_e2e_overload.py crashes a
server to show the whole picture).
"""

from __future__ import annotations

import sqlalchemy as sa
from runtime_helpers import (
    effect_dead_letters,
    insert_timer,
    outbox,
    rows,
    running_app,
    test_config,
    timer_dead_letters,
    wait_until,
)
from workflows import Mode, Start, TestWorkflow

from ironflow_celery.model.config import RetryPolicy
from ironflow_celery.storage.store import PostgresStore

T = TestWorkflow.type
MAX = 3

OBSERVERS = """
CREATE TABLE public.commit_modes (tbl text, what text, mode text);

CREATE FUNCTION public.record_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.commit_modes VALUES
        (TG_TABLE_NAME, TG_ARGV[0], current_setting('synchronous_commit'));
    RETURN NULL;
END $$;

CREATE TRIGGER observe_events AFTER INSERT ON ironflow.events
    FOR EACH ROW EXECUTE FUNCTION public.record_commit_mode('new event');
CREATE TRIGGER observe_new_effects AFTER INSERT ON ironflow.outbox
    FOR EACH ROW EXECUTE FUNCTION public.record_commit_mode('new effect');
CREATE TRIGGER observe_new_timers AFTER INSERT ON ironflow.timers
    FOR EACH ROW EXECUTE FUNCTION public.record_commit_mode('new timer');
-- outcomes: processed (or cancelled), dead-lettered, or a failed attempt recorded
CREATE TRIGGER observe_effect_outcomes AFTER UPDATE ON ironflow.outbox FOR EACH ROW
    WHEN (NEW.processed_at IS DISTINCT FROM OLD.processed_at
          OR NEW.dead_lettered_at IS DISTINCT FROM OLD.dead_lettered_at
          OR (NEW.attempts > OLD.attempts AND NEW.locked_by IS NULL))
    EXECUTE FUNCTION public.record_commit_mode('effect outcome');
CREATE TRIGGER observe_timer_outcomes AFTER UPDATE ON ironflow.timers FOR EACH ROW
    WHEN (NEW.processed_at IS DISTINCT FROM OLD.processed_at
          OR NEW.dead_lettered_at IS DISTINCT FROM OLD.dead_lettered_at
          OR (NEW.attempts > OLD.attempts AND NEW.locked_by IS NULL))
    EXECUTE FUNCTION public.record_commit_mode('timer outcome');
"""


def test_every_observable_write_of_the_ack_paths_commits_durably(
    store: PostgresStore, db: sa.Engine
) -> None:
    with db.begin() as conn:
        conn.execute(sa.text(OBSERVERS))
    config = test_config(retry_policy=RetryPolicy(max_attempts=MAX, base_delay=0.05))
    with running_app(store, config=config) as app:
        for wid, mode in (("ok", "RouteResult"), ("tf", "TransientFailure")):
            app.service.execute(Start(id=wid, mode=Mode(mode=mode)))
        app.service.execute(Start(id="pf", mode=Mode(mode="PermanentFailure")))
        insert_timer(
            db, T, "fired", {"type": "Start", "id": "fired", "mode": {"mode": "RouteResult"}}
        )
        insert_timer(db, T, "bad", {"type": "NoSuchInput", "id": "bad"})
        app.wait_for_events(T, "ok", ["Started", "Completed"])
        app.wait_for_events(T, "tf", ["Started", "Completed"])
        app.wait_for_events(T, "fired", ["Started", "Completed"])
        wait_until(lambda: effect_dead_letters(db, MAX, workflow_id="pf"), 60)
        wait_until(lambda: timer_dead_letters(db, MAX, "bad"), 60)
        wait_until(lambda: all(r.processed_at for r in outbox(db, "fired")), 60)
    seen = rows(db, "SELECT tbl, what, mode FROM public.commit_modes")
    kinds = {(r.tbl, r.what) for r in seen}
    # every kind of observable write happened (the test covers what it claims) ...
    assert kinds >= {
        ("events", "new event"),
        ("outbox", "new effect"),
        ("timers", "new timer"),
        ("outbox", "effect outcome"),
        ("timers", "timer outcome"),
    }, kinds
    # ... and every one of them waited for its WAL flush
    relaxed = sorted({(r.tbl, r.what) for r in seen if r.mode != "on"})
    assert relaxed == [], f"committed with synchronous_commit=off: {relaxed}"
