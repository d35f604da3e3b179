"""`offload demo` (offload.demo.run): a real run in a pipe and on a terminal, bad stores,
the durable variant, and the Offloader.gates() snapshot it draws from."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import offload
from offload import Offloader, demo
from offload.stores import open_store
from offload.testing import FakeClock
from server import Answer, ScriptedServer

RUN_DEMO = "import offload.demo as d; raise SystemExit(d.run())"
DEADLINE = 30.0  # the demo must finish on its own well within this


def check_summary(text: str) -> None:
    """The end of a demo run: every call settled, the table, the twelve dead letters."""
    assert "Done in" in text
    assert "288 delivered, 12 dead letters" in text and "nothing lost" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    # API rows end with: calls, delivered, dead letters, requests received.
    assert rows["crm"][-4:-1] == ["144", "138", "6"]
    assert rows["mail"][-4:-1] == ["100", "100", "0"]
    assert rows["search"][-4:] == ["50", "50", "0", "50"]
    legacy_requests = int(rows["legacy"][-1])
    # Down, so paused: fewer requests than four attempts each, one at least per call.
    assert rows["legacy"][-4:-1] == ["6", "0", "6"] and 6 <= legacy_requests < 24
    assert rows["total"][1:4] == ["300", "288", "12"]
    dead = [line for line in text.splitlines() if re.match(r"^  [0-9a-f]{24}  ", line)]
    assert len(dead) == 12
    assert sum(" crm " in d and " permanent " in d and " 422 " in d for d in dead) == 6
    legacy = [d for d in dead if " legacy " in d and " exhausted " in d and " 500 " in d]
    assert len(legacy) == 6 and all("its API is down" in d for d in legacy)
    assert "0 of its 100 requests answered 429" in text  # mail, paced by its Limit


def read_pty(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_demo_in_a_pipe_and_on_a_terminal() -> None:
    """Both runs at once (each takes about five seconds, mostly waiting on the mail API's
    rate limit): plain periodic lines in a pipe, a block redrawn in place on a terminal."""
    env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + DEADLINE
    piped = subprocess.Popen(
        [sys.executable, "-c", RUN_DEMO],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    master, slave = os.openpty()
    try:
        tty = subprocess.Popen(
            [sys.executable, "-c", RUN_DEMO],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=env,
        )
        os.close(slave)
        screen = read_pty(master, deadline)
        _, tty_err = tty.communicate(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if piped.poll() is None and time.monotonic() > deadline:
            piped.kill()
    out, err = piped.communicate(timeout=max(0.1, deadline - time.monotonic()))

    assert piped.returncode == 0, err.decode()
    text = out.decode()
    assert "\x1b[" not in text
    progress = [line for line in text.splitlines() if line.startswith("[")]
    assert progress and all("delivered" in line and "dead letters" in line for line in progress)
    assert progress[-1].split("]")[1].split()[:2] == ["delivered", "288/300"]
    assert "paced mail at 20/s" in text  # its declared Limit
    assert "gated 1 (legacy down, reopens in" in text  # the outage closed legacy's gate
    check_summary(text)
    assert err == b""  # no log lines or tracebacks leak onto the screen

    assert tty.returncode == 0, tty_err.decode()
    drawn = screen.decode().replace("\r\n", "\n")
    assert drawn.count("\x1b[4F") >= 2  # moved up over the previous four lines and redrew
    assert "settled" in drawn and "gated keys:" in drawn and "paced keys: mail" in drawn
    check_summary(drawn)


def test_demo_with_a_store_it_cannot_open_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert demo.run("nosuch://anywhere", out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload demo: ") and "nosuch://anywhere" in err
    assert "Traceback" not in err and out.getvalue() == ""


def _sqlite_available(tmp_path: Path) -> bool:
    try:
        store = open_store(f"sqlite:///{tmp_path / 'probe.db'}")
    except ValueError:
        return False
    store.close()
    return True


def test_demo_runs_durably_on_sqlite(tmp_path: Path) -> None:
    if not _sqlite_available(tmp_path):
        pytest.skip("the SQLite store (issue 3) is not in open_store yet: sqlite:// is refused")
    db = tmp_path / "demo.db"
    out = io.StringIO()
    assert demo.run(f"sqlite:///{db}", out=out) == 0
    text = out.getvalue()
    assert db.exists()
    assert "store sqlite:///" in text
    check_summary(text)
    assert "offload dead-letters list --store sqlite:///" in text


# -- Offloader.gates(): the snapshot the demo draws -----------------------------------------


def test_gates_reports_closed_keys_and_seconds_until_they_reopen(
    server: ScriptedServer, make_offloader: Callable[..., Offloader]
) -> None:
    server.script("/busy", Answer(429, headers={"Retry-After": "10"}), Answer(200))
    clock = FakeClock()
    retried = threading.Event()
    off = make_offloader(clock=clock, on_retry=lambda *a: retried.set())
    assert off.gates() == {}
    off.enqueue_task(offload.http("GET", server.url("/busy")))
    assert retried.wait(5)
    gates = off.gates()
    assert list(gates) == [server.base_url]
    assert 10.0 <= gates[server.base_url] <= 11.0  # Retry-After, plus a little jitter
    clock.advance(4)
    assert 6.0 <= off.gates()[server.base_url] <= 7.0
    clock.advance(7)  # due: the probe goes, gets 200, and the gate is removed
    assert off.flush(5)
    assert off.gates() == {}
    assert len(server.requests_to("/busy")) == 2
