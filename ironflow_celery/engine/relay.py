"""Relays: claim due effects and timers with ``FOR UPDATE SKIP LOCKED`` and publish them as
Celery tasks, one task per row, ``task_id`` = the row id.

A relay claims in batches under a fresh lease token, wakes on ``LISTEN/NOTIFY`` (the
decision transaction notifies) and at the next due time it knows, with a slow safety poll
(an idle relay sends about one statement per poll; see docs/scaling.md, "Many relays"),
and stops claiming while
``max_in_flight`` of its published rows still wait to start (back-pressure), so a large
backlog never floods the broker. A publish that fails gives its unpublished claims back
at once. Any number of relays may share one database.

Back-pressure holds per queue (DESIGN invariant 13): ``max_in_flight`` bounds the rows
waiting in each broker queue the relay publishes to, so a queue nobody consumes (a worker
group that is down) holds at most that many of its rows and never stops the relay from
publishing the other queues' rows.

Waiting is not failing (DESIGN invariant 10). A published row stays held by its claim
token until a worker's start guard takes it over, and the relay keeps renewing the lease
of every such row, so a message that waits in the broker behind a backlog -- longer than
one lease -- is never claimed and published a second time. The hold is bounded twice: a
relay that dies stops renewing, so its rows come back after one lease (after the longer
renewal hold for rows claimed behind a backlog, see `Relay._claim_lease`); a row still
unstarted ``dispatch_timeout`` after it was published (its message was lost by the broker,
or discarded by a worker) is given up and comes back after one more lease; and after a
PostgreSQL restart, rows claimed before it are not renewed (a start guard the server lost
in a crash would leave its row looking unstarted although its message was consumed).
A row is not given up while its queue still holds at least as many messages as the relay
has rows waiting in it and none of them started since it was published: nobody consumes
that queue, its message is still there, and publishing it again would only pile up
duplicates.
"""

from __future__ import annotations

import collections
import contextlib
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
from sqlalchemy.engine import make_url

from ironflow_celery.engine.deliveries import LostFinder
from ironflow_celery.errors import PublishError, StorageError
from ironflow_celery.model.config import AttemptLimits, RuntimeConfig, results_ignored
from ironflow_celery.service import tracing
from ironflow_celery.storage import sql
from ironflow_celery.storage.db import (
    behind_transaction_pooler,
    dead_connection_params,
    normalize_url,
)
from ironflow_celery.storage.kinds import EFFECT, KINDS, TIMER, Kind, RowKind, kind_of
from ironflow_celery.storage.store import ClaimedRow, PostgresStore

__all__ = [
    "DISPATCH_HOLD_MIN",
    "LOST_CHECK_MAX",
    "POOLED_POLL",
    "Dispatched",
    "Publisher",
    "QueueDepth",
    "Relay",
    "RelayGroup",
    "Waker",
    "Wakeup",
    "celery_publisher",
    "celery_queue_depth",
    "declare_queues",
    "message_groups",
    "queue_of",
    "task_name",
]

log = logging.getLogger("ironflow_celery.relay")


def task_name(workflow_type: str, kind: Kind | RowKind) -> str:
    """The Celery task of a workflow type: ``ironflow.<type>.effect`` / ``.timer``."""
    return kind_of(kind).task_name(workflow_type)


DISPATCH_HOLD_MIN = 30.0
"""Seconds a relay's renewal holds a waiting row for, at least (see `Relay.keep_alive`)."""

LOST_CHECK_MAX = 15.0
"""Seconds between two looks for rows a dead worker took, at most (`Relay.release_lost`)."""
POOLED_POLL = {k.name: k.pooled_poll for k in KINDS}
"""Seconds between wake-ups per kind behind a transaction pooler without a listen URL, at
most: no NOTIFY arrives there, so the safety poll (5 s by default) would be the latency of
new work; a claim every 0.2 s is the price (set ``ironflow_listen_url`` to avoid it)."""
RECHECK_EVERY = 1.0
"""Seconds between two looks at the next due time after empty claims (`Relay._learn_due`)."""
BLOCKED_POLL = 0.1
"""Poll while a due row is held by a concurrent claim or a concurrency limit."""
YIELD_MAX = 2.0
"""Seconds a relay whose claims keep finding nothing lets others answer a NOTIFY first."""
CLAIM_DEFER = 0.05
"""Seconds between two claims that a claim behind a backlog may wait for rows to gather,
at most (`Relay._backlog_wait`)."""
DEFER_SHARES = 4
"""A relay that claims a smaller share of its types' rows than 1 in this many waits as
long as one that claims exactly that share (`Relay._backlog_wait`)."""
DEAF_MIN = 0.2
"""A relay that lets others answer a NOTIFY for this long or longer stops listening
meanwhile (`Waker`): shorter spells are not worth an UNLISTEN and a LISTEN."""
LISTEN_AHEAD = 0.1
"""Seconds before a deaf spell ends that the waker LISTENs again."""
DEAF_TICK = 0.05
"""Seconds between two looks of a waker with a channel not listened to: a relay may want it
back before its spell ends (`Wakeup.hear` waits for it)."""
HEAR_TIMEOUT = 1.0
"""Seconds a relay back from a deaf spell waits for the LISTEN, at most (a waker that lost
its connection LISTENs when it has one again, and wakes every relay then)."""
BACKLOG_AGE = 0.01
"""How long the oldest row a relay published to a queue must have waited, still waiting
per the database, for that queue to count as backlogged (`Relay._backlog_wait`)."""
BACKLOG_CHECK_EVERY = 0.05
"""Seconds between two looks at whether a queue's oldest rows still wait, at least
(`Relay._backlog_age`)."""
BACK_PRESSURE_POLL = 0.05
BACK_PRESSURE_POLL_MAX = 1.0
"""Bounds of the wait for room at the in-flight limit (`Relay._note_room_check`)."""


Publisher = Callable[[Kind, Sequence[Sequence[ClaimedRow]]], list[uuid.UUID]]
"""Publishes claimed rows, already grouped into messages (`message_groups`); returns the
ids of the rows sent."""

QueueDepth = Callable[[str], int | None]
"""The number of messages waiting in a broker queue (None: the broker could not say)."""

