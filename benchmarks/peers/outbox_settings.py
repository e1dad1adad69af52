"""Django settings for row 10's django-celery-outbox peer (``DJANGO_SETTINGS_MODULE``).

The database is the peer's own fresh one, from ``IRONFLOW_BENCH_PEER_DSN``; the only app is
``django_celery_outbox``, whose relay publishes through `benchmarks.peers.outbox_peer.app`.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import unquote, urlparse

import structlog

_dsn = urlparse(os.environ.get("IRONFLOW_BENCH_PEER_DSN", "postgresql://postgres@127.0.0.1/x"))

SECRET_KEY = "ironflow-bench-not-secret"
USE_TZ = True
INSTALLED_APPS = ["django_celery_outbox"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _dsn.path.lstrip("/"),
        "USER": unquote(_dsn.username or ""),
        "PASSWORD": unquote(_dsn.password or ""),
        "HOST": _dsn.hostname or "",
        "PORT": str(_dsn.port or ""),
        "CONN_MAX_AGE": None,  # one connection per process, kept: as a production setup would
    }
}
CELERY_OUTBOX_APP = "benchmarks.peers.outbox_peer.app"
# No statsd daemon here: metrics off rather than a UDP send (and a refused-packet warning)
# per message.
MONITORING_METRICS_ENABLED = False
# The relay logs through structlog at debug level by default, a line per iteration; a
# production relay runs at WARNING, as the benchmark's celery workers do.
_structlog_level = logging.WARNING
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_structlog_level))
