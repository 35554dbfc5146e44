"""Moving bytes between the caller and storage, checksummed while they stream.

Checksums are xxh3-128 (the ``xxhash`` package): at several GB/s it hashes
far faster than any disk or network writes, so integrity is computed in the
same pass as the write and never needs a second read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import IO, Callable, Iterator, Sequence, TypeVar

import xxhash

from ckptman.errors import CorruptCheckpointError
from ckptman.manifest import FileEntry
from ckptman import staging
from ckptman.progress import DEFAULT_CALLBACK, Callback, FileProgress, Progress
from ckptman.storage import Storage, UploadStopped

logger = logging.getLogger("ckptman")

ALGORITHM = "xxh3_128"
T = TypeVar("T")
R = TypeVar("R")
CHUNK = 8 * 1024 * 1024


class ChecksumWriter(io.RawIOBase):
    """A write-only stream that hashes and counts everything passed to the file beneath (if any)."""

    def __init__(self, target: IO[bytes] | None, callback: Callback = DEFAULT_CALLBACK) -> None:
        super().__init__()
        self._target = target
        self._hash = xxhash.xxh3_128()
        self._callback = callback
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._hash.update(view)
        if self._target is not None:
            self._target.write(view)
        self.size += view.nbytes
        self._callback.relative_update(view.nbytes)
        return view.nbytes

    def flush(self) -> None:
        if self._target is not None:
            self._target.flush()

    @property
    def checksum(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"


def checksum_of(data: bytes | memoryview) -> str:
    return f"{ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def write_stream(
    storage: Storage,
    rel: str,
    produce: Callable[[IO[bytes]], None],
    entry_path: str,
    callback: Callback = DEFAULT_CALLBACK,
    stopped: Callable[[], bool] | None = None,
) -> FileEntry:
    """Let ``produce`` write a payload file (e.g. ``torch.save``), hashing as it goes.

    A retried write starts over with a fresh hash; once ``stopped()`` is true
    the upload is aborted rather than published (:meth:`Storage.write_file`).
    """

    progress = FileProgress(callback.relative_update)

    def attempt(target: IO[bytes]) -> ChecksumWriter:
        writer = ChecksumWriter(target, progress.attempt())
        produce(writer)  # type: ignore[arg-type]
        writer.flush()
        return writer

    writer = storage.write_file(rel, attempt, stopped)
    return FileEntry(entry_path, writer.size, writer.checksum)


def upload_file(
    storage: Storage, local_path: str, rel: str, entry_path: str, stop: threading.Event, callback: Callback = DEFAULT_CALLBACK
) -> FileEntry:
    """Copy one local file into storage, hashing it in the same pass.

    Once ``stop`` is set it gives up at the next chunk, and storage aborts the
    upload (no multipart parts are left behind) rather than finish a file nobody commits.
    """

    def copy(writer: IO[bytes]) -> None:
        with open(local_path, "rb") as source:
            while chunk := source.read(CHUNK):
                if stop.is_set():
                    raise UploadStopped(f"upload of {local_path} stopped")
                writer.write(chunk)

    # A sibling that fails while the last bytes go up still stops the completion.
    return write_stream(storage, rel, copy, entry_path, callback, stop.is_set)


def local_files(local_dir: str) -> list[str]:
    """Every regular file below ``local_dir``, as sorted POSIX paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in files:
            found.append(os.path.relpath(os.path.join(folder, name), local_dir).replace(os.sep, "/"))
    return sorted(found)


