"""Running real Python subprocesses in tests: the source tree, tests/support and the test
directories on their path (a subprocess may import a test module's functions by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

__all__ = ["IMPORTABLE", "SRC", "SUPPORT", "TESTS", "TEST_DIRS", "python_env", "reap", "run_python"]

SUPPORT = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(SUPPORT)
SRC = os.path.join(os.path.dirname(TESTS), "src")
TEST_DIRS = [os.path.join(TESTS, name) for name in ("unit", "contract", "system")]
IMPORTABLE = [SRC, SUPPORT, *TEST_DIRS]


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with src/, tests/support and the test modules importable, plus
    `extra`."""
    path = [*IMPORTABLE, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(extra or {})}


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `code` (dedented) in a fresh interpreter and wait for it; never raises on exit."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(env),
        check=False,
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill `proc` if it still runs, wait for it and close its pipes (a test's finally)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
