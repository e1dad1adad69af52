"""Every ``ironflow_*`` setting in one table, and the one reader of them.

A setting lives on a Celery app's ``conf`` as ``ironflow_<name>`` (Django projects:
``CELERY_IRONFLOW_<NAME>`` through Celery's namespace); the ``IRONFLOW_<NAME>``
environment variable is its default, and the table's default applies when neither is
set. `read_settings` takes a conf in one pass and returns a `Settings` mapping; every
module that reads a setting goes through it, by name. docs/configuration.md's table
is rendered from `SETTINGS` (`markdown_table`; ``tests/test_settings.py`` checks it).

Values are converted as they always were: a boolean string is true when it is one of
``1``, ``true``, ``yes``, ``on`` (any case); ``int``/``float``/``str`` by calling the
type; a list from a comma-separated string (blank items dropped) or any iterable.
A value is converted when first asked for, so a malformed setting fails where it is
used (as before), not wherever another setting of the same conf is read. Unknown
``ironflow_*`` keys are ignored, as they always were.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ironflow_celery.errors import ConfigurationError, UnknownName

__all__ = [
    "SETTINGS",
    "Setting",
    "Settings",
    "markdown_table",
    "read_settings",
]

PREFIX = "ironflow_"
ENV_PREFIX = "IRONFLOW_"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table."""

    name: str
    """Without the prefix: ``max_attempts`` is ``ironflow_max_attempts`` on ``app.conf``."""
    type: type
    """``bool``, ``int``, ``float``, ``str`` or ``list``."""
    default: Any
    """The value when neither conf nor environment sets it (None: unset, or off)."""
    doc: str
    """One line of Markdown; the first of a table row describes the whole row."""
    field: str | None = None
    """The ``RuntimeConfig`` / ``RetryPolicy`` / ``ProjectionConfig`` field it sets."""
    shown: str | None = None
    """The default as the table shows it, when the rendering of `default` is not it."""
    row: str | None = None
    """Settings with the same `row` share one table row (all ``<row>_*``: short names)."""

    @property
    def key(self) -> str:
        """``ironflow_<name>``: the key on ``app.conf``."""
        return PREFIX + self.name

    @property
    def env(self) -> str:
        """``IRONFLOW_<NAME>``: the environment variable that is the default."""
        return ENV_PREFIX + self.name.upper()

    def convert(self, value: Any) -> Any:
        """`value` (from conf or environment) as this setting's type."""
        try:
            if self.type is bool:
                if isinstance(value, str):
                    return value.strip().lower() in _TRUE
                return bool(value)
            if self.type is list:
                if isinstance(value, str):
                    return [item.strip() for item in value.split(",") if item.strip()]
                return list(value)
            return self.type(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"setting {self.key}: cannot read {value!r}") from None

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "—"
        if isinstance(self.default, bool):
            return f"`{self.default}`"
        if isinstance(self.default, float):
            return f"{self.default:g} s"
        return str(self.default)


