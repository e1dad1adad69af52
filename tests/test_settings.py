"""The settings table (ironflow_celery.model.settings): one row per ``ironflow_*`` setting,
the one reader every module uses, and docs/configuration.md's table rendered from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import ironflow_celery
from ironflow_celery.errors import ConfigurationError, UnknownName
from ironflow_celery.model.config import RetryPolicy, RuntimeConfig, runtime_config_from
from ironflow_celery.model.settings import SETTINGS, markdown_table, read_settings
from ironflow_celery.operations.projections import ProjectionConfig, projection_config_from
from ironflow_celery.operations.retention import DEFAULT_AGE, retention_settings
from ironflow_celery.service.dead_letters import parse_age
from ironflow_celery.service.workflow_service import WorkflowServiceConfig

PACKAGE = Path(ironflow_celery.__file__).parent
README = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
START = "<!-- settings table: rendered from ironflow_celery/model/settings.py"
END = "<!-- end of settings table -->"
ENV_NAMES = {entry.env for entry in SETTINGS.values()}
NOT_SETTINGS = {
    "IRONFLOW_CELERY_APP",  # the CLI's default -A (an app to load, not a setting of one)
    "IRONFLOW_TEST_DATABASE_URL",  # the testing kit's PostgreSQL server
}
OWNERS = {
    "RuntimeConfig": RuntimeConfig,
    "RetryPolicy": RetryPolicy,
    "ProjectionConfig": ProjectionConfig,
    "WorkflowServiceConfig": WorkflowServiceConfig,
}


def readme_table() -> str:
    text = README.read_text()
    start = text.index(START)
    start = text.index("\n", start) + 1
    return text[start : text.index(END)].strip("\n") + "\n"


def test_readme_table_is_the_rendering_of_the_settings_table() -> None:
    expected = markdown_table()
    assert readme_table() == expected, (
        "docs/configuration.md's table differs from ironflow_celery.model.settings; "
        f"paste this between its markers:\n{expected}"
    )


def test_every_setting_is_named_in_the_readme_table() -> None:
    """A row names its first setting in full, the others of its row by their suffix."""
    table = readme_table()
    first_of_row: dict[str, str] = {}
    for entry in SETTINGS.values():
        first = first_of_row.setdefault(entry.row or entry.name, entry.name)
        short = entry.row is not None and first != entry.name and first.startswith(entry.row)
        shown = f"`{entry.name[len(entry.row or '') :]}`" if short else f"`{entry.key}`"
        assert shown in table, entry.name


def test_every_setting_the_code_reads_is_in_the_table() -> None:
    """Settings are read by name through `read_settings(...)[name]`, `.is_set(name)` or
    `.fields(owner)`; no module reads an ``ironflow_*`` key itself, and an ``IRONFLOW_*``
    variable read directly is a setting's (the database URL, for hints and the testing
    kit) or one of the two variables that are not app settings."""
    read: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        read.update(re.findall(r"settings(?:\([^()]*\))?\[\"(\w+)\"\]", source))
        read.update(re.findall(r"\.is_set\(\"(\w+)\"\)", source))
        if path.name == "settings.py":
            continue
        assert not re.search(r"conf(?:\.get\(|\[)\s*f?[\"']ironflow_", source), path
        for name in re.findall(r"env(?:iron)?(?:\.get\(|\[)\s*[\"'](IRONFLOW_\w+)", source):
            assert name in ENV_NAMES | NOT_SETTINGS, (path, name)
    assert read, "the scan found no reads: the pattern is stale"
    assert read <= set(SETTINGS), read - set(SETTINGS)
    with pytest.raises(UnknownName):
        read_settings({})["no_such_setting"]


def test_field_defaults_are_the_dataclass_defaults() -> None:
    for entry in SETTINGS.values():
        if entry.field is None:
            continue
        owner, _, attr = entry.field.partition(".")
        fields = {f.name: f for f in dataclasses.fields(OWNERS[owner])}
        assert attr in fields, entry.field
        assert getattr(OWNERS[owner](), attr) == entry.default, entry.name
        assert isinstance(entry.default, (entry.type, type(None))), entry.name
    assert parse_age(SETTINGS["retention_age"].default) == DEFAULT_AGE


def test_conf_then_environment_then_default() -> None:
    env = {"IRONFLOW_MAX_ATTEMPTS": "9", "IRONFLOW_TRACING": "", "IRONFLOW_TASK_QUEUE": "q"}
    settings = read_settings({"ironflow_max_attempts": 3, "ironflow_task_queue": None}, env)
    assert settings["max_attempts"] == 3  # conf wins
    assert settings["task_queue"] == "q"  # None on conf: the environment
    assert settings["tracing"] is True and not settings.is_set("tracing")  # empty: unset
    assert read_settings(None, env)["max_attempts"] == 9
    assert read_settings({}, {})["max_attempts"] == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("no", False)],
)
def test_bool_strings(value: str, expected: bool) -> None:
    assert read_settings({"ironflow_relay_enabled": value}, {})["relay_enabled"] is expected


def test_lists_from_commas_or_iterables() -> None:
    conf = {"ironflow_workflows": " a.b , ,c:D ", "ironflow_projections": ("x:y",)}
    settings = read_settings(conf, {})
    assert settings["workflows"] == ["a.b", "c:D"]
    assert settings["projections"] == ["x:y"]
    assert read_settings({}, {"IRONFLOW_PROJECTIONS": "m:p,n:q"})["projections"] == [
        "m:p",
        "n:q",
    ]


def test_a_bad_value_fails_where_it_is_read() -> None:
    settings = read_settings({"ironflow_metrics_port": "eighty", "ironflow_tracing": "no"}, {})
    assert settings["tracing"] is False  # the bad port does not stop other settings
    with pytest.raises(ConfigurationError, match="setting ironflow_metrics_port: cannot read"):
        settings["metrics_port"]


def test_readers_map_onto_their_dataclasses(monkeypatch: pytest.MonkeyPatch) -> None:
    for entry in SETTINGS.values():
        monkeypatch.delenv(entry.env, raising=False)
    conf = {
        "ironflow_backoff_max": "60",
        "ironflow_claim_batch_size": "7",
        "ironflow_projection_batch_size": "3",
        "ironflow_retention_interval": "0",
    }
    config = runtime_config_from(conf)
    assert config.retry_policy == RetryPolicy(max_delay=60.0)
    assert config.claim_batch_size == 7 and config.effect_workers == 1
    assert projection_config_from(conf) == ProjectionConfig(batch_size=3)
    assert retention_settings(conf)["interval"] is None  # 0: off
    assert runtime_config_from({}) == RuntimeConfig()
