"""Golden-file assertions: compare text with a file under tests/golden/.

Run with ``UPDATE_GOLDEN=1`` to (re)write the files instead of comparing, then review
the diff like any other change.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "UPDATE_GOLDEN"


def golden_path(name: str) -> Path:
    """The file that holds golden output `name` (a path relative to tests/golden/)."""
    path = (GOLDEN_DIR / name).resolve()
    if not path.is_relative_to(GOLDEN_DIR.resolve()):
        raise ValueError(f"golden file name {name!r} leaves {GOLDEN_DIR}")
    return path


def assert_golden(name: str, text: str) -> None:
    """Fail unless `text` equals tests/golden/`name`; rewrite the file when UPDATE_GOLDEN=1."""
    path = golden_path(name)
    if os.environ.get(UPDATE_ENV) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            with path.open("w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
        return
    if not path.exists():
        pytest.fail(
            f"golden file {path} does not exist; run with {UPDATE_ENV}=1 to create it",
            pytrace=False,
        )
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"golden/{name}",
                tofile="actual",
            )
        )
        pytest.fail(
            f"output differs from golden file {path} "
            f"(run with {UPDATE_ENV}=1 to accept it):\n{diff}",
            pytrace=False,
        )