_OPS = "docs/operations.md"
_SCALING = "docs/scaling.md"
_TABLE: tuple[Setting, ...] = (
    Setting("database_url", str, None, "PostgreSQL (`postgresql://…`)"),
    Setting(
        "pool_size",
        int,
        5,
        "connections each process keeps per engine (`0`: no pool, a connection per use); "
        f"a prefork pool process uses 1, a relay 1 + LISTEN ([scaling]({_SCALING}))",
        row="pool",
    ),
    Setting("pool_max_overflow", int, 10, "connections opened past `size` under load", row="pool"),
    Setting(
        "pool_recycle", float, 1800.0, "a pooled connection older than this is replaced", row="pool"
    ),
    Setting(
        "pool_idle_timeout",
        float,
        60.0,
        "a pooled connection is closed after this long unused",
        row="pool",
    ),
    Setting(
        "prepare_threshold",
        str,
        "auto",
        "psycopg's server-side prepared statements: `auto` (off behind a transaction pooler), "
        f"`off`, or executions before a statement is prepared ([PgBouncer]({_SCALING}#pgbouncer))",
    ),
    Setting(
        "listen_url",
        str,
        None,
        "a direct (not transaction-pooled) URL for the relays' LISTEN connection; behind a "
        "transaction pooler without one the relays poll",
        shown="the database URL",
    ),
    Setting(
        "tcp_user_timeout",
        float,
        10.0,
        "a connection whose packets go unanswered this long is dropped (TCP keepalives and "
        f"`tcp_user_timeout`; [scaling]({_SCALING}#connections-per-host))",
    ),
    Setting(
        "workflows",
        list,
        None,
        "modules (or `module:Class`) holding the workflows, comma separated",
    ),
    Setting("relay_enabled", bool, True, "run the relays inside `celery worker`"),
    Setting(
        "max_attempts",
        int,
        5,
        "attempts before an effect or timer is a dead letter; a workflow may set its own "
        "`retry_policy` / `effect_retry_policies` and a `concurrency_limit` "
        f"([operations]({_OPS}#per-type-retry-policies-and-concurrency-limits))",
        field="RetryPolicy.max_attempts",
    ),
    Setting(
        "backoff_base",
        float,
        1.0,
        "retry backoff `min(base·2^(n−1), max)`, minus up to `jitter`×delay",  # noqa: RUF001
        field="RetryPolicy.base_delay",
        row="backoff",
    ),
    Setting(
        "backoff_max",
        float,
        300.0,
        "the longest retry backoff",
        field="RetryPolicy.max_delay",
        row="backoff",
    ),
    Setting(
        "backoff_jitter",
        float,
        0.0,
        "the fraction (0..1) of a backoff taken off at random",
        field="RetryPolicy.jitter",
        shown="0",
        row="backoff",
    ),
    Setting(
        "effect_lock_duration",
        float,
        300.0,
        "lease of a claimed row; renewed while it waits in the broker and while its handler runs",
        field="RuntimeConfig.effect_lock_duration",
        row="lock_duration",
    ),
    Setting(
        "timer_lock_duration",
        float,
        300.0,
        "lease of a claimed timer",
        field="RuntimeConfig.timer_lock_duration",
        row="lock_duration",
    ),
    Setting(
        "effect_poll_interval",
        float,
        5.0,
        "safety poll of an idle relay (one statement); relays wake on NOTIFY and at the "
        "next due time (a timer's `fire_at`, a backoff's end, a lease that may run out)",
        field="RuntimeConfig.effect_poll_interval",
        row="poll_interval",
    ),
    Setting(
        "timer_poll_interval",
        float,
        5.0,
        "safety poll of the timer relay",
        field="RuntimeConfig.timer_poll_interval",
        row="poll_interval",
    ),
    Setting(
        "effect_workers",
        int,
        1,
        "relay threads per process (handler concurrency is `celery worker -c`)",
        field="RuntimeConfig.effect_workers",
        row="workers",
    ),
    Setting(
        "timer_workers",
        int,
        1,
        "timer relay threads per process",
        field="RuntimeConfig.timer_workers",
        row="workers",
    ),
    Setting(
        "claim_batch_size",
        int,
        200,
        "rows per claim statement (ironflow: 1)",
        field="RuntimeConfig.claim_batch_size",
    ),
    Setting(
        "effect_batch_size",
        int,
        200,
        "at most this many effects of one type claimed together travel in one message and "
        "are acknowledged together; a lone row travels alone; 1: one message per effect; a "
        "workflow's `effect_batch_size` overrides it (a type with a `concurrency_limit`: 1) "
        "([groups](docs/operations.md#groups-of-effects-effect_batch_size-on-by-default))",
        field="RuntimeConfig.effect_batch_size",
    ),
    Setting(
        "group_run_budget",
        float,
        0.1,
        "seconds of handler time a worker process takes on from one group message; the "
        "rest goes back to the broker in messages of that size, so slow handlers spread "
        "over processes (by the handler time measured per type; 0: run groups whole)",
        field="RuntimeConfig.group_run_budget",
    ),
    Setting(
        "max_in_flight",
        int,
        1000,
        "back-pressure: a relay stops claiming for a queue while this many of its published "
        "rows there have not started",
        field="RuntimeConfig.max_in_flight",
    ),
    Setting(
        "relay_types",
        list,
        None,
        "workflow types this process's relays claim (`*`: all); by default a worker's "
        "relays claim the types whose queues it consumes (`-Q`) "
        "([worker groups](docs/scaling.md#worker-groups-and-queues))",
        field="RuntimeConfig.relay_types",
        shown="from `-Q`",
    ),
    Setting(
        "dispatch_timeout",
        float,
        1800.0,
        "how long a relay keeps a published, unstarted row leased; after that it is "
        f"published again ([leases]({_OPS}#leases-overload-and-crashes))",
        field="RuntimeConfig.dispatch_timeout",
    ),
    Setting(
        "release_lost_deliveries",
        bool,
        True,
        "Redis: a relay releases published rows whose message a worker that is gone had "
        "taken (unacknowledged, held by no live worker); off if some workers run without "
        "remote control ([scaling](docs/scaling.md#lost-deliveries-on-redis))",
        field="RuntimeConfig.release_lost_deliveries",
    ),
    Setting(
        "relaxed_acknowledgements",
        bool,
        False,
        "opt-in: acknowledgements commit without waiting for the WAL flush (a crash may "
        "lose one others acted on)",
        field="RuntimeConfig.relaxed_acknowledgements",
    ),
    Setting(
        "shutdown_timeout",
        float,
        30.0,
        "how long stopping the relays may take (then the relay process is killed)",
        field="RuntimeConfig.shutdown_timeout",
    ),
    Setting(
        "worker_id",
        str,
        None,
        "prefix of lease tokens (`{worker_id}-effect#n`)",
        field="RuntimeConfig.worker_id",
        shown="random UUID",
    ),
    Setting(
        "record_input_observations",
        bool,
        False,
        "write `input_observations` rows",
        field="WorkflowServiceConfig.record_input_observations",
    ),
    Setting(
        "queue_per_workflow_type",
        bool,
        False,
        "routing of ironflow tasks",
        shown="off",
        row="routing",
    ),
    Setting(
        "task_queue",
        str,
        None,
        "one queue for every ironflow task",
        shown="off",
        row="routing",
    ),
    Setting(
        "tracing",
        bool,
        True,
        "with the `otel` extra (`opentelemetry-api`): one trace from an input through its "
        "effect task to the follow-up, joining `opentelemetry-instrumentation-celery`'s "
        "spans; `False` stops the relay forwarding stored contexts and the task spans "
        f"([tracing]({_OPS}#tracing-opentelemetry))",
        field="RuntimeConfig.tracing",
    ),
    Setting(
        "sentry_failed_attempts",
        bool,
        True,
        "with sentry-sdk initialised, also send each failed attempt (not only dead letters) "
        "to Sentry, as a warning "
        f"([operations]({_OPS}#failures-in-logs-sentry-and-your-own-alerting))",
    ),
    Setting(
        "metrics_port",
        int,
        None,
        f"Prometheus endpoint of each relay process ([operations]({_OPS}#metrics))",
        shown="off",
    ),
    Setting(
        "web_actions",
        bool,
        False,
        "the web view (`ironflow-celery web`): `actions` lets it retry and discard dead "
        "letters, only with `user` and `password_hash` (HTTP Basic sign-in, hash from "
        "`ironflow-celery web --hash-password`) ([web view](docs/web.md))",
        row="web",
    ),
    Setting(
        "web_user",
        str,
        None,
        "user name of the web view's HTTP Basic authentication (set: every page needs it)",
        row="web",
    ),
    Setting(
        "web_password_hash",
        str,
        None,
        "that user's password as `ironflow-celery web --hash-password` prints it",
        row="web",
    ),
    Setting(
        "retention_interval",
        float,
        3600.0,
        "periodic purge of processed rows by every relay process, on by default (0: off; "
        f"[operations]({_OPS}#retention), "
        "[scaling](docs/scaling.md#big-tables-vacuum-bloat-retention))",
        row="retention",
    ),
    Setting(
        "retention_age",
        str,
        "7d",
        "how old a processed row must be to be purged",
        row="retention",
    ),
    Setting("retention_batch_size", int, 1000, "rows per purge transaction", row="retention"),
    Setting(
        "retention_include_observations",
        bool,
        False,
        "also purge `input_observations` of long-completed instances",
        row="retention",
    ),
    Setting(
        "projections",
        list,
        None,
        "projections to run inside `celery worker` (`module:attr`, comma separated)",
    ),
    Setting(
        "projection_poll_interval",
        float,
        0.2,
        "projection runners ([projections](docs/projections.md))",
        field="ProjectionConfig.poll_interval",
        row="projection",
    ),
    Setting(
        "projection_batch_size",
        int,
        100,
        "events per projection batch",
        field="ProjectionConfig.batch_size",
        row="projection",
    ),
    Setting(
        "projection_error_backoff_base",
        float,
        0.2,
        "first pause after a failing projection batch",
        field="ProjectionConfig.error_backoff_base",
        row="projection",
    ),
    Setting(
        "projection_error_backoff_max",
        float,
        5.0,
        "longest pause after failing projection batches",
        field="ProjectionConfig.error_backoff_max",
        row="projection",
    ),
)

