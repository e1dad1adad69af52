"""The order saga for worker hosts in network namespaces (tests/test_hosts_netns.py).

``celery -A tests.e2e_apps.hosts_app worker``: `ironflow_celery.examples.orders.OrderSaga` with its
handler wrapped by a recorder. Each time a handler's side effect succeeds, the worker host
(``HOSTS_NODE``) appends a line ``<unix time> <node> <pid> <effect type> <attempt>
<idempotency key>`` to ``$HOSTS_RECORDER_DIR/deliveries.log`` — on the shared file system,
so no network cut reaches it. The test reads the file as the idempotent sink a payment
provider would be: applied once per key, every further delivery of a key a duplicate to
explain.

While the file ``$HOSTS_RECORDER_DIR/hold-<node>`` exists, a handler on that host waits
after recording (its side effect done, its answer not yet acknowledged), so a test can cut
the host off mid-handler. The saga's payment timeout is an hour here (see below).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from celery import Celery

from ironflow_celery import EffectContext, Message, install
from ironflow_celery.celery_app import settings_from_env
from ironflow_celery.examples import orders
from ironflow_celery.examples.orders import OrderSaga

#: Longest a held handler waits, should a test die before it lets go.
HOLD_LIMIT = 600.0

# The saga cancels an order whose payment takes 2 minutes; here an outage of the hosts
# may take longer than that (today, issue 20 §4) and the test is about delivery, so the
# payment timeout is out of its way. Read when a worker decides (`decide` looks it up).
orders.PAYMENT_TIMEOUT = timedelta(hours=1)


def recorder_dir() -> Path:
    return Path(os.environ["HOSTS_RECORDER_DIR"])


def record(effect: Message, ctx: EffectContext) -> None:
    """One line per delivery, written with a single O_APPEND write (whole lines)."""
    line = (
        f"{time.time():.3f} {os.environ['HOSTS_NODE']} {os.getpid()} "
        f"{type(effect).__name__} {ctx.attempt} {ctx.idempotency_key}\n"
    )
    fd = os.open(recorder_dir() / "deliveries.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def handle_effect(effect: Message, ctx: EffectContext) -> Message | None:
    """The saga's handler; its success recorded by idempotency key, then held if asked."""
    answer = OrderSaga.handle_effect(effect, ctx)  # raises on a failing attempt: no record
    record(effect, ctx)
    hold = recorder_dir() / f"hold-{os.environ['HOSTS_NODE']}"
    deadline = time.monotonic() + HOLD_LIMIT
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer


app = Celery("e2e_hosts")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
)
app.conf.update(settings_from_env())
runtime = install(app, workflows=[(OrderSaga, handle_effect)])
