"""What every command shares: the lazily loaded app and runtime (`Context`), exit codes,
and `guarded`, which turns library errors into one line on stderr and an exit code."""

from __future__ import annotations

import sys
from typing import Any

import click

from ironflow_celery.celery_app import default_app
from ironflow_celery.engine.runtime import WorkflowRuntime, runtime_of
from ironflow_celery.errors import ConfigurationError, InvalidText, IronflowError, StorageError

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "LOGLEVEL",
    "Context",
    "fail",
    "guarded",
]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

# A level logging does not know was a ValueError traceback; as a choice it is a usage error.
LOGLEVEL = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)


class Context:
    """What every command needs: the Celery app and its runtime, loaded lazily."""

    def __init__(self, app: Any = None, app_path: str | None = None) -> None:
        self._app = app
        self.app_path = app_path

    @property
    def app(self) -> Any:
        if self._app is None:
            if self.app_path:
                from celery.app.utils import find_app

                try:
                    self._app = find_app(self.app_path)
                except (ImportError, AttributeError) as exc:
                    raise ConfigurationError(
                        f"cannot load the Celery app {self.app_path!r}: {exc}"
                    ) from None
            else:
                self._app = default_app()
        return self._app

    @property
    def runtime(self) -> WorkflowRuntime:
        try:
            runtime = runtime_of(self.app)
        except LookupError as exc:
            raise ConfigurationError(str(exc)) from None
        runtime.load_workflows()
        return runtime


def fail(message: str, code: int = EXIT_REFUSED) -> None:
    """Print `message` to stderr and exit with `code`."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def guarded(fn: Any) -> Any:
    """Turn library errors into clear messages and exit codes."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InvalidText as exc:  # an id, type, filter or name PostgreSQL cannot store
            fail(str(exc), EXIT_USAGE)
        except (StorageError, ConfigurationError) as exc:
            fail(str(exc), EXIT_UNAVAILABLE)
        except IronflowError as exc:
            fail(str(exc), EXIT_REFUSED)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