SETTINGS: Mapping[str, Setting] = {s.name: s for s in _TABLE}
"""Every setting by name (without the prefix), in the table's order (docs/configuration.md)."""


class Settings(Mapping[str, Any]):
    """The ``ironflow_*`` settings of one conf: ``settings["max_attempts"]`` is the
    converted value, or the table's default when neither conf nor environment sets it."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = dict(raw)  # name -> unconverted value, for the settings that are set
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        entry = _entry(name)
        if name not in self._raw:
            return entry.default
        if name not in self._values:
            self._values[name] = entry.convert(self._raw[name])
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(SETTINGS)

    def __len__(self) -> int:
        return len(SETTINGS)

    def is_set(self, name: str) -> bool:
        """Whether conf or environment sets `name` (else the default applies)."""
        _entry(name)
        return name in self._raw

    def fields(self, owner: str) -> dict[str, Any]:
        """``{field: value}`` of the settings that are set and map onto `owner`'s fields
        (``"RuntimeConfig"``, ``"RetryPolicy"``, ``"ProjectionConfig"``, ...)."""
        found: dict[str, Any] = {}
        for entry in _TABLE:
            if entry.field and entry.name in self._raw:
                cls, _, attr = entry.field.partition(".")
                if cls == owner:
                    found[attr] = self[entry.name]
        return found


def _entry(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise UnknownName(name) from None


def read_settings(
    conf: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> Settings:
    """The ``ironflow_*`` settings of `conf`, each else ``IRONFLOW_<NAME>`` from `environ`
    (the process environment by default; an empty variable counts as unset)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for entry in _TABLE:
        value = conf.get(entry.key) if conf is not None else None
        if value is None:
            value = environ.get(entry.env) or None
        if value is not None:
            raw[entry.name] = value
    return Settings(raw)


# -- docs/configuration.md's table -------------------------------------------------------


def markdown_table() -> str:
    """docs/configuration.md's table, rendered from `SETTINGS`.

    A setting's doc links other pages from the repository root (``docs/operations.md#…``);
    the table lives in docs/, so those links are rendered relative to it.
    """
    lines = [
        "| setting | default | meaning (and how it maps onto Celery) |",
        "|---|---|---|",
    ]
    rows: list[list[Setting]] = []
    for entry in _TABLE:
        if rows and entry.row is not None and rows[-1][0].row == entry.row:
            rows[-1].append(entry)
        else:
            rows.append([entry])
    for row in rows:
        first = row[0]
        short = first.row is not None and all(s.name.startswith(f"{first.row}_") for s in row)
        names = [f"`{first.key}`"] + [
            f"`{s.name[len(first.row or '') :]}`" if short else f"`{s.key}`" for s in row[1:]
        ]
        defaults = [s.shown_default() for s in row]
        shown = defaults[0] if len(set(defaults)) == 1 else " / ".join(defaults)
        doc = first.doc.replace("](docs/", "](")
        lines.append(f"| {' / '.join(names)} | {shown} | {doc} |")
    return "\n".join(lines) + "\n"
