"""The commands printed with errors name the app the process runs, as its user typed it."""

from __future__ import annotations

import pytest

from ironflow_celery.integration.hints import celery_app_argument, upgrade_command


@pytest.mark.parametrize(
    ("argv", "app"),
    [
        (["celery", "-A", "myproject", "worker"], "myproject"),
        (["celery", "--app", "myproject.celery:app", "worker"], "myproject.celery:app"),
        (["celery", "--app=myproject", "worker"], "myproject"),
        (["celery", "-Amyproject", "worker"], "myproject"),
        (["/venv/lib/celery/__main__.py", "worker"], None),
    ],
)
def test_the_app_argument_is_found_in_any_spelling(argv: list[str], app: str | None) -> None:
    """`-A x`, `--app x`, `--app=x`, `-Ax`; none when the process was not given one."""
    assert celery_app_argument(argv) == app


def test_a_custom_app_gets_its_own_minus_a() -> None:
    """A project's app reads its own configuration: the command needs only `-A`."""
    command = upgrade_command(["celery", "-A", "myproject", "worker"], {})
    assert command == "ironflow-celery -A myproject db upgrade"


def test_the_package_app_carries_its_database_url_unless_it_holds_a_password() -> None:
    """`-A ironflow_celery` reads IRONFLOW_DATABASE_URL: include it, but never a password."""
    url = "postgresql://postgres@db:5432/ironflow"
    argv = ["celery", "-A", "ironflow_celery", "worker"]
    assert upgrade_command(argv, {"IRONFLOW_DATABASE_URL": url}) == (
        f"IRONFLOW_DATABASE_URL={url} ironflow-celery -A ironflow_celery db upgrade"
    )
    secret = upgrade_command(argv, {"IRONFLOW_DATABASE_URL": "postgresql://u:s3cret@db/x"})
    assert "s3cret" not in secret
    assert secret.startswith("ironflow-celery -A ironflow_celery db upgrade")


def test_without_an_app_or_a_url_the_hint_asks_for_the_app() -> None:
    """An app configured in code (no -A, no variable): the user names it; nothing is guessed."""
    assert upgrade_command(["gunicorn", "web:app"], {}) == (
        "ironflow-celery -A <your Celery app> db upgrade"
    )
    assert upgrade_command(["celery", "-A", "ironflow_celery", "worker"], {}) == (
        "ironflow-celery -A ironflow_celery db upgrade "
        "(with IRONFLOW_DATABASE_URL set to the database)"
    )
