"""Relays: claim due effects and timers with ``FOR UPDATE SKIP LOCKED`` and publish them as
Celery tasks, one task per row, ``task_id`` = the row id.

A relay claims in batches under a fresh lease token, wakes on ``LISTEN/NOTIFY`` (the
decision transaction notifies) and at the next due time it knows, with a slow safety poll
(an idle relay sends about one statement per poll; see docs/scaling.md, "Many relays"),
and stops claiming while
``max_in_flight`` of its published rows still wait to start (back-pressure), so a large
backlog never floods the broker. A publish that fails gives its unpublished claims back
at once. Any number of relays may share one database.

Waiting is not failing (DESIGN invariant 10). A published row stays held by its claim
token until a worker's start guard takes it over, and the relay keeps renewing the lease
of every such row, so a message that waits in the broker behind a backlog -- longer than
one lease -- is never claimed and published a second time. The hold is bounded twice: a
relay that dies stops renewing, so its rows come back after one lease; a row still
unstarted ``dispatch_timeout`` after it was published (its message was lost by the broker,
or discarded by a worker) is given up and comes back after one more lease; and after a
PostgreSQL restart, rows claimed before it are not renewed (a start guard the server lost
in a crash would leave its row looking unstarted although its message was consumed).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from kombu.common import Broadcast

from ironflow_celery.errors import PublishError, StorageError
from ironflow_celery.model.config import AttemptLimits, RuntimeConfig, results_ignored
from ironflow_celery.storage import tracing
from ironflow_celery.storage.kinds import EFFECT, KINDS, TIMER, Kind, RowKind, kind_of
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

__all__ = [
    "DISPATCH_HOLD_MIN",
    "Dispatched",
    "Publisher",
    "Relay",
    "RelayGroup",
    "Waker",
    "Wakeup",
    "celery_publisher",
    "declare_queues",
    "task_name",
]

log = logging.getLogger("ironflow_celery.relay")


def task_name(workflow_type: str, kind: Kind | RowKind) -> str:
    """The Celery task of a workflow type: ``ironflow.<type>.effect`` / ``.timer``."""
    return kind_of(kind).task_name(workflow_type)


DISPATCH_HOLD_MIN = 30.0
"""Seconds a relay's renewal holds a waiting row for, at least (see `Relay.keep_alive`)."""

RECHECK_EVERY = 1.0
"""Seconds between two looks at the next due time after empty claims (`Relay._learn_due`)."""
BLOCKED_POLL = 0.1
"""Poll while a due row is held by a concurrent claim or a concurrency limit."""
YIELD_MAX = 2.0
"""Seconds a relay whose claims keep finding nothing lets others answer a NOTIFY first."""
BACK_PRESSURE_POLL = 0.05
BACK_PRESSURE_POLL_MAX = 1.0
"""Bounds of the wait for room at the in-flight limit (`Relay._note_room_check`)."""


Publisher = Callable[[Kind, Sequence[ClaimedRow]], list[uuid.UUID]]


