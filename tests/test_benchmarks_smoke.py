"""`python -m benchmarks --smoke --rows 1,…,9` runs rows 1 to 9 at tiny sizes and reports them.

Row 10 (the peers) is left out: it needs the optional `bench` extra, which the test suite
does not install (`python3 dev.py bench` does).

No timing assertions: the machine is shared, only the shape of the output is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Minutes of test time: a step of its own in CI (`-m scale`), out of the README command.
pytestmark = [pytest.mark.e2e, pytest.mark.scale]
ROWS = ",".join(str(r) for r in range(1, 10))

FIELDS = {
    1: {"value", "unit"},
    2: {"value", "unit", "baseline", "ratio"},
    3: {"value", "unit", "baseline", "ratio"},
    4: {"value", "unit", "p50_ms", "p99_ms", "burners", "quiet", "plain"},
    5: {"value", "unit", "p50_ms", "p99_ms"},
    6: {"value", "unit", "baseline", "ratio"},
    7: {"value", "unit", "baseline"},
    8: {"value", "unit"},
    9: {"value", "unit", "baseline", "ratio", "stale_pct"},
}


@pytest.mark.timeout(320)
def test_benchmarks_smoke_run_reports_every_row(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    scratch = tmp_path / "tmp"  # the run's temp dir, to see what it leaves there
    scratch.mkdir()
    env = dict(os.environ, PYTHONPATH=path, TMPDIR=str(scratch))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--rows", ROWS, "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ironflow_celery benchmarks (smoke)" in proc.stdout
    assert [p.name for p in scratch.iterdir() if p.name.startswith("ironflow-")] == []
    result = json.loads(output.read_text())
    assert set(result["machine"]) >= {"cores", "memory", "postgres", "redis", "celery", "worker"}
    assert result["machine"]["worker"]["concurrency"] == 2
    rows = {row["id"]: row for row in result["rows"]}
    assert sorted(rows) == list(range(1, 10))
    for rid, fields in FIELDS.items():
        assert "error" not in rows[rid], rows[rid]
        assert fields <= set(rows[rid]), (rid, rows[rid])
        assert rows[rid]["what"]
        assert isinstance(rows[rid]["value"], (int, float))
    # Plain Celery before and after the rows that divide by it; they divide by the mean.
    assert len(rows[1]["rates"]) == 2 and rows[1]["value"] == round(sum(rows[1]["rates"]) / 2, 1)
    assert rows[2]["baseline"] == rows[3]["baseline"] == rows[1]["value"]
    # Row 4's goal names two CPU burners: the run measures beside them, and quiet first.
    assert rows[4]["burners"] == 2 and "2 CPU burners running" in rows[4]["what"]
    assert rows[4]["quiet"]["samples"] == rows[4]["samples"] > 0
    # ... and plain Celery's tasks the same way beside it, the reference.
    plain = rows[4]["plain"]
    assert plain["samples"] == plain["quiet"]["samples"] == rows[4]["samples"]
    assert 0 < plain["p50_ms"] <= plain["p99_ms"]
    assert _burners_left() == [], "a CPU burner outlived the benchmark run"


def _burners_left() -> list[int]:
    """Pids of busy-loop processes the benchmark's `cpu_burners` would have started."""
    left = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if argv[1:3] == [b"-c", b"while True: pass"]:
            left.append(int(proc.name))
    return left


@pytest.mark.scale  # several relays or worker groups at once: its own CI step
@pytest.mark.timeout(480)
def test_benchmark_row_11_many_relays_reports_its_ratios(tmp_path: Path) -> None:
    """Row 11 (1 vs 4 relay processes) at its smoke size: both workloads, both ratios."""
    output = tmp_path / "results.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--rows", "11", "--output", str(output)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=460,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [row] = json.loads(output.read_text())["rows"]
    assert "error" not in row, row
    assert {"value", "baseline", "ratio", "cpu_ratio", "ratios", "medians"} <= set(row)
    for workload in ("prefilled", "streamed"):
        for relays in ("1", "4"):
            run = row["medians"][workload][relays]
            # a start guard and an ack per message: per effect less when effects travel
            # in groups (the default), never nothing
            assert run["worker_statements"] > 0
            # backend CPU is read in clock ticks (10 ms): a smoke-sized drain may spend less
            assert run["relay_statements"] > 0 and run["cpu_ms"] >= 0
