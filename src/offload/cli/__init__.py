"""The `offload` command (also `python -m offload`): a worker process, dead letters, stats.

    offload worker --store URL [--workers N]
    offload dead-letters list [--json] [--key K] [--status N] [--since T]
    offload dead-letters show ID [--json]
    offload dead-letters replay ID... | --all [--dry-run]
    offload dead-letters discard ID...
    offload dead-letters purge
    offload stats [--json]
    offload console [--host H] [--port P] [--read-only]
    offload health [--max-age S] [--max-dead-letters N]
    offload demo [--store URL]

`--store` defaults to OFFLOAD_STORE. Errors are one line on stderr and a non-zero exit
status (1; 2 for a usage error), never a traceback. Nothing printed holds a secret: dead
letters are redacted when they are made, and store URLs are shown without passwords.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from ..errors import OffloadError
from .common import CommandError, UsageError, printable
from .parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `offload` command; returns the exit status."""
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except Exception as exc:  # a check of an argument that argparse does not report itself
        err.write(f"offload: usage error: {_one_line(exc)} (see offload --help)\n")
        return 2
    handler: Callable[..., int] = args.handler
    try:
        return handler(args, out, err)
    except KeyboardInterrupt:
        err.write("offload: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): end quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except UsageError as exc:
        err.write(f"offload: usage error: {exc} (see offload {args.command} --help)\n")
        return 2
    except (CommandError, OffloadError, ValueError, OSError) as exc:
        # StoreError and UnknownDeadLetter are OffloadErrors: a store that cannot be
        # reached, a record it cannot read, an id it does not hold.
        err.write(f"offload: error: {_one_line(exc)}\n")
        return 1
    except Exception as exc:  # the contract: one line, never a traceback
        err.write(f"offload: unexpected error: {type(exc).__name__}: {_one_line(exc)}\n")
        return 1


def _one_line(exc: BaseException) -> str:
    return printable(" ".join(str(exc).split())) or type(exc).__name__
