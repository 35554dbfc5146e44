"""Conditional writes of small files: the compare-and-swap behind the lease, per backend.

Part of the storage layer (:mod:`ckptman.storage` is the only user): each
kind of filesystem gets one object that reads a file together with a token
naming exactly that version, and replaces or deletes it only if it is still
that version. Which object a filesystem gets is decided once, by protocol,
in :func:`versions_for`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import fsspec.asyn
import xxhash

from ckptman.errors import StorageError
from ckptman.localdisk import fsync_dir, publish_local

# Locked instead of the folder where a folder cannot be (NFS); see _LocalVersions. Never deleted.
GUARD_NAME = ".ckptman-guard"
_NO_FOLDER_LOCKS = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


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
                fd = os.open(os.path.join(folder, GUARD_NAME), os.O_RDWR | os.O_CREAT, 0o644)
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
            return self._still(path, expected) and publish_local(path, data, exclusive=False)

    def remove(self, fs: Any, path: str, expected: Versioned) -> bool:
        with self._guard(path):
            if not os.path.exists(path):
                return True
            if not self._still(path, expected):
                return False
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
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


def versions_for(fs: Any, protocol: str, is_local: bool) -> _PlainVersions | _LocalVersions:
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
