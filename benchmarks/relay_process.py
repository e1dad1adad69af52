"""A standalone relay process, what ``ironflow-celery relay`` runs: the package's app
(configured from the environment) runs its effect and timer relays until SIGTERM/SIGINT.

    python -m benchmarks.relay_process
"""

from __future__ import annotations

import logging
import signal
import sys
import threading


def main() -> int:
    import ironflow_celery

    logging.basicConfig(level=logging.WARNING)
    runtime = ironflow_celery.app.ironflow
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return 0 if runtime.run(stop) else 1


if __name__ == "__main__":
    sys.exit(main())
