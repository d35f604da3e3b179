"""`python -m offload`: the offload command (see offload.cli)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
