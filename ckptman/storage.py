"""The one byte-and-path layer over fsspec; every backend difference lives here.

Everything above this module speaks in paths relative to the checkpoint
directory ("step_00000100/state.pt") and never touches fsspec directly.

Two kinds of filesystem need different mechanics for the same guarantees:

* **Local disk**: a file is visible as soon as it is opened, so metadata is
  written to a temporary name, fsynced, renamed over the target and the folder
  fsynced; payload files are fsynced when closed, and folders before commit.
* **Object stores and memory**: an object becomes visible only when its upload
  completes, and there is no atomic rename (fsspec's ``mv`` is copy + delete),
  so every write is a single PUT (or a multipart upload completed on close).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import io
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any, Callable, Mapping, TypeVar
from urllib.parse import quote

import xxhash

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from ckptman.errors import (
    BucketNotFoundError,
    NotADirectoryStorageError,
    StorageError,
    UnsupportedProtocolError,
)
from ckptman.retry import RetryPolicy

T = TypeVar("T")
logger = logging.getLogger("ckptman")

_TMP_PREFIX = ".ckptman-tmp-"
# Locked instead of the folder where a folder cannot be (NFS); see _LocalVersions. Never deleted.
_GUARD_NAME = ".ckptman-guard"
_NO_FOLDER_LOCKS = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def _open_filesystem(url: str, storage_options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'ckptman[{extra}]'" if extra else "install the fsspec implementation for it"
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
        self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.retry = retry or RetryPolicy()
        if not isinstance(url, (str, os.PathLike)):
            raise TypeError(f"directory must be a path or URL string, got {type(url).__name__}")
        self.fs, root = _open_filesystem(os.fspath(url), dict(storage_options or {}))
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        # Only the protocol and path: never storage_options, which may hold credentials.
        self.url = self.root if self.is_local else f"{protocol}://{self.root.lstrip('/')}"
        self._versions = _versions_for(self.fs, protocol, self.is_local)
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

    def read_file(self, rel: str, consume: Callable[[IO[bytes]], T]) -> T:
        """Open a file and let ``consume`` read it; the whole read is retried on a transient error."""

        def attempt() -> T:
            with self.fs.open(self.path(rel), "rb") as f:
                return consume(f)

        return self._guard("read", rel, attempt)

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
    def write_file(self, rel: str, produce: Callable[[IO[bytes]], T]) -> T:
        """Let ``produce`` write a payload file; durable (local: fsynced) when this returns.

        On a transient storage error the whole file is written again, so
        ``produce`` must be repeatable (``torch.save`` of in-memory state is).
        Payload files live in a folder that is not committed yet, so they need
        no temporary name: without the manifest the folder does not count.
        On object stores a failed upload is aborted, never published part-way.
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
            f = self.fs.open(path, "wb")
            try:
                result = _run_producer(produce, f)
                f.close()  # uploads the last part and completes the upload: its failure must abort too
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
        self._guard("write", rel, lambda: _publish_local(path, data, exclusive=False))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a small file only if nothing is there; False if it exists. The primitive behind the lease.

        Local disk: write a temporary file, then ``link`` it to the name (atomic,
        fails if the name exists, never leaves a partial file). Object stores:
        a conditional create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``)
        through fsspec's ``mode="create"``.
        """
        path = self.path(rel)

        def local() -> bool:
            return _publish_local(path, data, exclusive=True)

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
            _fsync_dir(folder)
        _fsync_dir(os.path.dirname(top))

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
            os.path.join(folder, name) for folder in folders for name in os.listdir(folder) if name.startswith(_TMP_PREFIX)
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
        where = f"{self.url}/{rel}" if rel else self.url
        try:
            return self.retry.call(call, f"{action} {where}")
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StorageError, _ProducerError):
            raise
        except Exception as exc:  # noqa: BLE001 - any backend's error, turned into one typed error
            raise StorageError(f"could not {action} {where}: {type(exc).__name__}: {exc}") from exc


CompareAndSwap = str
"""``"server"``: the store checks the condition (S3 ``If-Match``, GCS ``ifGenerationMatch``);
``"local"``: a file lock on this filesystem serialises the compare and the replace;
``"process"``: one process owns the filesystem (``memory://``), a lock in it suffices;
``"none"``: no conditional replace is known for the backend: a plain read-then-write."""


@dataclass(frozen=True)
class Versioned:
    """A small file's bytes and a token naming exactly that version (ETag, generation, content hash)."""

    data: bytes
    version: str


def precondition_failed(exc: BaseException) -> bool:
    """Whether a store refused a conditional write because its condition did not hold (HTTP 412).

    s3fs turns a 412 into ``FileExistsError`` only when the XML names the
    ``If-None-Match`` condition; SeaweedFS, versitygw and others omit that
    element, which s3fs reports as ``OSError(EINVAL, "At least one of the
    pre-conditions you specified did not hold")``. gcsfs raises
    ``FileExistsError`` for every 412.
    """
    for error in (exc, exc.__cause__):
        if isinstance(error, FileExistsError):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            if response.get("Error", {}).get("Code") == "PreconditionFailed":
                return True
            if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return True
        if getattr(error, "code", None) == 412:
            return True
    return isinstance(exc, OSError) and "pre-conditions you specified did not hold" in str(exc)


def _content_version(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class _PlainVersions:
    """No conditional replace: read, then write unconditionally (what every backend supports)."""

    kind: CompareAndSwap = "none"
    _READ_LIMIT = 1 << 20

    def read(self, fs: Any, path: str) -> Versioned:
        data = fs.cat_file(path, start=0, end=self._READ_LIMIT)
        return Versioned(data, _content_version(data))

    def replace(self, fs: Any, path: str, data: bytes, expected: Versioned) -> bool:
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return True

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
        fs.invalidate_cache(path)
        return True


class _ProcessVersions(_PlainVersions):
    """``memory://`` lives in one process: a lock there makes compare-and-replace atomic."""

    kind: CompareAndSwap = "process"
    _lock = threading.Lock()

    def _still(self, fs: Any, path: str, expected: Versioned) -> bool:
        try:
            return _content_version(fs.cat_file(path)) == expected.version
        except FileNotFoundError:
            return False

    def replace(self, fs: Any, path: str, data: bytes, expected: Versioned) -> bool:
        with self._lock:
            return self._still(fs, path, expected) and super().replace(fs, path, data, expected)

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        with self._lock:
            return not fs.exists(path) or (self._still(fs, path, expected) and super().remove(fs, path, expected))


class _LocalVersions:
    """Local disk: compare and replace under an exclusive ``flock`` of the folder holding the file.

    POSIX has no compare-and-rename, so the lock serialises every conditional
    replace (and delete) between processes; the replace itself is still a
    temporary file renamed over the target, so readers never need the lock.
    Where folders cannot be locked (NFS) a guard file beside it is locked instead.
    A process killed while holding it releases it (the kernel drops the lock);
    one stopped (SIGSTOP) inside the few-microsecond window holds it, so the
    wait is bounded.
    """

    kind: CompareAndSwap = "local"
    _WAIT = 30.0

    def read(self, fs: Any, path: str) -> Versioned:
        with open(path, "rb") as f:
            data = f.read()
        return Versioned(data, _content_version(data))

    @contextlib.contextmanager
    def _guard(self, path: str) -> Any:
        folder = os.path.dirname(path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            try:
                self._lock(fd, folder)
            except OSError as exc:
                if isinstance(exc, BlockingIOError) or exc.errno not in _NO_FOLDER_LOCKS:
                    raise
                # NFS emulates flock with byte-range locks, which need a file open for writing.
                os.close(fd)
                fd = os.open(os.path.join(folder, _GUARD_NAME), os.O_RDWR | os.O_CREAT, 0o644)
                self._lock(fd, folder)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _lock(self, fd: int, folder: str) -> None:
        import fcntl

        deadline = time.monotonic() + self._WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"the lock on {folder} stayed taken for {self._WAIT:g}s: a process holding it is stopped; "
                        "resume or kill it, then retry"
                    ) from None
                time.sleep(0.005)

    def _still(self, path: str, expected: Versioned) -> bool:
        try:
            return self.read(None, path).version == expected.version
        except FileNotFoundError:
            return False

    def replace(self, fs: Any, path: str, data: bytes, expected: Versioned) -> bool:
        with self._guard(path):
            return self._still(path, expected) and _publish_local(path, data, exclusive=False)

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        with self._guard(path):
            if not os.path.exists(path):
                return True
            if not self._still(path, expected):
                return False
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))
            return True


