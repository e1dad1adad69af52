"""The exception tree: every error class lives in ironflow_celery.errors, derives from
IronflowError and is drawn in that module's docstring; the package raises no bare
ValueError/TypeError/LookupError/KeyError (argument errors subclass those builtins)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import ironflow_celery
from ironflow_celery import errors

PACKAGE = Path(ironflow_celery.__file__).parent
BARE = ("ValueError", "TypeError", "LookupError", "KeyError", "TimeoutError")


def error_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    ]


def drawn_tree() -> dict[str, int]:
    """Class name -> depth, from the indented diagram in the errors docstring."""
    doc = errors.__doc__ or ""
    tree: dict[str, int] = {}
    for line in doc.splitlines():
        match = re.match(r"^    ((?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+)(?:\s|$)", line)
        if match and (match.group(1) or match.group(2) == "IronflowError" or "── " in line):
            depth = len(match.group(1)) // 4 + (1 if "── " in line else 0)
            tree[match.group(2)] = depth
    return tree


def test_every_class_is_under_ironflow_error_and_drawn() -> None:
    tree = drawn_tree()
    classes = error_classes()
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, errors.IronflowError), cls
        assert cls.__name__ in tree, f"{cls.__name__} is missing from the docstring tree"
        assert cls.__name__ in errors.__all__
    assert set(tree) == {cls.__name__ for cls in classes}


def test_tree_drawing_matches_the_classes() -> None:
    """Each drawn class sits under the drawn parent: its nearest shallower line above."""
    doc_lines = [
        (name, depth)
        for name, depth in drawn_tree().items()  # insertion order = line order
    ]
    for i, (name, depth) in enumerate(doc_lines):
        if depth == 0:
            assert name == "IronflowError"
            continue
        parent = next(n for n, d in reversed(doc_lines[:i]) if d == depth - 1)
        assert getattr(errors, parent) in getattr(errors, name).__bases__, (name, parent)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.InvalidArgument, ValueError),
        (errors.InvalidText, ValueError),
        (errors.InvalidDeadLetterRequest, ValueError),
        (errors.InvalidOperationRequest, errors.InvalidArgument),
        (errors.InvalidDeadLetterRequest, errors.InvalidOperationRequest),
        (errors.InvalidCancelRequest, errors.InvalidOperationRequest),
        (errors.InvalidInspectionRequest, errors.InvalidOperationRequest),
        (errors.InvalidRetentionRequest, errors.InvalidDeadLetterRequest),
        (errors.UnknownRowKind, ValueError),
        (errors.InvalidArgumentType, TypeError),
        (errors.UnknownName, KeyError),
        (errors.NotInstalled, LookupError),
        (errors.NotInstalled, errors.ConfigurationError),
        (errors.DrainTimedOut, TimeoutError),
    ],
)
def test_argument_errors_are_the_builtins_callers_catch(
    cls: type[BaseException], builtin: type[BaseException]
) -> None:
    assert issubclass(cls, builtin)


def test_a_cancel_or_inspection_refusal_is_no_dead_letter_refusal() -> None:
    """Each operation refuses with its own class; `InvalidOperationRequest` catches any."""
    for cls in (errors.InvalidCancelRequest, errors.InvalidInspectionRequest):
        assert not issubclass(cls, errors.InvalidDeadLetterRequest)


def test_kind_of_and_a_finished_unit_of_work_raise_specific_classes() -> None:
    from ironflow_celery.storage.kinds import kind_of

    with pytest.raises(errors.UnknownRowKind, match="unknown row kind 'job'"):
        kind_of("job")
    assert issubclass(errors.UnitOfWorkFinished, errors.IronflowError)
    assert errors.UnitOfWorkFinished is not errors.IronflowError


def test_old_import_paths_still_work() -> None:
    from ironflow_celery.dead_letters import InvalidDeadLetterRequest
    from ironflow_celery.engine.inputs import InputRefused
    from ironflow_celery.engine.relay import PublishError
    from ironflow_celery.engine.tasks import StartGuardUnavailable
    from ironflow_celery.operations.cancel import InvalidCancelRequest
    from ironflow_celery.operations.projections import ProjectionError
    from ironflow_celery.service.dead_letters import InvalidDeadLetterRequest as Storage
    from ironflow_celery.testing import DrainLimitExceeded

    assert InvalidDeadLetterRequest is Storage is errors.InvalidDeadLetterRequest
    assert InputRefused is errors.InputRefused and PublishError is errors.PublishError
    assert StartGuardUnavailable is errors.StartGuardUnavailable
    assert InvalidCancelRequest is errors.InvalidCancelRequest
    assert ProjectionError is errors.ProjectionError
    assert DrainLimitExceeded is errors.DrainLimitExceeded


def sources() -> list[Path]:
    """The library's modules; `ironflow_celery.examples` is a user's workflow, whose
    handlers raise what any handler would (a `TimeoutError` from a slow service)."""
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(PACKAGE).parts[0] != "examples"
    )


def test_no_bare_builtin_raises_in_the_package() -> None:
    found = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id in BARE:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {target.id}")
    assert found == []


def test_no_exception_class_outside_errors_py() -> None:
    found = []
    for path in sources():
        if path == PACKAGE / "errors.py":
            continue
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                if bases & {"Exception", "BaseException", *BARE, "RuntimeError"} or any(
                    hasattr(errors, b) for b in bases
                ):
                    found.append(f"{module}.{node.name}")
    assert found == []