DEFAULT_QUEUE = ""
"""The partition of rows whose queue the relay was not told (one budget for all of them)."""


def queue_of(app: Any, task: str) -> str:
    """The name of the queue `app` routes the task named `task` to."""
    queue = app.amqp.router.route({}, task).get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue)


def celery_queue_depth(app: Any) -> QueueDepth:
    """How many messages wait in a queue of `app`'s broker (a passive declare: Redis
    counts the list, AMQP reports the ready messages); a queue that does not exist holds 0."""

    def depth(queue: str) -> int | None:
        try:
            # a broker that does not answer must not hold the relay up for long
            with app.connection_for_write(connect_timeout=5) as conn:
                channel = conn.channel()
                try:
                    return int(channel.queue_declare(queue=queue, passive=True).message_count)
                except conn.channel_errors as exc:
                    if "NOT_FOUND" in str(exc) or type(exc).__name__ == "NotFound":
                        return 0
                    raise
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
        except Exception as exc:  # unknown: the relay then acts as if it could not check
            log.debug("ironflow: could not read the depth of queue %s: %s", queue, exc)
            return None

    return depth


def celery_publisher(app: Any, *, forward_traces: bool = True) -> Publisher:
    """Publish claimed rows as Celery tasks on `app`, reusing one producer per batch.

    Each message the relay formed (`message_groups`) is one task of its type: a group of
    several rows as ``rows=[...]``, a lone row with the single-row signature (its id as the
    task id).

    With opentelemetry-api installed and `forward_traces`, each row is published inside the
    trace of the input that wrote it (the claim returns its stored context; see
    `ironflow_celery.service.tracing`); a group's rows carry theirs in the message."""
    retry_policy = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1.0,
    }
    # The app's result settings decide, so AsyncResult(row_id).get() works with a backend.
    ignore_result = results_ignored(app.conf)
    routes: dict[str, Any] = {}  # task name -> its queue (`declare_queues`)

    def send(
        producer: Any,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        task_id: str,
        retries: int,
        trace: Any,
    ) -> None:
        headers = tracing.headers_of(trace) if forward_traces and tracing.AVAILABLE else None
        # The row's trace is current while it is sent: the Celery instrumentation's
        # publish span joins it and injects itself.
        with tracing.attached(headers):
            app.send_task(
                name,
                args=args,
                kwargs=kwargs,
                declare=(),  # declared once per batch (declare_queues)
                # what Celery's saferepr would compute, at a fraction of the cost
                argsrepr=repr(args),
                kwargsrepr=_kwargs_repr(kwargs),
                task_id=task_id,
                # attempts already recorded: Flower's "Retries" column
                # (Celery's own retry counter is never used for attempts)
                retries=retries,
                producer=producer,
                ignore_result=ignore_result,
                retry=True,
                retry_policy=retry_policy,
                headers=headers,
            )

    def publish(kind: Kind, messages: Sequence[Sequence[ClaimedRow]]) -> list[uuid.UUID]:
        row_kind = kind_of(kind)
        rows = [row for group in messages for row in group]
        published: list[uuid.UUID] = []
        pipelined = False
        try:
            with app.producer_or_acquire() as producer:
                # kombu >= 5.7 pipelines a batch into one broker round trip (Redis) instead
                # of one per message. Its flush is all-or-nothing for us: on failure every
                # row is given back (a message that did go out then fails its start guard).
                # A lone message is one round trip either way, and the batch's set-up and
                # pipeline would be a sixth of its publish cost (a trickle's every message).
                batch = getattr(producer, "batch", None) if len(messages) > 1 else None
                pipelined = batch is not None
                buffered = batch(max_size=8 * len(rows) + 8) if batch is not None else nullcontext()
                with buffered:
                    names = {row_kind.task_name(row.workflow_type) for row in rows}
                    declare_queues(app, producer, names, routes)
                    for group in messages:
                        first = group[0]
                        name = row_kind.task_name(first.workflow_type)
                        if len(group) > 1:
                            kwargs: dict[str, Any] = {"rows": [_group_item(r) for r in group]}
                            send(
                                producer,
                                name,
                                [],
                                kwargs,
                                str(uuid.uuid4()),
                                0,
                                first.trace_context,
                            )
                            published.extend(r.id for r in group)
                            continue
                        args = [
                            f"{first.workflow_type}:{first.workflow_id}",
                            str(first.id),
                            first.attempts + 1,
                        ]
                        kwargs = {"lease": first.token}
                        # Shown by Flower; the task ignores them for correctness (the start
                        # guard reads the row). `due` (epoch seconds, database clock) is what
                        # the dispatch-to-start metric measures from.
                        if first.effect_type is not None:
                            kwargs["effect_type"] = first.effect_type
                        if first.due_at is not None:
                            kwargs["due"] = round(first.due_at.timestamp(), 6)
                        send(
                            producer,
                            name,
                            args,
                            kwargs,
                            str(first.id),
                            first.attempts,
                            first.trace_context,
                        )
                        published.append(first.id)
        except Exception as exc:
            raise PublishError([] if pipelined else published, exc) from exc
        return published

    return publish