def celery_publisher(app: Any, *, forward_traces: bool = True) -> Publisher:
    """Publish claimed rows as Celery tasks on `app`, reusing one producer per batch.

    With opentelemetry-api installed and `forward_traces`, each row is published inside the
    trace of the input that wrote it (the claim returns its stored context; see
    `ironflow_celery.storage.tracing`)."""
    retry_policy = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1.0,
    }

    # The app's result settings decide, so AsyncResult(row_id).get() works with a backend.
    ignore_result = results_ignored(app.conf)

    def publish(kind: Kind, rows: Sequence[ClaimedRow]) -> list[uuid.UUID]:
        row_kind = kind_of(kind)
        published: list[uuid.UUID] = []
        pipelined = False
        try:
            with app.producer_or_acquire() as producer:
                # kombu >= 5.7 pipelines a batch into one broker round trip (Redis) instead
                # of one per message. Its flush is all-or-nothing for us: on failure every
                # row is given back (a message that did go out then fails its start guard).
                batch = getattr(producer, "batch", None)
                pipelined = batch is not None
                buffered = batch(max_size=8 * len(rows) + 8) if batch is not None else nullcontext()
                with buffered:
                    names = {row_kind.task_name(row.workflow_type) for row in rows}
                    declare_queues(app, producer, names)
                    for row in rows:
                        args = [
                            f"{row.workflow_type}:{row.workflow_id}",
                            str(row.id),
                            row.attempts + 1,
                        ]
                        kwargs: dict[str, Any] = {"lease": row.token}
                        # Shown by Flower; the task ignores them for correctness (the start
                        # guard reads the row). `due` (epoch seconds, database clock) is what
                        # the dispatch-to-start metric measures from.
                        if row.effect_type is not None:
                            kwargs["effect_type"] = row.effect_type
                        if row.due_at is not None:
                            kwargs["due"] = round(row.due_at.timestamp(), 6)
                        headers = (
                            tracing.headers_of(row.trace_context)
                            if forward_traces and tracing.AVAILABLE
                            else None
                        )
                        # The row's trace is current while it is sent: the Celery
                        # instrumentation's publish span joins it and injects itself.
                        with tracing.attached(headers):
                            app.send_task(
                                row_kind.task_name(row.workflow_type),
                                args=args,
                                kwargs=kwargs,
                                declare=(),  # declared once per batch above
                                # what Celery's saferepr would compute, at a fraction of
                                # the cost
                                argsrepr=repr(args),
                                kwargsrepr=repr(kwargs),
                                task_id=str(row.id),
                                # attempts already recorded: Flower's "Retries" column
                                # (Celery's own retry counter is never used for attempts)
                                retries=row.attempts,
                                producer=producer,
                                ignore_result=ignore_result,
                                retry=True,
                                retry_policy=retry_policy,
                                headers=headers,
                            )
                        published.append(row.id)
        except Exception as exc:
            raise PublishError([] if pipelined else published, exc) from exc
        return published

    return publish


def declare_queues(app: Any, producer: Any, names: set[str]) -> None:
    """Declare the queue each task routes to, once per batch instead of once per message.

    Celery declares the destination queue on every ``send_task`` (kombu caches the
    declaration, but copies and re-binds the queue each time first: a fifth of the relay's
    publish cost). Declaring still matters: on Redis an undeclared queue has no binding and
    a message published to it before any worker consumed it would be dropped.
    """
    for name in names:
        queue = app.amqp.router.route({}, name).get("queue")
        if queue is not None and not isinstance(queue, str | Broadcast):
            producer.maybe_declare(queue)


class Wakeup(threading.Event):
    """An event that also counts the NOTIFYs that set it: a relay compares the rows it
    claims with the NOTIFYs it sees to tell whether it is the one taking the work
    (`Relay._yield_delay`)."""

    def __init__(self) -> None:
        super().__init__()
        self.notifies: dict[str, int] = {}
        """NOTIFYs received, by payload (the workflow type); one writer, the waker."""

    def notified(self, payload: str) -> None:
        self.notifies[payload] = self.notifies.get(payload, 0) + 1
        self.set()

    def count(self, payloads: Iterable[str]) -> int:
        """NOTIFYs received so far for these payloads."""
        return sum(self.notifies.get(p, 0) for p in payloads)