class _S3Versions(_PlainVersions):
    """S3 and S3-compatible stores: ``If-Match: <ETag>`` on PutObject and DeleteObject."""

    kind: CompareAndSwap = "server"

    def read(self, fs: Any, path: str) -> Versioned:
        bucket, key, _ = fs.split_path(path)

        async def get() -> Versioned:
            # One GET answers both: the bytes and the ETag of exactly those bytes.
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{self._READ_LIMIT - 1}")
            try:
                return Versioned(await response["Body"].read(), response["ETag"])
            finally:
                response["Body"].close()

        return fsspec.asyn.sync(fs.loop, get)

    def replace(self, fs: Any, path: str, data: bytes, expected: Versioned) -> bool:
        # AWS and moto answer 404 to If-Match on a missing key, SeaweedFS 412: both mean "not the version read".
        return _conditional(fs, path, lambda: fs.pipe_file(path, data, IfMatch=expected.version), if_gone=False)

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        bucket, key, _ = fs.split_path(path)
        delete = functools.partial(
            fsspec.asyn.sync, fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=expected.version
        )
        return _conditional(fs, path, delete, if_gone=True)


class _GCSVersions(_PlainVersions):
    """Google Cloud Storage: ``ifGenerationMatch=<generation>`` on uploads and deletes."""

    kind: CompareAndSwap = "server"

    def read(self, fs: Any, path: str) -> Versioned:
        headers, data = fsspec.asyn.sync(
            fs.loop, fs._call, "GET", fs.url(path), headers={"Range": f"bytes=0-{self._READ_LIMIT - 1}"}
        )
        return Versioned(data, str(headers["X-Goog-Generation"]))

    def replace(self, fs: Any, path: str, data: bytes, expected: Versioned) -> bool:
        bucket, key, _ = fs.split_path(path)
        # gcsfs's uploads know only "create" (generation 0), so the multipart upload it sends is spelled out here.
        body = (
            b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
            + json.dumps({"name": key}).encode()
            + b"\n--==0==\nContent-Type: application/octet-stream\n\n"
            + data
            + b"\n--==0==--"
        )
        upload = functools.partial(
            fsspec.asyn.sync,
            fs.loop,
            fs._call,
            "POST",
            f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="multipart",
            ifGenerationMatch=expected.version,
            headers={"Content-Type": 'multipart/related; boundary="==0=="'},
            data=body,
            json_out=True,
        )
        return _conditional(fs, path, upload, if_gone=False)

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        bucket, key, _ = fs.split_path(path)
        delete = functools.partial(
            fsspec.asyn.sync, fs.loop, fs._call, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=expected.version
        )
        return _conditional(fs, path, delete, if_gone=True)


