"""The ``ckptman`` command: inspect, verify, clean up, restore and publish a run directory on any fsspec URL.

This module imports nothing heavy, so a Ctrl-C while the rest of the command
loads still ends as one ``ckptman: interrupted`` line, and ``--help`` and
``--version`` answer at once. Exit codes (:mod:`ckptman.cli.exitcodes`):
0 success, 1 a check failed (``verify``, ``best`` without a value),
2 an error (its message on stderr says what to do), 130 interrupted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ckptman.cli.exitcodes import EXIT_INTERRUPTED, PROG


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit code (the console script exits with it)."""
    try:
        from ckptman.cli.run import run

        return run(argv)
    except KeyboardInterrupt:  # before run() could take over, e.g. while importing
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["main"]
