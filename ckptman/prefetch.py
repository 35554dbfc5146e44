"""Reading a large object over several connections at once (s3fs, gcsfs).

Two ways, for two needs (a file of up to one ``RANGE`` is one streamed GET
instead, :func:`ckptman.loopio.stream_into`):

* **Into a local file** (restores): on S3 :func:`download_ranges` streams
  ``STREAMS`` ranged GETs, each body written at its offset as it arrives, so
  memory stays a few chunks whatever the size, and a server that reads the
  whole object for every ranged GET (moto does) is asked ``STREAMS`` times,
  not once per 16 MiB. The caller hashes the finished file from the page cache.
* **Through a hash only** (verify): :class:`RangeReader` keeps ``AHEAD``
  16 MiB ranged GETs in flight and hands them out in order.

Neither sends the HEAD request fsspec's own file sends first: the manifest
knows the size. Used only by :mod:`ckptman.storage`.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from concurrent.futures import Future
from typing import Any, Awaitable, Callable

from ckptman.loopio import STREAM_CHUNK, bounded, has_s3_client
from ckptman.progress import FileProgress

RANGE = 16 * 2**20
AHEAD = 4
"""Ranges downloading at once: memory stays ``AHEAD x RANGE`` whatever the file's size."""
STREAMS = 8
"""Ranged GETs of one file downloading at once (s3fs.get_file uses 10, each buffered whole in memory)."""


def can_prefetch(fs: Any) -> bool:
    return bool(getattr(fs, "async_impl", False)) and hasattr(fs, "_cat_file")


def can_download_ranges(fs: Any) -> bool:
    """S3 (s3fs): its client streams a ranged GET's body (as s3fs's own get_file calls it)."""
    return has_s3_client(fs)


def split(size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of a non-empty file for :func:`download_ranges`: up to ``STREAMS``, none under ``RANGE`` bytes."""
    count = max(1, min(STREAMS, math.ceil(size / RANGE)))
    step = math.ceil(size / count)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


Retrying = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


async def download_ranges(
    fs: Any, path: str, local_path: str, size: int, on_bytes: Callable[[int], None], retrying: Retrying
) -> int:
    """Download an object of expected ``size`` into ``local_path`` over concurrent ranged GETs; returns its real size.

    The first range's answer names the object's size (``Content-Range``):
    when it is not ``size`` nothing more is fetched and that size is
    returned, for the caller to report. Each range is retried on its own
    through ``retrying`` (writing at offsets makes a retry overwrite, never append).
    """
    bucket, key, _ = fs.split_path(path)
    ranges = split(size)
    progress = {start: FileProgress(on_bytes) for start, _ in ranges}  # a retried range re-reports nothing

    async def get(start: int, end: int) -> Any:
        return await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")

    async def write_body(body: Any, start: int) -> None:
        offset, counter = start, progress[start].attempt()
        try:
            while chunk := await body.read(STREAM_CHUNK):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
                counter.relative_update(len(chunk))
        finally:
            body.close()

    def fetch(start: int, end: int) -> Callable[[], Awaitable[None]]:
        async def attempt() -> None:
            await write_body((await get(start, end))["Body"], start)

        return lambda: retrying(attempt)

    fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        first = await retrying(lambda: get(*ranges[0]))
        actual = int(str(first.get("ContentRange", f"/{size}")).rpartition("/")[2])
        if actual != size:
            first["Body"].close()
            return actual

        async def first_body() -> None:
            try:
                await write_body(first["Body"], 0)
            except Exception:  # noqa: BLE001 - broken midway: the range again, retried as the others are
                await fetch(*ranges[0])()

        await bounded([first_body, *(fetch(*r) for r in ranges[1:])], STREAMS)
        return size
    finally:
        os.close(fd)


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
