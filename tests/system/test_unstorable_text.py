"""Error text a store cannot hold still becomes a dead letter, on real SQLite and PostgreSQL.

A third party writes the error text: an API's reason phrase, an exception that quotes a
JSON error. PostgreSQL refuses NUL in text and SQLite a lone surrogate; a dead letter it
refuses would leave its task to run again at every lease expiry, for ever. ESC would
reach the operator's terminal through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tenacity

from offload import Offloader, RetryPolicy

ONCE = RetryPolicy(stop=tenacity.stop_after_attempt(1))


def raises_unstorable() -> None:
    """Fails with NUL, a lone surrogate and a terminal escape in its message."""
    raise RuntimeError("bad\x00thing \ud800 \x1b[2J\x1b]0;title\x07done")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_error_no_store_can_hold_still_becomes_a_dead_letter(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = (
        f"sqlite:///{tmp_path / 'offload.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    off = Offloader(store=store, retry=ONCE, idle_timeout=1)
    try:
        task = off.enqueue_task(raises_unstorable)
        assert off.flush(30)
        letters = off.dead_letters()
        counts = off.stats()
    finally:
        off.shutdown(5)
    assert [(letter.task_id, letter.error) for letter in letters] == [
        (task.id, "RuntimeError: badthing \ufffd [2J]0;titledone")
    ]
    assert counts.dead_lettered == 1, counts
