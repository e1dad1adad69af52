"""The package's surface is delimited: every module says what it offers (`__all__`), and
no module of the package takes from another a name that module does not offer."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import ironflow_celery

PACKAGE = Path(ironflow_celery.__file__).parent


def _modules() -> list[str]:
    found = ["ironflow_celery"]
    for info in pkgutil.walk_packages(ironflow_celery.__path__, "ironflow_celery."):
        found.append(info.name)
    return sorted(found)


def test_every_module_declares_what_it_offers():
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        offered = getattr(module, "__all__", None)
        if offered is None:
            missing.append(name)
            continue
        for attr in offered:
            assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which it lacks"
    assert missing == []


def test_modules_import_only_what_others_offer():
    modules = set(_modules())
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in modules:
                continue
            source = importlib.import_module(node.module)
            offered = set(getattr(source, "__all__", ()))
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    continue  # a submodule
                if alias.name not in offered:
                    wrong.append(f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}")
    assert wrong == []


def test_the_top_level_api_is_importable_by_name():
    for name in ironflow_celery.__all__:
        assert getattr(ironflow_celery, name) is not None
