"""Reading a large object front to back while the next ranges are already downloading.

A checksum must see the bytes in order, but the network need not deliver
them one request at a time: :class:`RangeReader` keeps ``AHEAD`` ranged GETs
on fsspec's event loop and hands them out in order, so a single large file
downloads over several connections, without the HEAD request fsspec's own
file sends first (the manifest knows the size). A file of up to one
``RANGE`` is one streamed GET instead (:func:`ckptman.loopio.stream_into`).
Used only by :mod:`ckptman.storage`, for async filesystems (s3fs, gcsfs).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Future
from typing import Any

RANGE = 16 * 2**20
AHEAD = 4
"""Ranges downloading at once: memory stays ``AHEAD x RANGE`` whatever the file's size."""


def can_prefetch(fs: Any) -> bool:
    return bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_cat_file")


class RangeReader:
    """A read-only stream of an object whose size is known, fetched ``AHEAD`` ranges at a time.

    The last range asks for one byte more than expected (a small file is one
    plain GET), so an object that grew shows up as a size mismatch, as one
    that shrank does.
    """

    def __init__(self, fs: Any, path: str, size: int) -> None:
        self._fs, self._path = fs, path
        ranges: list[tuple[int | None, int | None]] = [(start, min(start + RANGE, size)) for start in range(0, size, RANGE)]
        if len(ranges) > 1:
            ranges[-1] = (ranges[-1][0], size + 1)
        else:  # one range: a plain GET (some servers, moto, read the whole object for any ranged one)
            ranges = [(None, None)]
        self._ranges = deque(ranges)
        self._pending: deque[Future[bytes]] = deque()
        self._current = memoryview(b"")
        self._fill()

    def _fill(self) -> None:
        while self._ranges and len(self._pending) < AHEAD:
            start, end = self._ranges.popleft()
            coroutine = self._fs._cat_file(self._path, start=start, end=end)
            self._pending.append(asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop))

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the rest of the current range when -1); b"" at the end."""
        if not self._current:
            if not self._pending:
                return b""
            self._current = memoryview(self._pending.popleft().result())
            self._fill()
        take = self._current.nbytes if size is None or size < 0 else size
        piece, self._current = self._current[:take], self._current[take:]
        return piece.tobytes() if piece.nbytes != len(piece.obj) else piece.obj  # type: ignore[arg-type, return-value]

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._ranges.clear()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