def message_groups(
    kind: RowKind, rows: Sequence[ClaimedRow], sizes: Mapping[str, int]
) -> list[list[ClaimedRow]]:
    """The messages `rows` travel in, in claim order: groups of up to ``sizes[type]`` fresh
    effects of one type, every other row alone. Fresh: a first attempt, not re-claimed
    after a lease ran out (its due time is its creation), so a row that failed or whose
    run was lost (a handler that kills its worker) never shares a message again.

    A type's fresh rows fill as few messages as its size allows, evenly (30 rows of size
    20: 15 and 15, not 20 and 10: the two processes that run them finish together)."""

    def groupable(row: ClaimedRow) -> bool:
        return (
            kind is EFFECT
            and sizes.get(row.workflow_type, 1) > 1
            and row.attempts == 0
            and (row.due_at is None or row.due_at == row.created_at)
        )

    counts = collections.Counter(row.workflow_type for row in rows if groupable(row))
    # Per type, the sizes of its messages in turn: n rows over m messages, evenly.
    plans: dict[str, list[int]] = {}
    for wt, n in counts.items():
        m = -(-n // sizes[wt])
        plans[wt] = [n // m + (1 if i < n % m else 0) for i in range(m)]
    messages: list[list[ClaimedRow]] = []
    open_groups: dict[str, list[ClaimedRow]] = {}
    for row in rows:
        if not groupable(row):
            messages.append([row])
            continue
        wt = row.workflow_type
        group = open_groups.get(wt)
        if group is None or len(group) >= plans[wt][0]:
            if group is not None:
                plans[wt].pop(0)
            group = open_groups[wt] = []
            messages.append(group)
        group.append(row)
    return messages


def _group_item(row: ClaimedRow) -> list[Any]:
    """A row of a group message: what a single-row message says of it, plus its trace."""
    due = round(row.due_at.timestamp(), 6) if row.due_at is not None else None
    return [
        str(row.id),
        row.workflow_id,
        row.attempts + 1,
        row.token,
        row.effect_type,
        due,
        row.trace_context,
    ]


def _kwargs_repr(kwargs: Mapping[str, Any]) -> str:
    """Flower's view of a message's kwargs: a group shows its size and row ids."""
    rows = kwargs.get("rows")
    if rows is None:
        return repr(kwargs)
    return f"{{'rows': <{len(rows)} rows: {', '.join(r[0] for r in rows)}>}}"


def declare_queues(
    app: Any, producer: Any, names: set[str], routes: dict[str, Any] | None = None
) -> None:
    """Declare the queue each task routes to, once per batch instead of once per message.

    Celery declares the destination queue on every ``send_task`` (kombu caches the
    declaration, but copies and re-binds the queue each time first: a fifth of the relay's
    publish cost). Declaring still matters: RabbitMQ drops a message for a queue that does
    not exist yet (no worker has consumed it, or the broker restarted empty), as Redis does
    one sent through an exchange whose binding is missing.

    `routes` keeps each name's queue between calls (Celery's router is itself built once
    per app).
    """
    channel = getattr(producer, "channel", None)
    client = getattr(getattr(channel, "connection", None), "client", None)
    declared = getattr(client, "declared_entities", None)
    for name in names:
        if routes is not None and name in routes:
            queue = routes[name]
        else:
            queue = app.amqp.router.route({}, name).get("queue")
            if routes is not None:
                routes[name] = queue
        if queue is None or isinstance(queue, str | Broadcast):
            continue
        # kombu's own cache test, made before maybe_declare binds a copy of the queue (and
        # of its exchange) only to find it there: half of a lone row's declare cost. The
        # set is the connection's, emptied when it reconnects, so a new broker connection
        # still declares.
        if declared is not None and queue.can_cache_declaration and hash(queue) in declared:
            continue
        producer.maybe_declare(queue)


class Wakeup(threading.Event):
    """An event that also counts the NOTIFYs that set it: a relay compares the rows it
    claims with the NOTIFYs it sees to tell whether it is the one taking the work
    (`Relay._yield_delay`). It also tells the waker whether anyone wants this channel's
    NOTIFYs: while every relay it wakes lets others answer, nobody does (`deafen`)."""

    def __init__(self, changed: threading.Event | None = None) -> None:
        super().__init__()
        self.notifies: dict[str, int] = {}
        """NOTIFYs received, by payload (the workflow type); one writer, the waker."""
        self.listening = threading.Event()
        """Set while the waker's LISTEN on this channel is in effect."""
        self.changed = changed or threading.Event()
        """Set when a relay starts or ends a deaf spell (the waker then looks again)."""
        self._lock = threading.Lock()
        self._members = 0
        self._deaf: dict[int, float] = {}  # member -> until when (monotonic clock)

    def notified(self, payload: str) -> None:
        self.notifies[payload] = self.notifies.get(payload, 0) + 1
        self.set()

    def count(self, payloads: Iterable[str]) -> int:
        """NOTIFYs received so far for these payloads."""
        return sum(self.notifies.get(p, 0) for p in payloads)

    def join(self) -> int:
        """A relay that waits on this event: its key for `deafen` and `hear`."""
        with self._lock:
            self._members += 1
            return self._members

    def deafen(self, member: int, seconds: float) -> None:
        """`member` ignores this channel's NOTIFYs for `seconds` (it lets others answer)."""
        with self._lock:
            self._deaf[member] = time.monotonic() + seconds
        self.changed.set()

    def hear(self, member: int, timeout: float) -> bool:
        """`member`'s deaf spell is over: return once the waker's LISTEN is in effect (at
        most `timeout`; False if it was not), so that a claim made next misses nothing a
        NOTIFY would announce."""
        with self._lock:
            self._deaf.pop(member, None)
            if self.listening.is_set():  # cleared under this lock before any UNLISTEN
                return True
        self.changed.set()
        return self.listening.wait(timeout)

    def wanted(self, now: float) -> tuple[bool, float | None]:
        """Whether the relays on this channel want the waker to LISTEN now, and if not,
        when again (a little before the first deaf spell ends, so that the relay finds the
        LISTEN in effect). A channel no relay waits on has nobody to yield: it wants it."""
        with self._lock:
            if not self._members or len(self._deaf) < self._members:
                return True, None
            again = min(self._deaf.values()) - LISTEN_AHEAD
            if again <= now:
                return True, None
            self.listening.clear()  # under the lock: `hear` then waits for the LISTEN
            return False, again


class Waker:
    """One LISTEN connection that wakes the effect and timer relays on NOTIFY.

    It reconnects after a database outage; relays fall back to their safety poll meanwhile.
    Behind a transaction pooler (PgBouncer ``pool_mode = transaction``), where notifications
    never reach a listener, it says so once and wakes the relays every pooled poll interval
    instead -- unless a direct `listen_url` (``ironflow_listen_url``) was given.

    PostgreSQL wakes every listening backend on every notifying commit, whatever the
    channel (about 20 µs of its CPU each, measured): while every effect relay of the
    process lets other relays answer NOTIFYs, the waker listens on nothing, and LISTENs
    again before the first of them claims (`_listen`).
    """

    def __init__(
        self,
        conninfo: str,
        stop: threading.Event,
        *,
        poll_intervals: Mapping[str, float] | None = None,
        direct: bool = False,
        connect_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.stop = stop
        self.changed = threading.Event()
        self.events: dict[str, Wakeup] = {k.channel: Wakeup(self.changed) for k in KINDS}
        # The channel whose relays may stop listening: the effects'. A timer's NOTIFY
        # announces a future fire_at, so its relays never yield.
        self._yielding = self.events[EFFECT.channel]
        self.poll_intervals = dict(poll_intervals or {})
        self.direct = direct  # a listen URL of its own: never checked for a pooler
        self.connect_params = dict(connect_params or {})
        self.polling = False
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
                with psycopg.connect(
                    self.conninfo, autocommit=True, connect_timeout=5, **self.connect_params
                ) as conn:
                    if not self.direct and behind_transaction_pooler(conn):
                        self.polling = True
                        break
                    delay = 0.5
                    self._listen(conn)
            except psycopg.Error as exc:
                if self.stop.is_set():
                    break
                log.warning(
                    "ironflow: LISTEN connection lost (PostgreSQL at %s: %s); retrying in %.1fs",
                    psycopg.conninfo.conninfo_to_dict(self.conninfo).get("host", "localhost"),
                    exc,
                    delay,
                )
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                for event in self.events.values():
                    event.listening.clear()
        if self.polling:
            for event in self.events.values():
                event.listening.set()  # nothing to wait for: the relays are polled
            self._poll()

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        """Deliver NOTIFYs to the relays' events until `stop`.

        It LISTENs on every channel, or on none while every effect relay lets others answer
        (`Wakeup.wanted`): PostgreSQL signals every listening backend on every NOTIFY,
        whatever its channel, so only a connection listening on nothing costs nothing. The
        timer relays meanwhile wake at the next due time they know, and are woken when the
        LISTEN is back to look again (a timer scheduled meanwhile).
        """
        listening, first = False, True
        while not self.stop.is_set():
            self.changed.clear()
            now = time.monotonic()
            want, again = self._yielding.wanted(now)
            if want and not listening:
                for channel in self.events:
                    conn.execute(sql.listen(channel))
                listening = True
                for event in self.events.values():
                    event.listening.set()
                    if not first and event is not self._yielding:
                        event.set()  # back from a deaf spell: the timer relays look again
            elif not want and listening:
                for event in self.events.values():
                    event.listening.clear()
                conn.execute(sql.UNLISTEN_ALL)
                listening = False
            if first:
                first = False
                self.wake_all()  # anything committed while we were not listening
            timeout = 0.5
            if again is not None:  # a relay may want it back before its spell ends
                timeout = min(DEAF_TICK, max(again - now, 0.0))
            if self.changed.is_set():  # a relay came back meanwhile: look again first
                continue
            for notify in conn.notifies(timeout=timeout):
                notified = self.events.get(notify.channel)
                if notified is not None:
                    notified.notified(notify.payload)
                if self.changed.is_set():
                    break

    def _poll(self) -> None:
        """Wake each kind's relays every its poll interval (no NOTIFY to wait for)."""
        intervals = {c: self.poll_intervals.get(c, 1.0) for c in self.events}
        log.warning(
            "ironflow: the database URL goes through a transaction pooler, where LISTEN "
            "receives no notifications: the relays poll (every %s); set "
            "ironflow_listen_url to a direct PostgreSQL URL to have them woken by NOTIFY",
            ", ".join(f"{s:g} s for {c}" for c, s in intervals.items()),
        )
        due = dict.fromkeys(intervals, 0.0)
        while not self.stop.is_set():
            now = time.monotonic()
            for channel, at in due.items():
                if now >= at:
                    self.events[channel].set()
                    due[channel] = now + intervals[channel]
            self.stop.wait(max(0.01, min(due.values()) - time.monotonic()))


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
    queue: str = DEFAULT_QUEUE
    """The broker queue its message went to (back-pressure holds per queue)."""
    message: uuid.UUID | None = None
    """The first row of the message it travelled in (a group's rows share one message)."""


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
        queues: Mapping[str, str] | None = None,
        queue_depth: QueueDepth | None = None,
        find_lost: LostFinder | None = None,
        group_sizes: Mapping[str, int] | None = None,
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
        # The queue each type's tasks of this kind route to: ``max_in_flight`` holds per
        # queue, so one nobody consumes cannot take the room of the others (types not
        # named share one partition). `queue_depth` lets a dispatch timeout tell a queue
        # nobody consumes (its messages still there) from lost messages.
        self.queues = {t: (queues or {}).get(t, DEFAULT_QUEUE) for t in self.workflow_types}
        self.queue_depth = queue_depth
        # How claimed rows are grouped into messages (`message_groups`): a queue's depth
        # counts messages, so a dispatch timeout compares it with the messages our rows are in.
        self.group_sizes = dict(group_sizes or {})
        # Published rows not yet started by a worker, in dispatch order; and per queue.
        self.in_flight: dict[uuid.UUID, Dispatched] = {}
        self._waiting: dict[str, dict[uuid.UUID, None]] = {
            q: {} for q in dict.fromkeys(self.queues.values())
        }
        self._checked_at: dict[str, float] = {}  # per queue: its last check for started rows
        self._full_checked_at: dict[str, float] = {}
        # Per queue: its oldest row when a check last found it still waiting (the queue's
        # backlog, `_backlog_wait`).
        self._seen_waiting: dict[str, uuid.UUID] = {}
        self._last_claimed = 0  # rows the last claim took
        self._started_at: dict[str, float] = {}  # per queue: when a row of it last started
        self.held_total = 0
        """Rows kept past ``dispatch_timeout`` because their queue still held them."""
        self._batches = itertools.count(1)
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
        # Rows whose message a worker that is gone took (engine.deliveries): checked this
        # often, for rows published at least this long ago; 15 s at most, so a dead host
        # costs well under one (300 s) lease, not dispatch_timeout.
        self.find_lost = find_lost
        self._lost_every = min(max(self._lease / 3, 1.0), LOST_CHECK_MAX)
        self._lost_check_at = 0.0
        self._lost_look: (
            tuple[threading.Thread, dict[uuid.UUID, str], list[set[uuid.UUID]]] | None
        ) = None
        self.lost_total = 0
        self.renewed_total = 0
        self.given_up_total = 0
        self._poll = self.row_kind.poll_interval(config)
        # When the next row becomes claimable (monotonic clock; None: nothing pending), as
        # the last `_refresh_due` found it; an idle relay sleeps until then, a NOTIFY, or
        # the safety poll. `_blocked`: that look found a row due now which our claim did
        # not take (held by a concurrent claim, or its type at its concurrency limit).
        self._due: float | None = None
        self._blocked = False
        self._claimed_at = 0.0  # when the last claim was sent (monotonic clock)
        self._due_checked_at = -RECHECK_EVERY
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
        self._member = self.wake.join() if isinstance(self.wake, Wakeup) else 0

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> None:
        """Claim and publish until `stop` is set."""
        if not self.workflow_types:
            log.warning("ironflow %s relay %s: no workflow types to claim", self.kind, self.name)
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
                    self._let_others_answer(delay)

    def step(self) -> bool:
        """One claim-and-publish round; False when there was nothing to do."""
        # Renew before claiming: after a database outage this takes our waiting rows back
        # before this relay could re-claim (and re-publish) them as expired.
        self.keep_alive()
        self.release_lost()
        types, limit = self._claimable()
        if not types:
            return False
        if self._probe:
            # Woken by the safety poll, not by a NOTIFY or a due time: one cheap look
            # decides whether a claim is worth it (an idle relay's only statement).
            self._probe = False
            now = self._refresh_due()
            if self._due is None or self._due > now:
                return False
        gather = self._backlog_wait(types)
        if gather > 0 and self.stop.wait(gather):
            return False
        token = f"{self.name}#{next(self._batches)}"
        lease = self._claim_lease()
        self._claimed_at = time.monotonic()
        rows = self.store.claim(
            self.row_kind,
            token,
            types,
            lease_seconds=lease,
            max_attempts=self.attempt_limits,
            limit=limit,
            concurrency_limits=self.concurrency_limits,
        )
        self._drained = len(rows) < limit
        self._last_claimed = len(rows)
        self._note_share(len(rows), self._drained)
        if self._drained:
            self._learn_due(bool(rows))
        if not rows:
            return False
        self.claimed_total += len(rows)
        if self.on_claimed is not None:
            self.on_claimed(self.kind, len(rows))
        # How the rows travel, decided once: the publisher sends these messages, and a
        # dispatch timeout compares a queue's depth with them.
        messages = message_groups(self.row_kind, rows, self.group_sizes)
        try:
            published = self.publish(self.kind, messages)
        except PublishError as exc:
            self._track(self._queued(rows, exc.published), token, rows[0].server_started, lease)
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
        self._track(
            self._queued(rows, published),
            token,
            rows[0].server_started,
            lease,
            self._messages(messages),
        )
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

    def _claimable(self) -> tuple[list[str], int]:
        """The types the next claim takes and its limit: one statement, within the room of
        every queue it may fill.

        The queues with a full batch of room are claimed together, a batch at most (no
        queue can overflow); only when none has, those with a quarter batch of room, at
        most the smallest room among them. A queue at its limit is left out (at the limit,
        wait for a quarter batch of room: claims of a handful of rows cost as much database
        work as full ones, while the broker still holds plenty).
        """
        rooms = self.rooms()
        batch = min(self.config.claim_batch_size, self.config.max_in_flight)
        chosen = {q: room for q, room in rooms.items() if room >= batch}
        if not chosen:
            chosen = {
                q: room
                for q, room in rooms.items()
                if room > 0 and (room >= self._min_claim or not self._waiting[q])
            }
        if not chosen:
            return [], 0
        types = [t for t in self.workflow_types if self.queues[t] in chosen]
        return types, min(self.config.claim_batch_size, *chosen.values())

    def _queued(
        self, rows: Sequence[ClaimedRow], published: Iterable[uuid.UUID]
    ) -> list[tuple[uuid.UUID, str]]:
        """The published rows with the queue each went to."""
        types = {row.id: row.workflow_type for row in rows}
        return [
            (row_id, self.queues.get(types.get(row_id, ""), DEFAULT_QUEUE)) for row_id in published
        ]

    def capacity(self) -> int:
        """Rows this relay may still claim before back-pressure stops it: the most room
        any of its queues has (`rooms`)."""
        return max(self.rooms().values(), default=0)

    def rooms(self) -> dict[str, int]:
        """Rows this relay may still publish to each of its queues before back-pressure
        stops it (``max_in_flight`` minus its rows still waiting there).

        Started rows are found by asking the database about the oldest published ones:
        rows start roughly in dispatch order, so a claim batch's worth of the oldest ids
        frees room at a fraction of the cost of checking all of them (with 1,000 in flight,
        that full check, repeated while at the limit, was a third of a busy relay's CPU and
        of its PostgreSQL backend's). All of them are checked, at most once a second, only
        when a queue is at its limit and its oldest still wait. A queue at its limit is
        checked at every round while its rows start, once a second while none did for a
        second (a queue nobody consumes costs a statement a second, not one per round), and
        all its rows at most every ten seconds then.
        """
        now = time.monotonic()
        limit = self.config.max_in_flight
        due = [
            q
            for q, waiting in self._waiting.items()
            if waiting
            and (
                now - self._checked_at.get(q, 0.0) >= 1
                or (self._at_limit(q) and not self._quiet(q, now))
            )
        ]
        if due:
            before = len(self.in_flight)
            window = [
                r for q in due for r in itertools.islice(self._waiting[q], self._oldest_window)
            ]
            found = self._forget(self._finished(window), started=True)
            self._note_oldest(due, window, now)
            for q in due:
                full_every = 10.0 if self._quiet(q, now) else 1.0
                if (
                    q not in found
                    and self._at_limit(q)
                    and now - self._full_checked_at.get(q, 0.0) >= full_every
                ):
                    self._full_checked_at[q] = now
                    self._forget(self._finished(list(self._waiting[q])), started=True)
            self._note_room_check(
                now, before - len(self.in_flight), any(self._at_limit(q) for q in due)
            )
        return {q: limit - len(waiting) for q, waiting in self._waiting.items()}

    def _at_limit(self, queue: str) -> bool:
        """Less than a batch of room left in `queue`."""
        return self.config.max_in_flight - len(self._waiting[queue]) < self.config.claim_batch_size

    def _quiet(self, queue: str, now: float) -> bool:
        """None of this relay's rows in `queue` started for a second."""
        return now - self._started_at.get(queue, 0.0) >= 1.0

    def _forget(self, ids: Iterable[uuid.UUID], *, started: bool = False) -> set[str]:
        """Stop tracking `ids` (`started`: no longer waiting under our claim); their queues."""
        now = time.monotonic()
        queues: set[str] = set()
        for row_id in ids:
            dispatched = self.in_flight.pop(row_id, None)
            if dispatched is None:
                continue
            self._waiting[dispatched.queue].pop(row_id, None)
            queues.add(dispatched.queue)
        if started:
            for q in queues:
                self._started_at[q] = now
        return queues

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
        left = self.store.no_longer_dispatched(
            self.row_kind, [(row_id, self.in_flight[row_id].token) for row_id in ids]
        )
        return [row_id for row_id in ids if row_id in left]

    @staticmethod
    def _messages(messages: Sequence[Sequence[ClaimedRow]]) -> dict[uuid.UUID, uuid.UUID]:
        """Each grouped row's message (its first row)."""
        return {r.id: group[0].id for group in messages if len(group) > 1 for r in group}

    def _backlog_wait(self, types: Sequence[str]) -> float:
        """How long the next claim waits for more rows to gather (0: claim now).

        Only after a claim that took every due row and more than one (rows arrive faster
        than the relay claims them), for types that travel in groups, and when every
        queue the claim fills holds a backlog: the oldest row this relay published there
        still waits, per the database, and has waited `BACKLOG_AGE` or more. The claim
        then comes at most as long after the last one as that row has waited, and at
        most `CLAIM_DEFER` after it (up to `DEFER_SHARES` times that for a relay that
        claims a share of a stream with other relays). Rows claimed at once would queue
        behind that backlog; claimed a moment later they travel in fewer, larger groups,
        whose start guard, acknowledgement and message more rows share (benchmark row 3,
        a stream of full cycles: from 0.68-0.70 to 0.83-0.92 times plain Celery in three
        interleaved pairs). Workers that keep up start each row within milliseconds, so a trickle's
        claims never wait."""
        if (
            not self._drained
            or self._last_claimed < 2
            or not any(self.group_sizes.get(t, 1) > 1 for t in types)
        ):
            return 0.0
        # Relays sharing a stream claim in turn: one that takes a quarter of the rows
        # waits up to four times as long, so that claims of the types (by any relay) stay
        # about `CLAIM_DEFER` apart.
        longest = CLAIM_DEFER / min(1.0, max(self._share, 1 / DEFER_SHARES))
        now = time.monotonic()
        if now - self._claimed_at >= longest:
            return 0.0
        waited = min(self._backlog_age(q, now) for q in {self.queues[t] for t in types})
        if waited < BACKLOG_AGE:
            return 0.0
        return max(0.0, self._claimed_at + min(waited, longest) - now)

    def _backlog_age(self, queue: str, now: float) -> float:
        """How long this relay's oldest row in `queue` has waited, if a check found it
        still waiting (0 otherwise). Checks the queue's oldest rows (the room check's
        statement, forgetting those that started) at most once per `BACKLOG_CHECK_EVERY`."""
        waiting = self._waiting.get(queue)
        if not waiting or len(waiting) < self._min_claim:
            return 0.0
        oldest = next(iter(waiting))
        if now - self.in_flight[oldest].at < BACKLOG_AGE:
            return 0.0
        if now - self._checked_at.get(queue, -BACKLOG_CHECK_EVERY) >= BACKLOG_CHECK_EVERY:
            window = list(itertools.islice(waiting, self._oldest_window))
            self._forget(self._finished(window), started=True)
            self._note_oldest([queue], window, now)
        seen = self._seen_waiting.get(queue)
        if seen is None or seen != next(iter(waiting), None) or len(waiting) < self._min_claim:
            return 0.0
        return now - self.in_flight[seen].at

    def _note_oldest(self, queues: Iterable[str], window: Sequence[uuid.UUID], now: float) -> None:
        """After a check of `window` (their started rows forgotten): each queue's oldest
        row left was asked about, so it still waits."""
        asked = set(window)
        for q in queues:
            self._checked_at[q] = now
            oldest = next(iter(self._waiting.get(q, ())), None)
            if oldest in asked:
                self._seen_waiting[q] = oldest
            else:
                self._seen_waiting.pop(q, None)

    def _claim_lease(self) -> float:
        """How long the next claim holds its rows: one lease, or the renewals' longer hold
        when rows this relay published a third of a lease ago still wait in the broker.

        Rows claimed behind such a backlog would wait as long, so each would be renewed
        once before it starts: a second write per row under overload (a lease shorter
        than the queue's wait, benchmark row 9). Claiming them for the hold straight
        away writes once; if this relay dies, they come back after the hold, as the
        renewed rows ahead of them do."""
        if self._hold <= self._lease:
            return self._lease
        oldest = time.monotonic() - self._renew_every
        for waiting in self._waiting.values():
            first = next(iter(waiting), None)  # dispatch order: the oldest first
            dispatched = self.in_flight.get(first) if first is not None else None
            if dispatched is not None and dispatched.at <= oldest:
                return self._hold
        return self._lease

    def _track(
        self,
        ids: Iterable[tuple[uuid.UUID, str]],
        token: str,
        server_started: datetime | None = None,
        lease: float | None = None,
        messages: Mapping[uuid.UUID, uuid.UUID] | None = None,
    ) -> None:
        now = time.monotonic()
        renew_at = now + max(self._renew_every, (lease or self._lease) / 3)
        self._renew_due = min(self._renew_due, renew_at) if self.in_flight else renew_at
        for row_id, queue in ids:
            message = messages.get(row_id) if messages else None
            self.in_flight[row_id] = Dispatched(
                token, now, server_started, renew_at, queue, message
            )
            waiting = self._waiting.setdefault(queue, {})
            if not waiting:  # the queue's one-second "quiet" clock starts with its first row
                self._started_at[queue] = max(self._started_at.get(queue, 0.0), now)
            waiting[row_id] = None

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
            overdue = self._hold_unconsumed(overdue, now)
        if overdue:
            self._forget(overdue)
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
                    self._forget([row_id], started=True)
        self._renew_due = min((d.renew_at for d in self.in_flight.values()), default=now)

    def _hold_unconsumed(self, overdue: list[uuid.UUID], now: float) -> list[uuid.UUID]:
        """Those of the `overdue` rows to give up; the others are held another
        ``dispatch_timeout``.

        A row is held when none of this relay's rows in its queue started since it was
        published and the queue still holds at least as many messages as this relay's rows
        waiting there travelled in (a group's rows share one): nobody consumes the queue
        (its worker group is down), the message is there, and publishing it again would
        only pile up a duplicate. A queue that moves, or holds fewer messages (the broker
        lost some), gives its overdue rows up as before.
        """
        if self.queue_depth is None:
            return overdue
        by_queue: dict[str, list[uuid.UUID]] = {}
        for row_id in overdue:
            by_queue.setdefault(self.in_flight[row_id].queue, []).append(row_id)
        give_up: list[uuid.UUID] = []
        for queue, ids in by_queue.items():
            oldest = min(self.in_flight[row_id].at for row_id in ids)
            # messages, not rows: a group's rows travel in one
            waiting = len({self.in_flight[r].message or r for r in self._waiting[queue]})
            depth = None
            if self._started_at.get(queue, 0.0) <= oldest and queue != DEFAULT_QUEUE:
                depth = self.queue_depth(queue)
            if depth is None or depth < waiting:
                give_up.extend(ids)
                continue
            for row_id in ids:
                self.in_flight[row_id].at = now
            self.held_total += len(ids)
            log.warning(
                "ironflow %s relay %s: %d published rows did not start within %.0fs "
                "(ironflow_dispatch_timeout), and queue %s still holds %d messages with none "
                "of this relay's %d rows there started since: is a worker consuming it "
                "(celery worker -Q %s)? They stay held, not published again",
                self.kind, self.name, len(ids), self.config.dispatch_timeout, queue, depth,
                waiting, queue,
            )  # fmt: skip
        return give_up

    def release_lost(self) -> None:
        """Give back the published rows whose message a worker that is gone had taken
        (`find_lost`), so they are claimed and published again now, not after
        ``dispatch_timeout``; a row whose message merely waits is never among them.

        The look runs in a thread of its own (it waits for the workers' replies to a
        broadcast): the relay keeps claiming and renewing meanwhile, and releases what
        the previous look found, each row only if it is still under the claim looked at.
        """
        if self.find_lost is None:
            return
        if self._lost_look is not None:
            thread, previous, result = self._lost_look
            if thread.is_alive():
                return
            self._lost_look = None
            self._release_lost(previous, result[0] if result else set())
        now = time.monotonic()
        if not self.in_flight or now < self._lost_check_at:
            return
        self._lost_check_at = now + self._lost_every
        looked_at = {
            i: d.token for i, d in self.in_flight.items() if now - d.at >= self._lost_every
        }
        if looked_at:
            # A row a worker started is not lost, yet its message is in no queue and in no
            # `unacknowledged` entry: the look would ask every worker about it by broadcast.
            # One statement first keeps the look to the rows still waiting under our claim.
            started = self._finished(list(looked_at))
            self._forget(started, started=True)
            for row_id in started:
                del looked_at[row_id]
        if not looked_at:
            return
        found: list[set[uuid.UUID]] = []
        find_lost, every = self.find_lost, self._lost_every
        # The queues their messages went to: a message in none of them, in no worker's
        # hands, is lost too (a row whose queue we were not told is never found so).
        queues = {self.in_flight[i].queue for i in looked_at} - {DEFAULT_QUEUE}

        def look() -> None:
            try:
                found.append(find_lost(list(looked_at), every, queues))
                if found[0]:
                    self.wake.set()  # release them now, not at the next poll
            except Exception as exc:  # the broker is away: the renewals hold the rows
                log.warning(
                    "ironflow %s relay: could not look for lost messages: %s", self.kind, exc
                )

        thread = threading.Thread(target=look, name=f"ironflow-lost-{self.name}", daemon=True)
        self._lost_look = (thread, looked_at, found)
        thread.start()

    def _release_lost(self, looked_at: dict[uuid.UUID, str], lost: set[uuid.UUID]) -> None:
        tokens: dict[str, list[uuid.UUID]] = {}
        for row_id in lost:
            dispatched = self.in_flight.get(row_id)
            if dispatched is not None and dispatched.token == looked_at.get(row_id):
                self._forget([row_id])
                tokens.setdefault(dispatched.token, []).append(row_id)
        if not tokens:
            return
        released = sum(self.store.release(self.row_kind, ids, t) for t, ids in tokens.items())
        self.lost_total += released
        log.warning(
            "ironflow %s relay %s: %d published rows were taken off the queue by a worker that "
            "is gone (unacknowledged in the broker or in no queue, held by no live worker); "
            "released, they are claimed and published again",
            self.kind, self.name, released,
        )  # fmt: skip

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

    @property
    def _share(self) -> float:
        """The rows this relay claims per NOTIFY it sees, smoothed (`_note_share`)."""
        return self._rows_avg / max(self._notifies_avg, 1e-9)

    def _yield_delay(self) -> float:
        """How long to let other relays answer a NOTIFY first: nothing while this relay
        claims about a row per NOTIFY or more (a lone relay always does: every notified
        row is claimed by it), up to `YIELD_MAX` while its claims keep coming back empty
        because another relay took the rows. Its claims then come back with rows again
        when the others fall behind (at their in-flight limits, or gone), and it answers
        at once again."""
        share = self._share
        return 0.0 if share >= 0.5 else YIELD_MAX * (1 - 2 * share)

    def _let_others_answer(self, seconds: float) -> None:
        """Sleep `seconds` (`_yield_delay`), not listening meanwhile when that is long
        enough to be worth it: the relays taking the work answer the NOTIFYs, and every
        listener costs PostgreSQL a wake-up per notifying commit. The claim after it comes
        only once the LISTEN is back, so nothing committed after that claim goes unheard."""
        wake = self.wake if isinstance(self.wake, Wakeup) and seconds >= DEAF_MIN else None
        if wake is not None:
            wake.deafen(self._member, seconds)
        try:
            self.stop.wait(seconds)
        finally:
            if wake is not None:  # (stopping: no claim follows, nothing to wait for)
                wake.hear(self._member, 0.0 if self.stop.is_set() else HEAR_TIMEOUT)

    def _refresh_due(self) -> float:
        """Ask when the next row becomes claimable (one statement); returns the time asked."""
        now = time.monotonic()
        # Only the types a claim could take now: a due row of a queue at its limit waits
        # for room, and waking for it would spin.
        types = self._open_types()
        seconds = (
            self.store.seconds_until_due(self.row_kind, types, max_attempts=self.attempt_limits)
            if types
            else None
        )
        self._due_checked_at = now
        self._recheck_at = None
        self._due = None if seconds is None else now + seconds
        # Due now, yet our claim did not take it: blocked (held by a concurrent claim, or
        # its type at its concurrency limit) -- unless it became due while that claim ran
        # (a timer due a few ms after the relay woke for it): then it is claimable, and
        # taking it for blocked would poll every `BLOCKED_POLL` and fire it that late.
        self._blocked = seconds is not None and -seconds > time.monotonic() - self._claimed_at
        return now

    def _learn_due(self, claimed_some: bool) -> None:
        """After a claim that drained the due rows: make sure the next due time is known.

        The known time is stale once it passed (we just claimed what it announced). An empty
        claim means the wake-up was for rows not due yet (a backoff, a future timer) or
        taken by another relay: look again, at most once per `RECHECK_EVERY` -- with many
        relays every NOTIFY wakes them all, and all but one find nothing."""
        now = time.monotonic()
        passed = self._due is not None and not self._blocked and self._due <= now
        # Rows claimed while the due ones were blocked: the block may have lifted (a limit
        # freed, a concurrent claim's lease ended). Look again, or the relay would keep
        # polling every `BLOCKED_POLL` while claims keep finding rows, however precisely
        # the next one could be waited for.
        passed = passed or (self._blocked and claimed_some)
        # A timer's NOTIFY announces its fire_at: look at once (it may be milliseconds
        # away). An effect's mostly announces a row due now, and an empty claim after it
        # that another relay took it: once a second is enough (a failure's backoff, the
        # other thing it announces, is at least `backoff_base` long by default).
        recheck = RECHECK_EVERY if self.row_kind.due_when_written else 0.0
        if passed or (not claimed_some and now - self._due_checked_at >= recheck):
            try:
                self._refresh_due()
            except StorageError:
                self._recheck_at = now + RECHECK_EVERY
        elif not claimed_some:
            self._recheck_at = self._due_checked_at + recheck

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
            if self.find_lost is not None and self._lost_look is None:  # a look is due
                bound(self._lost_check_at - now, False)
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

    def _open_types(self) -> list[str]:
        """The types whose queue has room for a claim (see `_claimable`)."""
        room = {
            q: self.config.max_in_flight - len(waiting) >= self._min_claim or not waiting
            for q, waiting in self._waiting.items()
        }
        return [t for t in self.workflow_types if room[self.queues[t]]]

    def len_in_flight_at_limit(self) -> bool:
        """Back-pressure holds on a queue whose rows are starting: less room than the
        smallest claim worth making (a queue where nothing started for a second, nobody
        may consume: its room is looked for at the usual pace)."""
        now = time.monotonic()
        return any(
            self.config.max_in_flight - len(waiting) < self._min_claim
            and not self._quiet(queue, now)
            for queue, waiting in self._waiting.items()
        )


def _libpq_url(url: str) -> str:
    """`url` as psycopg.connect takes it (no SQLAlchemy driver suffix)."""
    return make_url(normalize_url(url)).set(drivername="postgresql").render_as_string(False)


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
        routes: Mapping[str, Mapping[str, str]] | None = None,
        queue_depth: QueueDepth | None = None,
        lost_finder: Callable[[], LostFinder] | None = None,
        listen_url: str | None = None,
        tcp_user_timeout: float | None = None,
        owns_store: bool = False,
        group_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """`routes`, per kind (``"effect"``/``"timer"``): the workflow types its relays claim
        and the queue each one's tasks go to (back-pressure per queue); without it every
        relay claims `workflow_types` under one budget."""
        self.stop_event = threading.Event()
        self.store = store
        self.owns_store = owns_store  # disposed when the relays stop
        url = store.engine.url.set(drivername="postgresql")
        self.waker = Waker(
            _libpq_url(listen_url) if listen_url else url.render_as_string(hide_password=False),
            self.stop_event,
            poll_intervals={k.channel: min(k.poll_interval(config), k.pooled_poll) for k in KINDS},
            direct=bool(listen_url),
            connect_params={
                "application_name": "ironflow_celery",
                **dead_connection_params(tcp_user_timeout),
            },
        )
        self.relays: list[Relay] = []
        disabled = {k for k, on in ((EFFECT, effects), (TIMER, timers)) if not on}
        for kind in KINDS:
            if kind in disabled:
                continue
            count = kind.workers(config)
            for i in range(count):
                name = f"{worker_id}-{kind}" if count == 1 else f"{worker_id}-{kind}-{i}"
                queues = routes.get(kind.name, {}) if routes is not None else None
                self.relays.append(
                    Relay(
                        kind.name,
                        store,
                        list(queues) if queues is not None else workflow_types,
                        config,
                        publish,
                        name=name,
                        wake=self.waker.event(kind),
                        stop=self.stop_event,
                        on_claimed=on_claimed,
                        attempt_limits=attempt_limits,
                        concurrency_limits=concurrency_limits,
                        queues=queues,
                        queue_depth=queue_depth,
                        find_lost=lost_finder() if lost_finder is not None else None,
                        group_sizes=group_sizes,
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
        stopped = not any(t.is_alive() for t in self._threads)
        if stopped and self.owns_store:
            self.store.dispose()
        return stopped

    @property
    def in_flight(self) -> int:
        return sum(len(r.in_flight) for r in self.relays)
