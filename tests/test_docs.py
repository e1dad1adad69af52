"""The documentation's code runs as written: README snippets and docs/projections.md.

A newcomer pastes these first; each test extracts the block from the Markdown file itself
(so an edit to the docs is tested, not a copy) and runs it in a subprocess against this
test's database, then checks the output the docs promise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text()
README_URL = "postgresql://postgres@127.0.0.1:5432/ironflow_demo"


def _block(text: str, heading: str, lang: str) -> str:
    """The first fenced ``lang`` block after ``heading``."""
    section = text.split(heading, 1)[1]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block after {heading!r}"
    return match.group(1)


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `args` in `cwd` with our environment minus workflow/projection settings, plus `env`."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IRONFLOW_WORKFLOWS", "IRONFLOW_PROJECTIONS")
    }
    return subprocess.run(
        args,
        cwd=cwd,
        env={**base, "CELERY_BROKER_URL": "memory://", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_readme_workflow_in_a_dozen_lines_prints_what_its_comments_say(database_url, tmp_path):
    code = _block(README, "**2. One workflow.**", "python")
    assert README_URL in code
    (tmp_path / "account.py").write_text(code.replace(README_URL, database_url))
    result = _run([sys.executable, "account.py"], tmp_path, IRONFLOW_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    promised = re.findall(r"\)[ \t]+# (.+)$", code, re.M)  # the comments after each print(...)
    assert result.stdout.splitlines() == [c.strip() for c in promised]


def test_projection_example_runs_and_the_cli_sees_its_position(database_url, tmp_path):
    docs = (REPO / "docs" / "projections.md").read_text()
    (tmp_path / "projection_example.py").write_text(_block(docs, "## Example", "python"))
    result = _run(
        [sys.executable, "projection_example.py"], tmp_path, IRONFLOW_DATABASE_URL=database_url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["delivered 4", "[('a', 3), ('b', 1)]"]

    session = _block(docs, "## Example", "console")
    assert "delivered 4\n[('a', 3), ('b', 1)]" in session  # the docs show this very output
    env_args = dict(
        re.findall(r"^\$ export (IRONFLOW_PROJECTIONS|IRONFLOW_WORKFLOWS)=(\S+)", session, re.M)
    )
    assert set(env_args) == {"IRONFLOW_PROJECTIONS", "IRONFLOW_WORKFLOWS"}
    env = {**env_args, "IRONFLOW_DATABASE_URL": database_url, "PYTHONPATH": str(tmp_path)}
    listed = _run([str(BIN / "ironflow-celery"), "projections", "list"], tmp_path, **env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("counter_totals"))
    assert row.split() == ["counter_totals", "4", "0", "ok"]
    reset = _run(
        [str(BIN / "ironflow-celery"), "projections", "reset", "counter_totals"], tmp_path, **env
    )
    assert reset.returncode == 0, reset.stderr


def test_the_state_machine_diagram_is_what_the_graph_command_prints(tmp_path):
    """Run outside the checkout: the saga the docs name ships with the package (issue 24 §4)."""
    page = (REPO / "docs" / "state-machines.md").read_text()
    diagram = _block(page, "# State machines", "mermaid")
    result = _run(
        [str(BIN / "ironflow-celery"), "workflows", "graph", "orders", "--format", "mermaid"],
        tmp_path,
        IRONFLOW_WORKFLOWS="ironflow_celery.examples.orders",
        PYTHONPATH="",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == diagram.strip()


def test_the_docs_import_no_module_of_the_checkout():
    """A user who ran `pip install ironflow-celery` has no `examples/`: the docs name the
    saga that ships with the package, `ironflow_celery.examples.orders` (issue 24 §4)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    wrong = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()}"
        for page in pages
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if re.search(r"(?<![\w.])examples\.orders\b|examples/orders/workflow\.py", line)
    ]
    assert wrong == []


LAYERS = ("storage", "service", "engine", "integration", "operations", "model")


def test_the_docs_cite_only_public_modules():
    """Users import from the public modules (`ironflow_celery`, `.dead_letters`,
    `.inspection`, `.testing`, …), never from a layer module, which may move (issue 22 §7).
    docs/architecture.md, the contributors' map of the layers, is the one exception."""
    layer = re.compile(rf"\bironflow_celery\.(?:{'|'.join(LAYERS)})\b")
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    wrong = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()}"
        for page in pages
        if page.name != "architecture.md"
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if layer.search(line)
    ]
    assert wrong == []
    # and each name the docs call through `ironflow_celery.<name>` exists there
    import ironflow_celery

    cited = {
        name
        for page in pages
        for name in re.findall(r"`ironflow_celery\.([a-z_]+)\(", page.read_text())
    }
    assert cited <= set(ironflow_celery.__all__), cited - set(ironflow_celery.__all__)


# -- issue 24 §4: the README is a short tour, the rest lives in docs/ ----------------------


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks skipped)."""
    anchors, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_relative_link_of_the_readme_and_docs_resolves():
    """Moving sections out of the README must not leave a link pointing nowhere."""
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_a_short_tour_for_a_celery_user():
    """Three sentences, the quick start, the seven steps into a Celery app, then links."""
    headings = re.findall(r"^(#{1,3} .+)$", re.sub(r"```.*?```", "", README, flags=re.S), re.M)
    assert headings == [
        "# ironflow_celery",
        "## Quick start",
        "### With Docker",
        "## Add it to your Celery app",
        "## Documentation",
    ]
    steps = re.findall(r"^\*\*(\d)\. ([^*]+)\*\*", README, re.M)
    assert [title.rstrip(".") for _, title in steps] == [
        "Install",
        "One workflow",
        "One call",
        "Start the worker",
        "Submit",
        "Watch it in Flower",
        "Retry a dead letter",
    ]
    before_quick_start = README.split("## Quick start", 1)[0]
    assert len(before_quick_start.split()) < 120, len(before_quick_start.split())
    assert len(README.split()) < 1500, len(README.split())
