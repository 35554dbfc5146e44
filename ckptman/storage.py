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
import os
import posixpath
import uuid
from typing import IO, Any, Iterator, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptman.errors import (
    BucketNotFoundError,
    NotADirectoryStorageError,
    StorageError,
    UnsupportedProtocolError,
)

_TMP_PREFIX = ".ckptman-tmp-"
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

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
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
        self._check_location()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

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

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with self._guard("open", rel, lambda: self.fs.open(self.path(rel), "rb")) as f:
            yield f

    def list_folders(self) -> list[str]:
        """Names of the sub-folders of the directory, read fresh (no cached listing)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 - turned into a typed error naming the place
            raise StorageError(f"listing {self.url} failed: {exc}") from exc
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry.get("type") == "directory" and entry["name"].rstrip("/") != self.root
        )

    def list_files(self, rel: str) -> list[str]:
        """Every file below a folder, as paths relative to that folder."""
        base = self.path(rel)
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in (self.fs._strip_protocol(f) for f in found) if p.startswith(prefix))

    def local_path(self, rel: str) -> str | None:
        """The real path on local disk, or None when the directory is not local."""
        return self.path(rel) if self.is_local else None

    # -- writes --------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A payload file; it is durable (local: fsynced) once the block exits cleanly.

        Payload files live in a folder that is not committed yet, so they need
        no temporary name: without the manifest the folder does not count.
        """
        path = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            return
        with self._guard("open for writing", rel, lambda: self.fs.open(path, "wb")) as f:
            yield f

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small metadata file so readers see the old or the new bytes, never a mix."""
        path = self.path(rel)
        if not self.is_local:
            self._guard("write", rel, lambda: self.fs.pipe_file(path, data))
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

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
        """Delete a file or a folder tree; already gone is fine."""
        path = self.path(rel)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"deleting {self.url}/{rel} failed: {exc}") from exc
        finally:
            self.fs.invalidate_cache(path)

    def remove_temporaries(self) -> list[str]:
        """Delete leftover temporary metadata files of an interrupted local write."""
        if not self.is_local or not os.path.isdir(self.root):
            return []
        leftovers = [name for name in os.listdir(self.root) if name.startswith(_TMP_PREFIX)]
        for name in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, name))
        return leftovers

    # -- errors --------------------------------------------------------------
    def _guard(self, action: str, rel: str, call: Any) -> Any:
        """Run one fsspec call; anything but a missing file becomes a StorageError naming the place."""
        try:
            return call()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except Exception as exc:  # noqa: BLE001
            where = f"{self.url}/{rel}" if rel else self.url
            raise StorageError(f"could not {action} {where}: {type(exc).__name__}: {exc}") from exc


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
