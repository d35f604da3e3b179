"""offload's benchmark suite: same-run ratios against the floor and the peers.

    python benchmarks/run.py            # the documented run (about 4 minutes); or: tox -e bench
    python benchmarks/run.py --only enqueue memory --repeats 3
    python benchmarks/run.py --scale 0.1 --repeats 2 --no-write   # a quick look

Prints a table and writes benchmarks/RESULTS.md (unless --no-write). Each benchmark runs
in a fresh child process (its own heap, threads and GC history), and every figure is the
median of several runs; every comparison is a ratio against a baseline measured in the
same run, since absolute times on a shared machine mean little.

Benchmarks are the `bench_<name>.py` files beside this one, each with
`run(scale: Scale) -> list[Row]` (see _harness.py). `bench_durable_enqueue.py` and
`bench_handler_latency.py` are written with the stores and the handler work; when present,
they are run the same way (a `run(scale)` returning Rows or dicts of Row fields), or, if
they have no `run`, as scripts whose output is copied into RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _harness import TIMES, Row, Scale  # noqa: E402

# In the order of the table in issue 6.
BENCHES = [
    "enqueue",
    "handler_path",
    "durable_enqueue",
    "drain",
    "scaling",
    "throttle",
    "limits",
    "memory",
    "idle",
    "postgres",
    "console",
    "budgets",
]
EXTERNAL = {"durable_enqueue", "handler_latency"}  # written by other engineers
OPTIONAL = ["handler_latency"]  # run when present, listed after the rest
CHILD_TIMEOUT = 300.0
_MARK = "@@offload-bench-result@@ "


def _module_path(name: str) -> Path:
    return HERE / f"bench_{name}.py"


def _coerce(row: Any, bench: str) -> Row:
    if isinstance(row, Row):
        return row
    if isinstance(row, dict):
        fields = {k: v for k, v in row.items() if k in Row.__dataclass_fields__}
        fields.setdefault("bench", bench)
        fields.setdefault("figure", "?")
        fields.setdefault("value", None)
        fields.setdefault("unit", "")
        return Row(**fields)
    raise TypeError(f"bench_{bench}.run returned {type(row).__name__}, not a Row or dict")


def run_in_process(name: str, scale: Scale) -> dict[str, Any]:
    """Run one benchmark here; {"rows": [...], "text": "..."}. The smoke test calls this."""
    path = _module_path(name)
    if not path.exists():
        owner = "the SQLite store's engineer" if name == "durable_enqueue" else "another task"
        return {
            "rows": [Row(name, path.name, None, "", note=f"not present yet (written by {owner})")],
            "text": "",
        }
    module = importlib.import_module(f"bench_{name}")
    runner = getattr(module, "run", None)
    if runner is None:  # a plain script: run it, keep what it prints
        done = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
        note = "output below" if done.returncode == 0 else f"exit {done.returncode}"
        return {
            "rows": [Row(name, path.name, None, "", note=note)],
            "text": (done.stdout + done.stderr).strip(),
        }
    try:
        result = runner(scale)
    except TypeError:
        if name not in EXTERNAL:
            raise
        result = runner()  # an external benchmark with its own sizes
    return {"rows": [_coerce(r, name) for r in result], "text": ""}


def _run_child(name: str, scale: Scale) -> dict[str, Any]:
    """Run one benchmark in a fresh interpreter and read its rows back."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--scale",
        str(scale.factor),
        "--repeats",
        str(scale.repeats),
    ]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"rows": [Row(name, name, None, "", note="timed out")], "text": ""}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            data = json.loads(line[len(_MARK) :])
            return {"rows": [_coerce(r, name) for r in data["rows"]], "text": data["text"]}
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"rows": [Row(name, name, None, "", note=f"failed: {tail[0]}")], "text": ""}


# -- the table ------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("µs", "ms", "s"):
        return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    if unit == "%":
        return f"{value:.1f} %"
    if value == int(value) or abs(value) >= 100:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.2f} {unit}".strip()


def _cells(row: Row) -> list[str]:
    met = {True: "met", False: "**MISSED**", None: ""}[row.met]
    return [
        row.bench,
        row.figure,
        _fmt(row.value, row.unit),
        row.baseline,
        "—" if row.ratio is None else f"{row.ratio:.2f}{TIMES}",
        row.target,
        met,
        row.note,
    ]


HEADER = ["bench", "figure", "median", "baseline (same run)", "ratio", "target", "", "note"]


def table(rows: list[Row]) -> str:
    """A Markdown table, readable as plain text too."""
    lines = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(HEADER), rule, *(fmt(c) for c in lines[1:])])


def write_results(
    rows: list[Row],
    texts: dict[str, str],
    command: str,
    seconds: float,
    load: tuple[float, ...],
    out: Path = HERE / "RESULTS.md",
) -> Path:
    """Write the results page: how it was made, the table, external output, the history."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    missed = [r for r in rows if r.met is False]
    parts = [
        "# offload benchmarks",
        "",
        f"Written by `{command}` on {now} in {seconds:.0f} s "
        f"(Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.2f} at the start).",
        "",
        "These figures come from a shared, noisy machine (2 cores, other engineers' test runs "
        "alongside): compare the ratios, each against a baseline measured in the same run, "
        "not the absolute times. Every figure is the median of the runs shown in "
        "`runs`; a ratio is the median of the per-run ratios.",
        "",
        "Targets: " + ("all met." if not missed else f"{len(missed)} missed."),
        "",
        table(rows),
        "",
        "How each figure is made: the docstring of `benchmarks/bench_<bench>.py`.",
    ]
    for name, text in texts.items():
        if text:
            parts += ["", f"## Output of bench_{name}.py", "", "```", text, "```"]
    history = HERE / "HISTORY.md"
    if history.exists():
        parts += ["", history.read_text().strip()]
    out.write_text("\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="offload benchmarks: same-run ratios.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="some of: " + " ".join(BENCHES))
    parser.add_argument("--scale", type=float, default=1.0, help="size factor (1.0 = full)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    scale = Scale(factor=opts.scale, repeats=opts.repeats)

    if opts.child:
        result = run_in_process(opts.child, scale)
        payload = {"rows": [r.to_json() for r in result["rows"]], "text": result["text"]}
        print(_MARK + json.dumps(payload), flush=True)
        return 0

    names = opts.only or [*BENCHES, *(n for n in OPTIONAL if _module_path(n).exists())]
    unknown = [n for n in names if n not in BENCHES and n not in OPTIONAL]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    load = os.getloadavg()
    started = time.monotonic()
    rows: list[Row] = []
    texts: dict[str, str] = {}
    for name in names:
        t0 = time.monotonic()
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        result = _run_child(name, scale)
        rows += result["rows"]
        texts[name] = result["text"]
        print(f"   {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    seconds = time.monotonic() - started
    print(table(rows))
    for name, text in texts.items():
        if text:
            print(f"\n-- output of bench_{name}.py\n{text}")
    if not opts.no_write:
        command = "python benchmarks/run.py" + (
            " " + " ".join(argv if argv is not None else sys.argv[1:])
            if (argv if argv is not None else sys.argv[1:])
            else ""
        )
        path = write_results(rows, texts, command, seconds, load)
        print(f"\nwrote {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
