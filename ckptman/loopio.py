"""Many small transfers at once, as coroutines on fsspec's event loop (s3fs, gcsfs).

A thread per file costs hand-offs to the loop and GIL switches for every
request; ``s3fs.put``/``s3fs.get`` gather coroutines on the loop instead, and
so does this for the files that fit one request: each is read (or written)
whole, hashed on the loop as its bytes pass, with at most ``limit`` requests
in flight. Larger files keep the concurrent part uploads and ranged reads of
:mod:`ckptman.multipart` and :mod:`ckptman.prefetch`. Used only by
:mod:`ckptman.storage`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from fsspec.asyn import AsyncFileSystem

T = TypeVar("T")

STREAM_CHUNK = 2**20
"""Largest piece handed to a sink at once while streaming (a body delivers what has arrived, up to this)."""


class Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


def is_async(fs: Any) -> bool:
    return isinstance(fs, AsyncFileSystem)


def has_s3_client(fs: Any) -> bool:
    """s3fs: its botocore client's calls (``_call_s3``) run on the loop, as s3fs's own transfers call them."""
    return hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


def can_stream(fs: Any) -> bool:
    """Whether the filesystem streams a body through ``open_async`` (s3fs does; gcsfs keeps fsspec's NotImplementedError)."""
    return is_async(fs) and type(fs).open_async is not AsyncFileSystem.open_async


async def stream_into(fs: Any, path: str, sink: Sink) -> None:
    """Copy a whole object into ``sink`` in one GET, written as the body arrives (as ``s3fs.get`` writes its files).

    ``sink.write`` runs on the loop's thread, so it must be quick: hashing and
    writing to a local file are.
    """
    f = await fs.open_async(path, "rb")
    try:
        while chunk := await f.read(STREAM_CHUNK):
            sink.write(chunk)
    finally:
        body = getattr(f, "r", None)  # s3fs's response body: released at once when the sink failed midway
        if body is not None:
            body.close()
        await f.close()


async def bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the jobs with at most ``limit`` at once; results in order.

    The first failure cancels the others and is raised once they have ended
    (as :meth:`ckptman.transfer.Transfers.run_each` does with threads).
    """
    gate = asyncio.Semaphore(limit)

    async def gated(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    tasks = [asyncio.ensure_future(gated(job)) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(fs: Any, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on the filesystem's loop from this thread and wait for it.

    Unlike fsspec's ``sync``, an interrupt of the waiting thread (Ctrl-C)
    cancels the coroutine and waits until it has stopped, so nothing keeps
    writing after the caller has moved on and cleaned up.
    """
    ended = threading.Event()

    async def tracked() -> T:
        try:
            return await make()
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(tracked(), fs.loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        ended.wait()
        raise
