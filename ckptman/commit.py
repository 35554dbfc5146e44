"""The commit protocol: what makes a checkpoint exist, and what makes it stop existing.

Save sequence as one process sees it (across ranks, which rank runs which
step is :mod:`ckptman.saving`):

1. Remove any leftover folder of the same name: it has no manifest, so it is
   the debris of an interrupted save and was never visible.
2. Write every payload file into ``<directory>/<name>/``, each checksummed
   while it streams (local disk: each file fsynced on close).
3. Make the folder's entries durable (local disk: fsync every folder).
4. **Commit**: write ``<name>/ckptman-manifest.json`` in one call, last.
   Local disk: temporary name, fsync, rename, fsync folder. Object stores: one
   PUT, visible only when complete. No copy or rename of payload data.
5. Then ``latest`` moves, retention runs and the sidecar is written
   (:meth:`ckptman.bookkeeping.Bookkeeper.commit`).

Delete sequence: the manifest first, then the rest of the folder, so a crash
mid-delete leaves a folder without manifest (ignored, later cleaned up),
never one that looks complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ckptman.errors import ManifestError
from ckptman.manifest import MANIFEST_NAME, Manifest
from ckptman.naming import LATEST_NAME
from ckptman.state import SIDECAR_NAME, SidecarState
from ckptman.storage import Storage

logger = logging.getLogger("ckptman")


def manifest_path(name: str) -> str:
    return f"{name}/{MANIFEST_NAME}"


@dataclass
class Scan:
    """What one listing of the directory found."""

    committed: dict[str, Manifest] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


def scan(storage: Storage, is_checkpoint_name: Callable[[str], bool]) -> Scan:
    """List the directory and read every manifest (concurrently where the backend can).

    Folders whose manifest cannot be parsed are reported, never deleted: they
    may be written by a newer ckptman. Folders without a manifest count as
    incomplete only when their name is one this manager would have written.
    """
    folders = storage.list_folders()
    raw = storage.read_many([manifest_path(name) for name in folders])
    found = Scan()
    for name in folders:
        data = raw.get(manifest_path(name))
        if data is None:
            if is_checkpoint_name(name):
                found.incomplete.append(name)
            continue
        source = f"{storage.url}/{manifest_path(name)}"
        try:
            manifest = Manifest.from_bytes(data, source)
            if manifest.name != name:
                raise ManifestError(f"{source} names folder {manifest.name!r}; it was copied or renamed by hand")
        except ManifestError as exc:
            found.unreadable[name] = str(exc)
            continue
        found.committed[name] = manifest
    return found


def commit(storage: Storage, manifest: Manifest) -> None:
    """Steps 3 and 4 of the save sequence: durable folder, then the manifest in one write."""
    storage.sync_folder(manifest.name)
    storage.write_atomic(manifest_path(manifest.name), manifest.to_bytes())


def rewrite(storage: Storage, manifest: Manifest) -> None:
    """Replace a committed manifest (later metrics); readers see the old or the new one, whole."""
    storage.write_atomic(manifest_path(manifest.name), manifest.to_bytes())


def uncommit(storage: Storage, name: str) -> None:
    """The delete sequence: manifest first, then the payload."""
    storage.remove(manifest_path(name))
    storage.remove(name, recursive=True)


def discard(storage: Storage, name: str) -> None:
    """Remove an uncommitted folder (a failed or abandoned save)."""
    storage.remove(name, recursive=True)


def discard_incomplete(storage: Storage, name: str) -> None:
    """Remove a checkpoint folder that has no manifest; warn only when it held files.

    A folder with payload bytes and no manifest is an interrupted save. One
    with no file left is not: some object stores (SeaweedFS) keep listing a
    prefix after its last object is gone, e.g. deleted by retention, and a
    warning on every reopen for those would teach users to ignore warnings.
    """
    if storage.is_empty_folder(name):
        logger.debug("removing empty folder %s/%s", storage.url, name)
    else:
        logger.warning("removing incomplete checkpoint folder %s/%s (no manifest: an interrupted save)", storage.url, name)
    discard(storage, name)


def write_sidecar(storage: Storage, state: SidecarState) -> None:
    storage.write_atomic(SIDECAR_NAME, state.to_bytes())


def read_sidecar(storage: Storage) -> SidecarState:
    """The stored sidecar; FileNotFoundError when absent, ManifestError when unreadable."""
    return SidecarState.from_bytes(storage.read_bytes(SIDECAR_NAME), f"{storage.url}/{SIDECAR_NAME}")


def write_latest(storage: Storage, name: str | None) -> None:
    """Point ``latest`` (what DeepSpeed's load_checkpoint reads) at a committed folder, or remove it."""
    if name is None:
        storage.remove(LATEST_NAME)
    else:
        storage.write_atomic(LATEST_NAME, name.encode())


def write_latest_and_sidecar(storage: Storage, name: str, state: SidecarState) -> None:
    """``latest`` and the sidecar after a commit that deleted nothing, in one call (concurrent on object stores)."""
    storage.write_atomic_many({LATEST_NAME: name.encode(), SIDECAR_NAME: state.to_bytes()})


def read_latest(storage: Storage) -> str | None:
    try:
        return storage.read_bytes(LATEST_NAME).decode().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
