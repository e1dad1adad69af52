"""What PostgreSQL can store as text and jsonb: no NUL character and no lone surrogate.

PostgreSQL refuses NUL in ``text`` and ``\\u0000`` in ``jsonb``; psycopg sends text as
UTF-8, which a lone surrogate cannot be encoded in (Python decodes a non-UTF-8
command-line argument into one, e.g. ``$'\\xff'`` becomes ``'\\udcff'``). Left to the
driver, such input fails as a bare ``UnicodeEncodeError`` or a ``StorageError`` deep in a
transaction. Checked before anything is written, it is a clear error naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from ironflow_celery.errors import InvalidText

__all__ = [
    "check_text",
    "json_problem",
    "storable_text",
    "text_problem",
]

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why PostgreSQL cannot store `value` as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character (\\x00), which PostgreSQL cannot store"
    if not value.isascii():  # the fast path: ASCII has no surrogates
        found = _SURROGATE.search(value)
        if found is not None:
            return (
                f"contains a lone surrogate {found.group()!r} (not valid UTF-8, e.g. an "
                "undecodable byte), which PostgreSQL cannot store"
            )
    return None


def storable_text(value: str) -> str:
    """`value` with NUL and lone surrogates written as escapes (``\\x00``, ``\\udcff``): for
    text we record rather than refuse, such as an exception's message in ``last_error``."""
    if text_problem(value) is None:
        return value
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def json_problem(value: Any, path: str = "") -> tuple[str, str] | None:
    """(field path, problem) of the first string or key in a JSON value that cannot be
    stored, or None. Paths read like ``items[2].name``; ``""`` is the value itself."""
    if isinstance(value, str):
        problem = text_problem(value)
        return None if problem is None else (path, problem)
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                problem = text_problem(key)
                if problem is not None:
                    return f"{path}.{key!r}" if path else repr(key), f"key {problem}"
            found = json_problem(item, where)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = json_problem(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def check_text(value: str | None, what: str) -> str | None:
    """`value` unchanged, or `InvalidText` naming `what` when PostgreSQL cannot store it."""
    if value is not None and isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise InvalidText(what, value, problem)
    return value
