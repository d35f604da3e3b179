"""A task module whose import has a side effect: the trust tests check it never happens.

Importing it writes the file named by OFFLOAD_TEST_MARKER (when set), as a module that
runs code at import would; a worker that refuses its functions must not import it.
"""

from __future__ import annotations

import os

_marker = os.environ.get("OFFLOAD_TEST_MARKER")
if _marker:
    with open(_marker, "a", encoding="utf-8") as file:
        file.write(f"imported by {os.getpid()}\n")


def job(url: str) -> None:
    """Would call `url`; the tests check it never runs under trusted='registered'."""
    import requests

    requests.post(url, timeout=5)
