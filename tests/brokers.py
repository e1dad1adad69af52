"""The RabbitMQ the broker tests use, and the skip when none answers (the bare-machine CI
step has none; every other step and session does)."""

from __future__ import annotations

import os

import pytest
from kombu import Connection

AMQP_URL = os.environ.get("IRONFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def require_rabbitmq() -> None:
    """Skip the calling test when no RabbitMQ answers at `AMQP_URL`."""
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}")
