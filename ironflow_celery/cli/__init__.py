"""Layer 7, the command line: ``ironflow-celery`` and ``celery ironflow``.

Exit codes: 0 success, 1 operation refused or nothing found, 2 usage error, 3 database
or configuration error.
"""

from ironflow_celery.cli._common import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE
from ironflow_celery.cli.main import celery_command, main

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_UNAVAILABLE", "EXIT_USAGE", "celery_command", "main"]