class Waker:
    """One LISTEN connection that wakes the effect and timer relays on NOTIFY.

    It reconnects after a database outage; relays fall back to their safety poll meanwhile.
    """

    def __init__(self, conninfo: str, stop: threading.Event) -> None:
        self.conninfo = conninfo
        self.stop = stop
        self.events: dict[str, Wakeup] = {k.channel: Wakeup() for k in KINDS}
        self._thread = threading.Thread(target=self._run, name="ironflow-waker", daemon=True)

    def event(self, kind: Kind | RowKind) -> Wakeup:
        return self.events[kind_of(kind).channel]

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def wake_all(self) -> None:
        for event in self.events.values():
            event.set()

    def _run(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
                    for channel in self.events:
                        conn.execute(f"LISTEN {channel}")
                    delay = 0.5
                    self.wake_all()  # anything committed while we were not listening
                    while not self.stop.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            event = self.events.get(notify.channel)
                            if event is not None:
                                event.notified(notify.payload)
            except psycopg.Error as exc:
                if self.stop.is_set():
                    break
                log.warning("ironflow: LISTEN connection lost (%s); retrying in %.1fs", exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)


@dataclass(slots=True)
class Dispatched:
    """A published row as its relay tracks it until a worker starts it."""

    token: str
    """The claim's lease token (the start guard replaces it with a run token)."""
    at: float
    """When it was published (monotonic clock)."""
    server_started: datetime | None = None
    """The start time of the PostgreSQL server that granted the claim."""
    renew_at: float = 0.0
    """When its hold must next be renewed (monotonic clock)."""


class Relay:
    """One claimer: claims a batch of due rows of one kind and publishes them."""

    def __init__(
        self,
        kind: Kind,
        store: PostgresStore,
        workflow_types: Sequence[str],
        config: RuntimeConfig,
        publish: Publisher,
        *,
        name: str,
        wake: threading.Event,
        stop: threading.Event,
        on_claimed: Callable[[Kind, int], None] | None = None,
        attempt_limits: AttemptLimits | None = None,
        concurrency_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.row_kind = kind_of(kind)
        self.kind: Kind = self.row_kind.name
        self.store = store
        self.workflow_types = list(workflow_types)
        self.config = config
        self.publish = publish
        self.name = name
        self.wake = wake
        self.stop = stop
        self.on_claimed = on_claimed
        # Per-type max attempts (a workflow's retry_policy) and concurrency limits (effects).
        self.attempt_limits = attempt_limits or AttemptLimits(config.retry_policy.max_attempts)
        self.concurrency_limits = dict(concurrency_limits or {})
        # Published rows not yet started by a worker, in dispatch order.
        self.in_flight: dict[uuid.UUID, Dispatched] = {}
        self._batches = itertools.count(1)
        self._refreshed_at = 0.0
        self._full_check_at = 0.0
        self._drained = True
        self._lease = self.row_kind.lock_duration(config)
        # Each hold is renewed when a third of it has passed: two renewals may be late (a
        # busy machine, a slow statement) before it runs out. The claim holds a row for one
        # lease; renewals hold it for `_hold`, at least DISPATCH_HOLD_MIN: a waiting row's
        # hold only has to outlive its relay, not a handler, and renewing 10,000 waiting
        # rows three times per 2 s lease cost a third of a 2-core machine's throughput.
        self._renew_every = max(self._lease / 3, 0.05)
        self._hold = max(self._lease, DISPATCH_HOLD_MIN)
        self._renew_due = 0.0
        self.renewed_total = 0
        self.given_up_total = 0
        self._poll = self.row_kind.poll_interval(config)
        # When the next row becomes claimable (monotonic clock; None: nothing pending), as
        # the last `_refresh_due` found it; an idle relay sleeps until then, a NOTIFY, or
        # the safety poll. `_blocked`: that look found a row due now which our claim did
        # not take (held by a concurrent claim, or its type at its concurrency limit).
        self._due: float | None = None
        self._blocked = False
        self._checked_at = -RECHECK_EVERY
        self._recheck_at: float | None = None
        self._probe = False
        # Back-pressure: the wait before the next check for room at the limit.
        self._room_wait = BACK_PRESSURE_POLL
        self._room_checked_at = 0.0
        # Rows claimed and NOTIFYs seen (smoothed): the share of the notified work this
        # relay takes. Several relays all woken by every NOTIFY all claim; the ones that
        # keep finding nothing answer later (`_yield_delay`), the one taking the work never.
        self._notifies_seen = 0
        self._rows_avg = 1.0
        self._notifies_avg = 1.0
        self.claimed_total = 0
        self.published_total = 0

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Claim and publish until `stop` is set."""
        if not self.workflow_types:
            log.warning("ironflow %s relay %s: no workflow types registered", self.kind, self.name)
        failures = 0
        while not self.stop.is_set():
            try:
                self.wake.clear()
                progressed = self.step()
                failures = 0
            except StorageError as exc:
                failures += 1
                delay = min(0.2 * 2 ** min(failures, 5), 5.0)
                log.warning(
                    "ironflow %s relay: database error (%s); retrying in %.1fs",
                    self.kind,
                    exc,
                    delay,
                )
                self.stop.wait(delay)
                continue
            except PublishError as exc:
                log.warning("ironflow %s relay: %s; claims released", self.kind, exc)
                self.stop.wait(self.config.publish_retry_delay)
                continue
            except Exception:  # a bug must not kill the relay silently
                log.exception("ironflow %s relay: unexpected error", self.kind)
                self.stop.wait(1.0)
                continue
            # A partial batch means the due rows are drained: wait for a NOTIFY (one that
            # arrived meanwhile returns at once) instead of an empty claim, which under a
            # steady trickle of decisions doubled the relay's claims.
            if (not progressed or self._drained) and self.idle_wait():
                delay = self._yield_delay()
                if delay > 0:
                    self.stop.wait(delay)

    def step(self) -> bool:
        """One claim-and-publish round; False when there was nothing to do."""
        # Renew before claiming: after a database outage this takes our waiting rows back
        # before this relay could re-claim (and re-publish) them as expired.
        self.keep_alive()
        capacity = self.capacity()
        if capacity <= 0 or (self.in_flight and capacity < self._min_claim):
            # At the limit, wait for a quarter batch of room: claims of a handful of rows
            # cost as much database work as full ones, while the broker still holds plenty.
            return False
        if self._probe:
            # Woken by the safety poll, not by a NOTIFY or a due time: one cheap look
            # decides whether a claim is worth it (an idle relay's only statement).
            self._probe = False
            now = self._refresh_due()
            if self._due is None or self._due > now:
                return False
        token = f"{self.name}#{next(self._batches)}"
        limit = min(self.config.claim_batch_size, capacity)
        rows = self.store.claim(
            self.row_kind,
            token,
            self.workflow_types,
            lease_seconds=self._lease,
            max_attempts=self.attempt_limits,
            limit=limit,
            concurrency_limits=self.concurrency_limits,
        )
        self._drained = len(rows) < limit
        self._note_share(len(rows), self._drained)
        if self._drained:
            self._learn_due(bool(rows))
        if not rows:
            return False
        self.claimed_total += len(rows)
        if self.on_claimed is not None:
            self.on_claimed(self.kind, len(rows))
        try:
            published = self.publish(self.kind, rows)
        except PublishError as exc:
            self._track(exc.published, token, rows[0].server_started)
            sent = set(exc.published)
            unsent = [r.id for r in rows if r.id not in sent]
            try:
                self.store.release(self.row_kind, unsent, token)
            except StorageError:
                log.warning(
                    "ironflow: could not release %d claims; their leases will expire", len(unsent)
                )
            self.published_total += len(exc.published)
            raise
        self._track(published, token, rows[0].server_started)
        self.published_total += len(published)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "ironflow %s relay %s: claimed %d, published %d, in flight %d",
                self.kind,
                token,
                len(rows),
                len(published),
                len(self.in_flight),
            )
        return True

    def capacity(self) -> int:
        """Rows this relay may still claim before back-pressure stops it.

        Started rows are found by asking the database about the oldest published ones:
        rows start roughly in dispatch order, so a claim batch's worth of the oldest ids
        frees room at a fraction of the cost of checking all of them (with 1,000 in flight,
        that full check, repeated while at the limit, was a third of a busy relay's CPU and
        of its PostgreSQL backend's). All of them are checked, at most once a second, only
        when the relay is at its limit and the oldest still wait (several queues, say).
        """
        now = time.monotonic()
        free = self.config.max_in_flight - len(self.in_flight)
        at_limit = free < self.config.claim_batch_size
        if not self.in_flight or (not at_limit and now - self._refreshed_at < 1):
            return free
        self._refreshed_at = now
        done = self._finished(list(itertools.islice(self.in_flight, self._oldest_window)))
        if at_limit and not done and now - self._full_check_at >= 1:
            self._full_check_at = now
            done = self._finished(list(self.in_flight))
        for row_id in done:
            del self.in_flight[row_id]
        self._note_room_check(now, len(done), at_limit)
        return self.config.max_in_flight - len(self.in_flight)

    def _note_room_check(self, now: float, started: int, at_limit: bool) -> None:
        """Pace the checks made at the limit: every `BACK_PRESSURE_POLL` while they find
        started rows, twice as long after each full wait that found none (up to
        `BACK_PRESSURE_POLL_MAX`): a relay whose rows do not start (no worker consumes
        its queue) stops asking 20 times a second. A check right after a claim finding
        nothing yet says nothing."""
        waited = now - self._room_checked_at >= self._room_wait
        self._room_checked_at = now
        if at_limit and not started:
            if waited:
                self._room_wait = min(self._room_wait * 2, BACK_PRESSURE_POLL_MAX)
        else:
            self._room_wait = BACK_PRESSURE_POLL

    @property
    def _min_claim(self) -> int:
        return max(1, min(self.config.claim_batch_size, self.config.max_in_flight) // 4)

    @property
    def _oldest_window(self) -> int:
        return max(2 * self.config.claim_batch_size, 50)

    def _finished(self, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Those of `ids` that no longer wait under our claim (started, finished, released)."""
        still = self.store.still_dispatched(
            self.row_kind, [(row_id, self.in_flight[row_id].token) for row_id in ids]
        )
        return [row_id for row_id in ids if row_id not in still]

    def _track(
        self, ids: Iterable[uuid.UUID], token: str, server_started: datetime | None = None
    ) -> None:
        now = time.monotonic()
        renew_at = now + self._renew_every
        self._renew_due = min(self._renew_due, renew_at) if self.in_flight else renew_at
        for row_id in ids:
            self.in_flight[row_id] = Dispatched(token, now, server_started, renew_at)

    def keep_alive(self) -> None:
        """Renew the holds of published rows that still wait to start (when a third of a
        hold has passed); forget those a worker started, and give up those waiting past
        ``dispatch_timeout`` so their leases run out and they are published again."""
        now = time.monotonic()
        if not self.in_flight or now < self._renew_due:
            return
        limit = self.config.dispatch_timeout
        overdue = [row_id for row_id, d in self.in_flight.items() if now - d.at >= limit]
        if overdue:
            for row_id in overdue:
                del self.in_flight[row_id]
            self.given_up_total += len(overdue)
            log.warning(
                "ironflow %s relay %s: %d published rows did not start within %.0fs "
                "(ironflow_dispatch_timeout); their messages may be lost: they will be "
                "claimed and published again once their leases run out",
                self.kind, self.name, len(overdue), limit,
            )  # fmt: skip
        if not self.in_flight:
            return
        # Normally one group: the claims of one server run. After a PostgreSQL restart the
        # older group renews nothing (see sql._RENEW_DISPATCHED) and is forgotten.
        # Rows coming due within one short period are renewed together, so a stream of
        # claims costs one renewal statement per period, not one per claim batch.
        horizon = now + self._renew_every
        groups: dict[datetime | None, list[tuple[uuid.UUID, str]]] = {}
        for row_id, d in self.in_flight.items():
            if d.renew_at <= horizon:
                groups.setdefault(d.server_started, []).append((row_id, d.token))
        held: set[uuid.UUID] = set()
        try:
            for server_started, items in groups.items():
                held |= self.store.renew_dispatched(
                    self.row_kind, items, lease_seconds=self._hold, server_started=server_started
                )
        except StorageError:
            self._renew_due = now  # try again first thing once the database answers
            raise
        self.renewed_total += len(held)
        next_renewal = now + self._hold / 3
        for items in groups.values():
            for row_id, _ in items:
                if row_id in held:
                    self.in_flight[row_id].renew_at = next_renewal
                else:  # started, finished, released, re-claimed, or the server restarted
                    del self.in_flight[row_id]
        self._renew_due = min((d.renew_at for d in self.in_flight.values()), default=now)

    def _note_share(self, claimed: int, drained: bool) -> None:
        """Smooth the rows this relay claims against the NOTIFYs it saw meanwhile. Only a
        claim that took every row it could counts: one cut short by the batch size or
        back-pressure says nothing about other relays."""
        if not self.row_kind.due_when_written or not isinstance(self.wake, Wakeup):
            # A timer's NOTIFY announces a future fire_at: an empty claim after it is the
            # rule, not a sign of other relays (nor is anything counted on a plain event).
            return
        seen = self.wake.count(self.workflow_types)  # NOTIFYs for rows we may claim
        notifies, self._notifies_seen = seen - self._notifies_seen, seen
        if not drained:
            return
        # Slowly: a lone relay's claims come back empty now and then (a NOTIFY for a row it
        # already claimed, a failure whose backoff has not ended) without that making it
        # wait; a relay whose claims keep finding nothing yields after about fourteen.
        self._rows_avg = 0.95 * self._rows_avg + 0.05 * claimed
        self._notifies_avg = 0.95 * self._notifies_avg + 0.05 * notifies

    def _yield_delay(self) -> float:
        """How long to let other relays answer a NOTIFY first: nothing while this relay
        claims about a row per NOTIFY or more (a lone relay always does: every notified
        row is claimed by it), up to `YIELD_MAX` while its claims keep coming back empty
        because another relay took the rows. Its claims then come back with rows again
        when the others fall behind (at their in-flight limits, or gone), and it answers
        at once again."""
        share = self._rows_avg / max(self._notifies_avg, 1e-9)
        return 0.0 if share >= 0.5 else YIELD_MAX * (1 - 2 * share)

    def _refresh_due(self) -> float:
        """Ask when the next row becomes claimable (one statement); returns the time asked."""
        now = time.monotonic()
        seconds = self.store.seconds_until_due(
            self.row_kind, self.workflow_types, max_attempts=self.attempt_limits
        )
        self._checked_at = now
        self._recheck_at = None
        self._due = None if seconds is None else now + seconds
        self._blocked = seconds is not None and seconds <= 0
        return now

    def _learn_due(self, claimed_some: bool) -> None:
        """After a claim that drained the due rows: make sure the next due time is known.

        The known time is stale once it passed (we just claimed what it announced). An empty
        claim means the wake-up was for rows not due yet (a backoff, a future timer) or
        taken by another relay: look again, at most once per `RECHECK_EVERY` -- with many
        relays every NOTIFY wakes them all, and all but one find nothing."""
        now = time.monotonic()
        passed = self._due is not None and not self._blocked and self._due <= now
        # A timer's NOTIFY announces its fire_at: look at once (it may be milliseconds
        # away). An effect's mostly announces a row due now, and an empty claim after it
        # that another relay took it: once a second is enough (a failure's backoff, the
        # other thing it announces, is at least `backoff_base` long by default).
        recheck = RECHECK_EVERY if self.row_kind.due_when_written else 0.0
        if passed or (not claimed_some and now - self._checked_at >= recheck):
            try:
                self._refresh_due()
            except StorageError:
                self._recheck_at = now + RECHECK_EVERY
        elif not claimed_some:
            self._recheck_at = self._checked_at + recheck

    def idle_wait(self) -> bool:
        """Sleep until a NOTIFY, the next due time (a timer, a backoff, a lease that may
        run out), a renewal, room under back-pressure, or the safety poll; True when woken
        (by a NOTIFY). Woken by the safety poll alone, the next step first asks whether
        anything is due (`_probe`)."""
        now = time.monotonic()
        timeout, probe = self._poll, True

        def bound(seconds: float, then_probe: bool) -> None:
            nonlocal timeout, probe
            if seconds < timeout:
                timeout, probe = max(seconds, 0.0), then_probe

        if self.in_flight:
            bound(self._renew_due - now, False)
        if self.len_in_flight_at_limit():
            bound(self._room_wait, False)
        else:
            if self._due is not None:
                floor = BLOCKED_POLL if self._blocked else 0.005
                bound(max(self._due - now, floor), False)
            if self._recheck_at is not None:
                bound(self._recheck_at - now, True)
        if self.wake.wait(timeout):
            return True
        self._probe = probe
        return False

    def len_in_flight_at_limit(self) -> bool:
        """Back-pressure holds: less room than the smallest claim worth making."""
        return self.config.max_in_flight - len(self.in_flight) < self._min_claim


class RelayGroup:
    """The effect and timer relays of one process, with their waker, as threads."""

    def __init__(
        self,
        store: PostgresStore,
        workflow_types: Sequence[str],
        config: RuntimeConfig,
        publish: Publisher,
        *,
        worker_id: str,
        effects: bool = True,
        timers: bool = True,
        on_claimed: Callable[[Kind, int], None] | None = None,
        attempt_limits: AttemptLimits | None = None,
        concurrency_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.stop_event = threading.Event()
        url = store.engine.url.set(drivername="postgresql")
        self.waker = Waker(url.render_as_string(hide_password=False), self.stop_event)
        self.relays: list[Relay] = []
        enabled = {EFFECT.name: effects, TIMER.name: timers}
        for kind in KINDS:
            if not enabled[kind.name]:
                continue
            count = kind.workers(config)
            for i in range(count):
                name = f"{worker_id}-{kind}" if count == 1 else f"{worker_id}-{kind}-{i}"
                self.relays.append(
                    Relay(
                        kind.name,
                        store,
                        workflow_types,
                        config,
                        publish,
                        name=name,
                        wake=self.waker.event(kind),
                        stop=self.stop_event,
                        on_claimed=on_claimed,
                        attempt_limits=attempt_limits,
                        concurrency_limits=concurrency_limits,
                    )
                )
        self._threads = [
            threading.Thread(target=r.run, name=f"ironflow-relay-{r.name}", daemon=True)
            for r in self.relays
        ]

    def start(self) -> None:
        self.waker.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop claiming, let a batch being published finish; True if all stopped in time."""
        self.stop_event.set()
        self.waker.wake_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.waker.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def in_flight(self) -> int:
        return sum(len(r.in_flight) for r in self.relays)