def _conditional(fs: Any, path: str, request: Callable[[], object], *, if_gone: bool) -> bool:
    """Send a conditional request: True if it took effect, False if its condition did not hold.

    ``if_gone`` answers for an object that is not there (a delete is then done, a replace is not).
    """
    try:
        request()
    except FileNotFoundError:
        return if_gone
    except OSError as exc:
        if precondition_failed(exc):
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


def _versions_for(fs: Any, protocol: str, is_local: bool) -> _PlainVersions | _LocalVersions:
    """The compare-and-swap mechanics of one filesystem, chosen once by its protocol."""
    if is_local:
        return _LocalVersions()
    if protocol in ("s3", "s3a") and hasattr(fs, "_call_s3"):
        return _S3Versions()
    if protocol in ("gs", "gcs") and hasattr(fs, "_call") and hasattr(fs, "_location"):
        return _GCSVersions()
    if protocol == "memory":
        return _ProcessVersions()
    return _PlainVersions()


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


def _run_producer(produce: Callable[[IO[bytes]], T], target: IO[bytes]) -> T:
    """Run the producer; tell its own failures apart from the storage's, which alone are retried."""
    tracked = _TrackedWrites(target)
    try:
        return produce(tracked)  # type: ignore[arg-type]
    except Exception as exc:
        if tracked.failure is not None:
            raise tracked.failure  # noqa: B904 - the storage's own error is what the retry judges
        raise _ProducerError(exc) from exc


def _abandon(f: Any) -> None:
    """Drop a half-written upload: abort it (multipart / resumable) and never publish it on close."""
    with contextlib.suppress(Exception):
        f.discard()
    with contextlib.suppress(AttributeError):  # io-based files (memory://) publish only on close
        f.closed = True


def _write_temporary(folder: str, name: str, data: bytes) -> str:
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _publish_local(path: str, data: bytes, *, exclusive: bool) -> bool:
    """Temporary file and fsync, then rename over the target (or, exclusive, link it: fails if the name exists),
    then fsync the folder. Readers see the old bytes or the new ones, never a partial file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _write_temporary(folder, os.path.basename(path), data)
    try:
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(folder)
    return True


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
