"""The one byte-and-path layer over fsspec; every backend difference lives here.

Everything above this module speaks in paths relative to the checkpoint
directory ("step_00000100/state.pt") and never touches fsspec directly.

Two kinds of filesystem need different mechanics for the same guarantees:

* **Local disk**: a file is visible as soon as it is opened, so metadata is
  written to a temporary name, fsynced, renamed over the target and the folder
  fsynced (:mod:`ckptman.localdisk`); payload files are fsynced when closed,
  and folders before commit.
* **Object stores and memory**: an object becomes visible only when its upload
  completes, and there is no atomic rename (fsspec's ``mv`` is copy + delete),
  so every write is a single PUT (or a multipart upload completed on close;
  on S3 its parts go up concurrently while the file is written,
  :mod:`ckptman.multipart`).

Conditional replaces and deletes of small files (the lease's compare-and-swap)
differ per backend too; they are :mod:`ckptman.conditional`, used only here.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import io
import os
import posixpath
from typing import IO, Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptman import loopio, multipart, prefetch, transport_checksum
from ckptman.conditional import CompareAndSwap, Versioned, precondition_failed, versions_for
from ckptman.errors import (
    BucketNotFoundError,
    NotADirectoryStorageError,
    StorageError,
    UnsupportedProtocolError,
)
from ckptman.localdisk import TMP_PREFIX, fsync_dir, publish_local
from ckptman.retry import RetryPolicy

T = TypeVar("T")
W = TypeVar("W", bound=loopio.Sink)
SinkOpener = Callable[[], "contextlib.AbstractContextManager[W]"]

_READ_CHUNK = 8 * 2**20

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

DEFAULT_IN_FLIGHT = 16  # CheckpointManager's default max_concurrency
_BOTOCORE_POOL = 10  # botocore's default max_pool_connections
_POOL_HEADROOM = 4  # the lease read and the commit's small objects, beside a full batch of transfers


def sized_connection_pool(url: str, storage_options: Mapping[str, Any], in_flight: int) -> dict[str, Any]:
    """``storage_options`` whose S3 client can carry ``in_flight`` requests at once, unless the user sized its pool.

    botocore (under s3fs) opens at most ``max_pool_connections`` connections,
    10 by default, and queues every request beyond them: a manager moving 16
    files at once waited on the pool, not on the network (16 x 16 MiB through
    a 20 ms, 32 MiB/s-per-connection link: 1.81 s with 10 connections, 1.39 s
    with 20). gcsfs's aiohttp pool holds 100; other backends are left alone.
    """
    options = dict(storage_options)
    if url.split("://", 1)[0] not in ("s3", "s3a") or "config" in (options.get("client_kwargs") or {}):
        return options  # not S3, or the user passes a whole botocore Config: theirs stands
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(_BOTOCORE_POOL, in_flight + _POOL_HEADROOM))
    options["config_kwargs"] = config
    return options


def _open_filesystem(url: str, storage_options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra = _EXTRAS.get(protocol)
        hint = (  # ckptman is not on a package index: name what installs today
            f"pip install {extra}fs (or, from a ckptman checkout, pip install -e '.[{extra}]')"
            if extra
            else "install the fsspec implementation for it"
        )
        raise UnsupportedProtocolError(f"the {protocol!r} protocol needs a package that is not installed: {hint} ({exc})") from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            protocol = url.split("://", 1)[0]
            raise UnsupportedProtocolError(
                f"unknown storage protocol {protocol!r} in {url!r}; use a local path or an fsspec URL such as "
                "s3://bucket/run, gs://bucket/run, memory://run or file:///path"
            ) from exc
        raise


class Storage:
    """A checkpoint directory on any fsspec filesystem."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        """``in_flight``: how many transfers the caller runs at once; the client's connection pool is sized for them."""
        self.retry = retry or RetryPolicy()
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"directory must be a path or URL string, got {type(url).__name__}")
        url = os.fspath(url)
        self.fs, root = _open_filesystem(url, sized_connection_pool(url, storage_options or {}, in_flight))
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # Only the protocol and path: never storage_options, which may hold credentials.
        self.url = self.root if self.is_local else f"{protocol}://{self.root.lstrip('/')}"
        self._versions = versions_for(self.fs, protocol, self.is_local)
        self._open_upload: Callable[[str], Any] = multipart.opener_for(self.fs) or (lambda path: self.fs.open(path, "wb"))
        self._batch_put_limit = multipart.single_put_limit(self.fs) if loopio.is_async(self.fs) else -1
        self._keeps_folder_entries: bool | None = None  # learnt from the first tree removed (see remove)
        self._check_location()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def with_retry(self, retry: RetryPolicy) -> Storage:
        """The same directory with another retry policy (e.g. one attempt for best-effort cleanup)."""
        clone = copy.copy(self)
        clone.retry = retry
        return clone

    # -- paths ---------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def _check_location(self) -> None:
        bucket = self._bucket()
        if bucket is not None:
            # info(), not exists(): s3fs's exists() answers False for an unreachable endpoint too.
            try:
                self._guard("reach the bucket of", "", lambda: self.fs.info(bucket))
            except FileNotFoundError as exc:
                raise BucketNotFoundError(
                    f"bucket {bucket!r} of {self.url} does not exist (or these credentials cannot see it); "
                    "create it first: ckptman never creates buckets"
                ) from exc
        if self._guard("inspect", "", lambda: self.fs.isfile(self.root)):
            raise NotADirectoryStorageError(f"{self.url} is a file, not a directory; point the manager at a directory")

    def _bucket(self) -> str | None:
        """The bucket of an object-store path (filesystems whose paths have no root marker)."""
        if self.fs.root_marker:
            return None
        return self.root.split("/", 1)[0] or None

    # -- reads ---------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return bool(self._guard("check", rel, lambda: self.fs.exists(self.path(rel))))

    def read_bytes(self, rel: str) -> bytes:
        return self._guard("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Read several small files at once (concurrently on async backends); missing ones are left out."""
        if not rels:
            return {}
        full = {self.path(rel): rel for rel in rels}
        found = self._guard("read manifests in", "", lambda: self.fs.cat(list(full), on_error="return"))
        result: dict[str, bytes] = {}
        for path, data in found.items():
            rel = full.get(path) or full.get(self.fs._strip_protocol(path))
            if rel is None:
                continue
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise StorageError(f"reading {self.url}/{rel} failed: {data}") from data
            result[rel] = data
        return result

    def read_into(self, rel: str, open_sink: SinkOpener[W], size: int | None = None, *, checked_by_caller: bool = False) -> W:
        """Copy a file's bytes, in order, into a fresh sink per attempt; returns the sink of the attempt that succeeded.

        A transient error retries the whole read into a new sink. On async
        backends a file of unknown size or up to one range is one streamed
        GET, and a larger one (``size`` from a manifest) has ranged GETs in
        flight while the sink takes the bytes (:mod:`ckptman.prefetch`).
        ``checked_by_caller``: the caller checks every byte against a checksum
        of its own, so the S3 client's is skipped (:mod:`ckptman.transport_checksum`).
        """
        if self.reads_in_batch(size or 0):  # an unknown size streams too: one GET whatever it is
            return self.read_many_into([(rel, open_sink)], 1, checked_by_caller=checked_by_caller)[0]
        path = self.path(rel)

        def attempt() -> W:
            with open_sink() as sink:
                if size and prefetch.can_prefetch(self.fs):
                    with prefetch.RangeReader(self.fs, path, size) as reader:
                        while piece := reader.read():
                            sink.write(piece)
                else:
                    with self.fs.open(path, "rb") as f:
                        while piece := f.read(_READ_CHUNK):
                            sink.write(piece)
            return sink

        return self._guard("read", rel, attempt)

    def downloads_in_ranges(self, size: int) -> bool:
        """Whether :meth:`download_ranges` takes a file of ``size`` bytes (S3, more than one range)."""
        return size > prefetch.RANGE and prefetch.can_download_ranges(self.fs)

    def download_ranges(self, rel: str, local_path: str, size: int, on_bytes: Callable[[int], None]) -> int:
        """Download a large file into ``local_path`` over concurrent ranged GETs; returns the size the object has.

        When that is not ``size`` nothing was downloaded. Each range is
        retried on its own; the caller checks the finished file's checksum.
        """

        def retrying(attempt: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
            return self._guard_async("read", rel, attempt)

        path = self.path(rel)
        return loopio.run(self.fs, lambda: prefetch.download_ranges(self.fs, path, local_path, size, on_bytes, retrying))

    # -- many files at once: coroutines on an async backend's loop (ckptman.loopio) --
    def reads_in_batch(self, size: int) -> bool:
        """Whether :meth:`read_many_into` takes a file of ``size`` bytes (one streamed GET)."""
        return size <= prefetch.RANGE and loopio.can_stream(self.fs)

    def writes_in_batch(self, size: int) -> bool:
        """Whether :meth:`write_many` takes a file of ``size`` bytes (one PUT, as :meth:`write_file` would send)."""
        return size <= self._batch_put_limit

    def read_many_into(self, items: Sequence[tuple[str, SinkOpener[W]]], limit: int, *, checked_by_caller: bool = False) -> list[W]:
        """:meth:`read_into` for many files (each one streamed GET), ``limit`` in flight; sinks in order.

        The first failure (after its retries) cancels the rest and is raised;
        a missing file is a FileNotFoundError whose ``filename`` is its ``rel``.
        """

        async def one(rel: str, open_sink: SinkOpener[W]) -> W:
            path = self.path(rel)

            async def attempt() -> W:
                checked: contextlib.AbstractAsyncContextManager[None] = (
                    transport_checksum.checked_by_caller(self.fs, path) if checked_by_caller else contextlib.nullcontext()
                )
                async with checked:
                    with open_sink() as sink:
                        await loopio.stream_into(self.fs, path, sink)
                return sink

            try:
                return await self._guard_async("read", rel, attempt)
            except FileNotFoundError as exc:
                raise FileNotFoundError(errno.ENOENT, "no such file", rel) from exc

        jobs = [functools.partial(one, rel, open_sink) for rel, open_sink in items]
        return loopio.run(self.fs, lambda: loopio.bounded(jobs, limit))

    def write_many(self, items: Sequence[tuple[str, Callable[[], bytes]]], limit: int) -> None:
        """Store many small payload files, each one PUT of ``load()``'s bytes, ``limit`` in flight.

        ``load`` runs on the loop for every attempt (so it must be quick, e.g.
        read and hash a local file). The first failure (after its retries)
        cancels the rest and is raised; the files already stored stay in
        their uncommitted folder, as after a failed :meth:`write_file`.
        """

        async def one(rel: str, load: Callable[[], bytes]) -> None:
            await self._guard_async("write", rel, lambda: self.fs._pipe_file(self.path(rel), load()))

        jobs = [functools.partial(one, rel, load) for rel, load in items]
        loopio.run(self.fs, lambda: loopio.bounded(jobs, limit))

    def list_folders(self) -> list[str]:
        """Names of the sub-folders of the directory, read fresh (no cached listing)."""

        def listing() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(self.root)
            try:
                return self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []

        entries = self._guard("list", "", listing)
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry.get("type") == "directory" and entry["name"].rstrip("/") != self.root
        )

    def list_files(self, rel: str) -> list[str]:
        """Every file below a folder, as sorted paths relative to it, read fresh (no cached listing)."""
        base = self.path(rel)

        def listing() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                return self.fs.find(base)
            except FileNotFoundError:
                return []

        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        found = (self.fs._strip_protocol(path) for path in self._guard("list", rel, listing))
        return sorted(path[len(prefix) :] for path in found if path.startswith(prefix))

    def local_path(self, rel: str) -> str | None:
        """The real path on local disk, or None when the directory is not local."""
        return self.path(rel) if self.is_local else None

    # -- writes --------------------------------------------------------------
    def write_file(self, rel: str, produce: Callable[[IO[bytes]], T], stopped: Callable[[], bool] | None = None) -> T:
        """Let ``produce`` write a payload file; durable (local: fsynced) when this returns.

        On a transient storage error the whole file is written again, so
        ``produce`` must be repeatable (``torch.save`` of in-memory state is).
        Payload files live in a folder that is not committed yet, so they need
        no temporary name: without the manifest the folder does not count.
        On object stores a failed upload is aborted, never published part-way,
        and so is one whose caller gave up (``stopped()`` true) while its last
        bytes went up: ``UploadStopped`` then, and nothing is published.
        """
        path = self.path(rel)

        def local() -> T:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                result = _run_producer(produce, f)
                f.flush()
                os.fsync(f.fileno())
            return result

        def remote() -> T:
            f = self._open_upload(path)
            try:
                result = _run_producer(produce, f)
                _publish(f, stopped, rel)  # its failure must abort too
            except BaseException:
                _abandon(f)
                raise
            return result

        try:
            return self._guard("write", rel, local if self.is_local else remote)
        except _ProducerError as failed:
            raise failed.error from None

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small metadata file so readers see the old or the new bytes, never a mix."""
        path = self.path(rel)
        if not self.is_local:
            self._guard("write", rel, lambda: self.fs.pipe_file(path, data))
            return
        self._guard("write", rel, lambda: publish_local(path, data, exclusive=False))

    def write_atomic_many(self, files: Mapping[str, bytes]) -> None:
        """:meth:`write_atomic` of several small files; concurrently on async backends (one round trip)."""
        if self.is_local:
            for rel, data in files.items():
                self.write_atomic(rel, data)
            return
        paths = {self.path(rel): data for rel, data in files.items()}
        self._guard("write", ", ".join(files), lambda: self.fs.pipe(paths))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a small file only if nothing is there; False if it exists. The primitive behind the lease.

        Local disk: write a temporary file, then ``link`` it to the name (atomic,
        fails if the name exists, never leaves a partial file). Object stores:
        a conditional create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``)
        through fsspec's ``mode="create"``.
        """
        path = self.path(rel)

        def local() -> bool:
            return publish_local(path, data, exclusive=True)

        def remote() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except OSError as exc:
                if precondition_failed(exc):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(path)
            return True

        return bool(self._guard("create", rel, local if self.is_local else remote))

    # -- compare-and-swap of small files (the lease) --------------------------
    @property
    def compare_and_swap(self) -> CompareAndSwap:
        """How this backend makes :meth:`replace_if` and :meth:`remove_if` conditional."""
        return self._versions.kind

    def read_versioned(self, rel: str) -> Versioned:
        """A small file and the version token of exactly those bytes, in one request; FileNotFoundError if absent."""
        return self._guard("read", rel, lambda: self._versions.read(self.fs, self.path(rel)))

    def replace_if(self, rel: str, data: bytes, expected: Versioned) -> bool:
        """Replace a small file only if it is still the version read; False if it changed or is gone.

        A retried request whose first attempt landed answers False too (the
        version changed: by this very write); callers re-read to tell.
        """
        return bool(self._guard("replace", rel, lambda: self._versions.replace(self.fs, self.path(rel), data, expected)))

    def remove_if(self, rel: str, expected: Versioned) -> bool:
        """Delete a small file only if it is still the version read; False if it changed (gone counts as done)."""
        return bool(self._guard("delete", rel, lambda: self._versions.remove(self.fs, self.path(rel), expected)))

    def sync_folder(self, rel: str) -> None:
        """Make the folder's entries durable before it is committed (local disk only)."""
        if not self.is_local:
            return
        top = self.path(rel)
        for folder, _dirs, _files in os.walk(top):
            fsync_dir(folder)
        fsync_dir(os.path.dirname(top))

    def ensure_directory(self) -> None:
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Delete a file or a folder tree; already gone is fine.

        Some object stores (SeaweedFS and other filer-backed S3 gateways) keep
        listing a folder after its last object is deleted. The first tree
        removed on an object store finds out whether this one does; only then
        are the folder entries deleted too (innermost first), so other stores
        pay no extra request per deletion.
        """
        path = self.path(rel)

        def delete() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass
            finally:
                self.fs.invalidate_cache(path)

        self._guard("delete", rel, delete)
        if recursive and not self.is_local and self._keeps_folder_entries is not False:
            lingering = self._keeps_folder_entries or self._guard("check", rel, lambda: self.fs.exists(path))
            if lingering:
                self._guard("delete", rel, lambda: self._remove_folder_entries(path))
            if self._keeps_folder_entries is None:
                self._keeps_folder_entries = lingering

    def _remove_folder_entries(self, top: str) -> None:
        folders = [folder for folder, _dirs, _files in self.fs.walk(top)]
        for folder in sorted(folders, key=len, reverse=True):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(folder)
        self.fs.invalidate_cache(top)

    def is_empty_folder(self, rel: str) -> bool:
        """Whether a listed folder holds no file (an empty local folder, an object store's leftover entry).

        On an object store a listed folder without objects proves that the
        store keeps folder entries (see :meth:`remove`).
        """
        empty = not self.list_files(rel)
        if empty and not self.is_local:
            self._keeps_folder_entries = True
        return empty

    def remove_temporaries(self) -> list[str]:
        """Delete temporary metadata files an interrupted local write left (top level and checkpoint folders)."""
        if not self.is_local or not os.path.isdir(self.root):
            return []
        folders = [self.root] + [entry.path for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False)]
        leftovers = [
            os.path.join(folder, name) for folder in folders for name in os.listdir(folder) if name.startswith(TMP_PREFIX)
        ]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return leftovers

    # -- errors --------------------------------------------------------------
    def _guard(self, action: str, rel: str, call: Callable[[], T]) -> T:
        """Run one storage operation with retries; a final failure becomes a StorageError naming the place.

        A missing file stays a FileNotFoundError: callers decide what absence means.
        """
        where = self._where(rel)
        try:
            return self.retry.call(call, f"{action} {where}")
        except _PASSED_ON:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend's error, turned into one typed error
            raise _failed(action, where, exc) from exc

    async def _guard_async(self, action: str, rel: str, call: Callable[[], Awaitable[T]]) -> T:
        """:meth:`_guard` for a coroutine on the backend's loop."""
        where = self._where(rel)
        try:
            return await self.retry.call_async(call, f"{action} {where}")
        except _PASSED_ON:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _guard
            raise _failed(action, where, exc) from exc

    def _where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url


def _failed(action: str, where: str, exc: Exception) -> StorageError:
    return StorageError(f"could not {action} {where}: {type(exc).__name__}: {exc}")


class UploadStopped(Exception):
    """The caller gave up on an upload (a sibling failed, or it was interrupted): aborted, never published."""


class _ProducerError(Exception):
    """The caller's producer failed on its own (e.g. an unpicklable object): not a storage error, never retried."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _TrackedWrites(io.RawIOBase):
    """Passes writes through and remembers whether the storage side failed."""

    def __init__(self, target: IO[bytes]) -> None:
        super().__init__()
        self.target = target
        self.failure: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        try:
            self.target.write(data)
        except BaseException as exc:
            self.failure = exc
            raise
        return memoryview(data).nbytes

    def flush(self) -> None:
        try:
            self.target.flush()
        except BaseException as exc:
            self.failure = exc
            raise


_PASSED_ON = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StorageError, _ProducerError, UploadStopped)
"""Errors that keep their type through the storage layer: their callers tell them apart."""


def _run_producer(produce: Callable[[IO[bytes]], T], target: IO[bytes]) -> T:
    """Run the producer; tell its own failures apart from the storage's, which alone are retried."""
    tracked = _TrackedWrites(target)
    try:
        return produce(tracked)  # type: ignore[arg-type]
    except Exception as exc:
        if tracked.failure is not None:
            raise tracked.failure  # noqa: B904 - the storage's own error is what the retry judges
        raise _ProducerError(exc) from exc


def _publish(f: Any, stopped: Callable[[], bool] | None, rel: str) -> None:
    """Complete an upload, unless the caller gave up while its last bytes went up.

    A concurrent upload (:class:`ckptman.multipart.PartUpload`) sends its last
    part and waits for every part first, so the question is asked just before
    the completion makes the file visible.
    """
    finish = getattr(f, "finish_parts", None)
    if finish is not None:
        finish()
    if stopped is not None and stopped():
        raise UploadStopped(f"upload of {rel} stopped")
    f.close()


def _abandon(f: Any) -> None:
    """Drop a half-written upload: abort it (multipart / resumable) and never publish it on close."""
    with contextlib.suppress(Exception):
        f.discard()
    with contextlib.suppress(AttributeError):  # io-based files (memory://) publish only on close
        f.closed = True
