"""A task module with a registered function, imported by `offload worker --import`."""

from __future__ import annotations

import requests

import offload


@offload.task
def deliver(url: str, n: int) -> None:
    """POST `n` to `url`: the call a registered task makes."""
    requests.post(url, json={"n": n}, timeout=5).raise_for_status()
