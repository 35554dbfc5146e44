"""Transfer progress through fsspec's callback mechanism: a tqdm bar on a terminal, and logging.

Transfers take a callback object, never ``None``: with progress off it is
fsspec's no-op callback (a null object), so the byte-moving code has no
branches for it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Callable, Iterator

from fsspec.callbacks import DEFAULT_CALLBACK, Callback, TqdmCallback

logger = logging.getLogger("ckptman")

__all__ = ["DEFAULT_CALLBACK", "Callback", "FileProgress", "Progress"]

LONG_TRANSFER = 64 * 1024 * 1024  # smaller transfers are not worth a bar or a log line


class _Reporter(Callback):
    """Counts bytes from several transfer threads; forwards them to tqdm and logs every quarter."""

    def __init__(self, description: str, total: int | None, bar: Callback) -> None:
        super().__init__(size=total)
        self._description = description
        self._bar = bar
        self._lock = threading.Lock()
        self._logged_quarter = 0
        self._start = time.monotonic()

    def relative_update(self, inc: int = 1) -> None:
        with self._lock:
            self.value += inc
            self._bar.relative_update(inc)
            if self.size and self.size >= LONG_TRANSFER:
                quarter = 4 * self.value // self.size
                if quarter > self._logged_quarter:
                    self._logged_quarter = quarter
                    logger.info("%s: %d%% of %d MiB", self._description, 25 * quarter, self.size >> 20)

    def finish(self) -> None:
        if self.value >= LONG_TRANSFER:
            seconds = time.monotonic() - self._start
            logger.info("%s: %d MiB in %.1fs", self._description, self.value >> 20, seconds)


class FileProgress(Callback):
    """One file's (or range's) bytes, reported once to ``report``, however often it is retried.

    Each attempt starts with :meth:`attempt`; bytes are passed on only past
    the furthest point an earlier attempt reached, so a retried file does not
    push the bar (and the logged total) past its real size.
    """

    def __init__(self, report: Callable[[int], None]) -> None:
        super().__init__()
        self._report = report  # e.g. a transfer's callback.relative_update
        self._counted = 0  # the furthest any attempt got
        self._this_attempt = 0

    def attempt(self) -> FileProgress:
        self._this_attempt = 0
        return self

    def relative_update(self, inc: int = 1) -> None:
        self._this_attempt += inc
        if self._this_attempt > self._counted:
            self._report(self._this_attempt - self._counted)
            self._counted = self._this_attempt


class Progress:
    """Whether to show bars: ``None`` means only when stderr is a terminal."""

    def __init__(self, enabled: bool | None) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"progress must be True, False or None (auto), got {enabled!r}")
        self.enabled = enabled

    def _show_bar(self, total: int | None) -> bool:
        wanted = sys.stderr.isatty() if self.enabled is None else self.enabled
        return wanted and (total is None or total >= LONG_TRANSFER or self.enabled is True)

    @contextlib.contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Callback]:
        bar: Any = DEFAULT_CALLBACK
        if self._show_bar(total):
            kwargs = {"desc": description, "unit": "B", "unit_scale": True, "unit_divisor": 1024, "leave": False}
            bar = TqdmCallback(tqdm_kwargs=kwargs)
            bar.size = total  # TqdmCallback hands its size to tqdm as the total
        reporter = _Reporter(description, total, bar)
        try:
            yield reporter
            reporter.finish()
        finally:
            if bar is not DEFAULT_CALLBACK:
                bar.close()
