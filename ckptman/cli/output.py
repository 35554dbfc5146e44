"""One style of output: tables and JSON on stdout, ``ckptman: warning:`` / ``ckptman: error:`` lines on stderr.

Every warning raised while a command runs (ckptman's own classes,
``LeaseWarning``, and any other library's) and every warning the ``ckptman``
logger emits becomes one ``ckptman: warning: ...`` line, never Python's
two-line ``file:line: Category: message`` form.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from ckptman.cli.exitcodes import PROG


def warn_line(message: object) -> str:
    return f"{PROG}: warning: {message}"


def error_line(message: object) -> str:
    return f"{PROG}: error: {message}"


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """ckptman's own warnings as their message; others name their category, which says where they come from."""
    own = category.__module__.split(".")[0] == "ckptman"
    print(warn_line(message if own else f"{category.__name__}: {message}"), file=sys.stderr)


class _LowerLevelFormatter(logging.Formatter):
    """``warning:`` like argparse's ``error:``, not ``WARNING:``."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Warnings and the manager's repair notices (removed leftovers, rebuilt sidecar) as ``ckptman: warning:`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("ckptman")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    finally:
        logger.removeHandler(handler)


def emit_json(document: Any, out: TextIO) -> None:
    """Strict JSON (no NaN literals: callers encode non-finite metrics as strings first)."""
    print(json.dumps(document, indent=2, allow_nan=False), file=out)


def emit_lines(lines: Sequence[str], out: TextIO) -> None:
    for line in lines:
        print(line, file=out)


def human_size(size: int) -> str:
    """Bytes in binary units, three significant digits: what a person compares at a glance."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1000 or unit == "TiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def human_age(seconds: float) -> str:
    """How long ago, in the largest unit that is at least one (``45s``, ``12m``, ``3h``, ``2d``)."""
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def age_of(created: float, now: float | None = None) -> float:
    return max(0.0, (time.time() if now is None else now) - created)


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Aligned columns (numbers right, text left), no trailing spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return lines
