"""The CLI's exit codes, one place for the code and the docs (``ckptman --help`` prints them)."""

from __future__ import annotations

PROG = "ckptman"
EXIT_OK = 0
EXIT_FAILED = 1  # a check found a problem: verify failed, best has no value
EXIT_ERROR = 2  # bad usage or a ckptman error: the message says what to do
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it

DESCRIPTION = """\
exit codes:
  0    success
  1    a check failed (verify found a bad checkpoint; best found no value)
  2    error: bad arguments, missing path, unreachable storage, ... (one line on stderr)
  130  interrupted (Ctrl-C)"""