class ChecksumMismatch(CorruptCheckpointError):
    """A file's bytes do not match its manifest entry (size or checksum); a missing file is not one."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}; the checkpoint is corrupted")
        self.where, self.detail = where, detail

    def __reduce__(self) -> tuple[type[ChecksumMismatch], tuple[str, str]]:  # picklable, as every other error
        return ChecksumMismatch, (self.where, self.detail)


def _mismatch(storage: Storage, rel: str, what: str, expected: object, actual: object) -> ChecksumMismatch:
    return ChecksumMismatch(f"{storage.url}/{rel}", f"{what} mismatch (expected {expected}, found {actual})")


def _missing(storage: Storage, rel: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{storage.url}/{rel} is listed in the manifest but missing; the checkpoint is incomplete or corrupted")


def checksum_local_file(path: str) -> tuple[int, str]:
    """Size and checksum of a local file, hashed straight from the page cache through mmap (no copies)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, checksum_of(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return size, checksum_of(memoryview(mapped))


@contextlib.contextmanager
def _hashing_into(local_path: str | None, callback: Callback = DEFAULT_CALLBACK) -> Iterator[ChecksumWriter]:
    """A sink for :meth:`Storage.read_into`: hashes what arrives, writing it to ``local_path`` when given."""
    with open(local_path, "wb") if local_path is not None else contextlib.nullcontext() as target:
        yield ChecksumWriter(target, callback)


def _attempts_into(local_path: str | None, progress: FileProgress) -> Callable[[], contextlib.AbstractContextManager[ChecksumWriter]]:
    """The sink opener for one file's attempts: each a fresh sink, the file's bytes counted once."""
    return lambda: _hashing_into(local_path, progress.attempt())


def describe_stored(storage: Storage, rel: str, entry_path: str) -> FileEntry:
    """The manifest entry of a file another writer (DCP) already stored: one read pass to checksum it."""
    local = storage.local_path(rel)
    if local is not None:
        size, checksum = checksum_local_file(local)
        return FileEntry(entry_path, size, checksum)

    hashed = storage.read_into(rel, lambda: _hashing_into(None))
    return FileEntry(entry_path, hashed.size, hashed.checksum)


@contextlib.contextmanager
def verified_local_copy(storage: Storage, rel: str, entry: FileEntry) -> Iterator[str]:
    """A verified local path for a payload file: the file itself on local disk, else a temporary download."""
    local = storage.local_path(rel)
    if local is not None:
        try:
            size, actual = checksum_local_file(local)
        except FileNotFoundError as exc:
            raise _missing(storage, rel) from exc
        _check(storage, rel, entry, size, actual)
        yield local
        return
    scratch = staging.make("restore")
    try:
        path = os.path.join(scratch, os.path.basename(rel))
        download_verified(storage, rel, entry, path)
        yield path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check(storage: Storage, rel: str, entry: FileEntry, size: int, actual: str) -> None:
    if size != entry.size:
        raise _mismatch(storage, rel, "size", entry.size, size)
    if actual != entry.checksum:
        raise _mismatch(storage, rel, "checksum", entry.checksum, actual)


def download_verified(
    storage: Storage, rel: str, entry: FileEntry, local_path: str | None, callback: Callback = DEFAULT_CALLBACK
) -> None:
    """Stream a payload file to ``local_path`` (or just through the hash when None) and verify it.

    A mismatch is read once more before it is raised: bytes damaged on the
    way then come right (the S3 client's own CRC32 is skipped for these reads,
    :mod:`ckptman.transport_checksum`), a damaged stored file mismatches again.
    """
    progress = FileProgress(callback.relative_update)  # the second read counts nothing again
    try:
        _download_checked(storage, rel, entry, local_path, progress)
    except ChecksumMismatch as exc:
        _read_again(storage, rel, entry, local_path, progress, exc)


def _read_again(
    storage: Storage, rel: str, entry: FileEntry, local_path: str | None, progress: FileProgress, first: ChecksumMismatch
) -> None:
    logger.warning("%s: %s on the first read; reading it once more to tell damage on the way from damage in storage", first.where, first.detail)
    _download_checked(storage, rel, entry, local_path, progress)
    logger.warning("%s read again matches its manifest entry: the first read was damaged on the way", first.where)


def _download_checked(storage: Storage, rel: str, entry: FileEntry, local_path: str | None, progress: FileProgress) -> None:
    """One read of a payload file, checked against its entry.

    A large file bound for a local path may arrive out of order (concurrent
    ranges, :meth:`Storage.download_ranges`); it is hashed once complete,
    from the page cache.
    """
    if local_path is not None:
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    try:
        if local_path is not None and storage.downloads_in_ranges(entry.size):
            found = storage.download_ranges(rel, local_path, entry.size, progress.attempt().relative_update)
            if found != entry.size:
                raise _mismatch(storage, rel, "size", entry.size, found)
            size, actual = checksum_local_file(local_path)
        else:
            hashed = storage.read_into(rel, _attempts_into(local_path, progress), entry.size, checked_by_caller=True)
            size, actual = hashed.size, hashed.checksum
    except FileNotFoundError as exc:
        raise _missing(storage, rel) from exc
    _check(storage, rel, entry, size, actual)


class Transfers:
    """Bounded-parallel file transfers with progress: the settings a manager applies to every copy.

    Threads give parallelism on every backend: local copies release the GIL in
    I/O, and async filesystems (s3fs, gcsfs) run the threads' requests
    concurrently on fsspec's event loop. Files that fit one request skip the
    threads there and go as a batch of coroutines (:mod:`ckptman.loopio`).
    """

    def __init__(self, max_concurrency: int, progress: bool | None) -> None:
        self.max_concurrency = max_concurrency
        self.progress = Progress(progress)

    def write(self, storage: Storage, rel: str, produce: Callable[[IO[bytes]], None], entry_path: str) -> FileEntry:
        with self.progress.bar(f"save {rel}", None) as callback:
            return write_stream(storage, rel, produce, entry_path, callback)

    def upload_files(self, storage: Storage, items: Sequence[tuple[str, str, str]]) -> tuple[FileEntry, ...]:
        """Upload ``(local_path, rel, entry_path)`` items concurrently; entries come back in the given order.

        Files that fit one request go up together on an async backend's loop
        (:meth:`Storage.write_many`), the others through threads.
        """
        sizes = [os.path.getsize(local) for local, _, _ in items]
        entries: list[FileEntry | None] = [None] * len(items)
        batch = [i for i, size in enumerate(sizes) if storage.writes_in_batch(size)]
        stop = threading.Event()
        with self.progress.bar(f"upload {len(items)} files", sum(sizes)) as callback:
            if batch:

                def loader(i: int) -> Callable[[], bytes]:
                    progress = FileProgress(callback.relative_update)

                    def load() -> bytes:  # once per attempt
                        local, _, entry_path = items[i]
                        with open(local, "rb") as f:
                            data = f.read()
                        entries[i] = FileEntry(entry_path, len(data), checksum_of(data))
                        progress.attempt().relative_update(len(data))
                        return data

                    return load

                storage.write_many([(items[i][1], loader(i)) for i in batch], self.max_concurrency)
            rest = sorted(set(range(len(items))) - set(batch))
            uploaded = self.run_each(lambda i: upload_file(storage, *items[i], stop, callback), rest, stop)
        for i, entry in zip(rest, uploaded):
            entries[i] = entry
        return tuple(entry for entry in entries if entry is not None)

    def download_files(self, storage: Storage, items: Sequence[tuple[str, FileEntry, str | None]]) -> None:
        """Download and verify ``(rel, entry, local_path or None)`` items concurrently.

        Files that fit one request stream together on an async backend's loop
        (:meth:`Storage.read_many_into`), the others through threads.
        """
        batch: list[tuple[str, FileEntry, str | None]] = []
        rest: list[tuple[str, FileEntry, str | None]] = []
        for item in items:
            (batch if storage.reads_in_batch(item[1].size) else rest).append(item)
        with self.progress.bar(f"download {len(items)} files", sum(entry.size for _, entry, _ in items)) as callback:
            if batch:
                for local_path in (local for _, _, local in batch if local is not None):
                    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
                progresses = [FileProgress(callback.relative_update) for _ in batch]
                openers = [(rel, _attempts_into(local, progress)) for (rel, _, local), progress in zip(batch, progresses)]
                try:
                    hashed = storage.read_many_into(openers, self.max_concurrency, checked_by_caller=True)
                except FileNotFoundError as exc:
                    raise _missing(storage, exc.filename) from exc
                for (rel, entry, local), result, progress in zip(batch, hashed, progresses):
                    try:
                        _check(storage, rel, entry, result.size, result.checksum)
                    except ChecksumMismatch as exc:
                        _read_again(storage, rel, entry, local, progress, exc)
            self.run_each(lambda item: download_verified(storage, *item, callback), rest)

    def run_each(self, work: Callable[[T], R], items: Sequence[T], stop: threading.Event | None = None) -> list[R]:
        """``work`` on every item with at most ``max_concurrency`` at once; results in order.

        The first failure, or an interrupt of the caller (KeyboardInterrupt), cancels
        the items not started and sets ``stop`` for those running (uploads watch it and
        are aborted), then raises once they have ended: the first error, not a
        sibling's reaction to it.
        """
        if len(items) <= 1 or self.max_concurrency == 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(min(self.max_concurrency, len(items)), thread_name_prefix="ckptman-transfer") as pool:
            futures = [pool.submit(work, item) for item in items]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                _raise_first_failure(futures)
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                if stop is not None:
                    stop.set()
                raise  # after the pool's exit has waited for the running items


def _raise_first_failure(futures: Sequence[Future[R]]) -> None:
    """Raise the error of the first finished item that failed: the cause, found before any sibling is stopped."""
    for future in futures:
        error = future.exception() if future.done() and not future.cancelled() else None
        if error is not None:
            raise error
