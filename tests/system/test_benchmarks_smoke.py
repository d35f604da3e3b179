"""The benchmarks keep working: each one runs at a tiny size and returns well-formed rows.

Structure only: figures from a run this small mean nothing, and speed is never asserted
in the test suite (benchmarks/run.py measures it, as same-run ratios).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("offload_bench_run", BENCHMARKS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its siblings
    return module


TINY = {"factor": 0.001, "repeats": 1}
OWN = [
    "enqueue",
    "handler_path",
    "memory",
    "drain",
    "scaling",
    "throttle",
    "limits",
    "idle",
    "console",
    "budgets",
]


@pytest.mark.parametrize("name", OWN)
def test_benchmark_runs_and_returns_rows(bench_run: ModuleType, name: str) -> None:
    result = bench_run.run_in_process(name, bench_run.Scale(**TINY))
    rows = result["rows"]
    assert rows, f"bench_{name} returned no rows"
    measured = [r for r in rows if r.value is not None]
    assert measured, f"bench_{name} measured nothing: {rows}"
    for row in rows:
        assert row.bench == name
        assert row.figure and row.unit
        if row.value is None:
            assert row.note, "a row without a figure says why"
            continue
        assert math.isfinite(row.value) and row.value >= 0
        assert row.runs >= 1
        if row.ratio is not None:
            assert math.isfinite(row.ratio) and row.ratio >= 0
        if row.target:
            assert isinstance(row.met, bool), f"{row.figure}: a target is met or missed"
    assert any(r.target for r in rows), f"bench_{name} checks no target"


def test_the_postgres_benchmark_runs_and_returns_rows(bench_run: ModuleType, postgres: Any) -> None:
    """Its own server, as `run.py` starts it (the session's `postgres` fixture says whether
    one can start here: under CI it must)."""
    rows = bench_run.run_in_process("postgres", bench_run.Scale(**TINY))["rows"]
    assert all(row.bench == "postgres" for row in rows)
    measured = {row.figure for row in rows if row.value is not None}
    assert any("transaction" in figure for figure in measured), rows
    assert any("4 worker processes" in figure for figure in measured), rows
    assert any("wake-up" in figure for figure in measured), rows
    assert all(isinstance(row.met, bool) for row in rows if row.target)


def test_every_own_benchmark_is_listed(bench_run: ModuleType) -> None:
    assert {*OWN, "postgres"} <= set(bench_run.BENCHES)
    for name in OWN:
        assert (BENCHMARKS / f"bench_{name}.py").exists()


def test_runner_child_process_table_and_results_page(
    bench_run: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scale = bench_run.Scale(**TINY)
    result = bench_run._run_child("idle", scale)  # the path `python benchmarks/run.py` takes
    rows = result["rows"]
    assert rows and all(r.bench == "idle" for r in rows)
    assert all(r.value is not None for r in rows), rows
    table = bench_run.table(rows)
    assert table.splitlines()[0].startswith("| bench")
    assert len(table.splitlines()) == len(rows) + 2
    page = bench_run.write_results(
        rows, {}, "python benchmarks/run.py", 1.0, (0.0, 0.0, 0.0), out=tmp_path / "R.md"
    )
    text = page.read_text()
    assert "noisy" in text and "| idle" in text


def test_missing_external_benchmark_is_a_note(bench_run: ModuleType) -> None:
    result = bench_run.run_in_process("no_such_bench", bench_run.Scale(**TINY))
    (row,) = result["rows"]
    assert row.value is None and "not present" in row.note
