"""Checkpoint kinds: how each one's files are written on a rank and read back.

A checkpoint's manifest names its kind; each kind is one object here:

* ``state``: one ``torch.save`` file, ``<name>/state.pt``, written by rank 0
  (a plain save holds replicated state, as under DDP);
* ``directory``: any files a ``save_directory()`` block wrote, uploaded by
  the rank that wrote them;
* ``sharded``: torch.distributed.checkpoint files, every rank its own share,
  resharded on load.

Writers return the :class:`FileEntry` of each file this rank stored, which
rank 0 gathers into the manifest (see :mod:`ckptman.saving`). Every path of a
file inside a checkpoint is built by :func:`file_path`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from ckptman import restore, transfer, verify
from ckptman import sharded as sharded_io
from ckptman.distributed import Coordinator
from ckptman.errors import CorruptCheckpointError, ReservedNameError, WrongCheckpointKindError
from ckptman.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptman.record import CheckpointKind
from ckptman.storage import Storage
from ckptman.transfer import Transfers

STATE_FILE = "state.pt"


def file_path(name: str, path: str) -> str:
    """A file of checkpoint folder ``name``, relative to the directory."""
    return f"{name}/{path}"


@dataclass(frozen=True)
class Place:
    """Where checkpoints go and how bytes move there: what every kind needs."""

    storage: Storage
    transfers: Transfers
    storage_options: Mapping[str, Any]

    def folder_url(self, name: str) -> str:
        return f"{self.storage.url}/{name}"


def loading_call(manifest: Manifest) -> str:
    """The manager call that loads this checkpoint's kind (for errors that send the caller there)."""
    return {
        "state": "restore() without sharded=True",
        "sharded": "restore(sharded=True, state=...)",
        "directory": f"restore_directory({manifest.step})",
    }[manifest.kind]


def require_kind(manifest: Manifest, kind: CheckpointKind) -> None:
    """Refuse to load a checkpoint through the call meant for another kind, naming the right call."""
    if manifest.kind != kind:
        raise WrongCheckpointKindError(manifest.name, manifest.kind, loading_call(manifest))


class StateFile:
    kind: CheckpointKind = "state"

    @staticmethod
    def write(place: Place, ranks: Coordinator, payload: Any, name: str) -> list[FileEntry]:
        if not ranks.is_coordinator:
            return []
        rel = file_path(name, STATE_FILE)
        return [place.transfers.write(place.storage, rel, lambda f: restore.save_state(payload, f), STATE_FILE)]

    @staticmethod
    def load(place: Place, manifest: Manifest, map_location: Any, weights_only: bool) -> Any:
        require_kind(manifest, "state")
        rel = file_path(manifest.name, STATE_FILE)
        with transfer.verified_local_copy(place.storage, rel, restore.entry(manifest, STATE_FILE)) as path:
            return restore.load_state(manifest, path, map_location, weights_only)


class Directory:
    kind: CheckpointKind = "directory"

    @staticmethod
    def upload(place: Place, staging: str, step: int, name: str) -> tuple[FileEntry, ...]:
        files = transfer.local_files(staging)
        if MANIFEST_NAME in files:
            raise ReservedNameError(f"save_directory({step}) wrote {MANIFEST_NAME}, a name ckptman reserves; rename it")
        items = [(os.path.join(staging, path), file_path(name, path), path) for path in files]
        return place.transfers.upload_files(place.storage, items)

    @staticmethod
    def fetch(place: Place, manifest: Manifest, local_dir: str | os.PathLike[str] | None) -> str:
        """The checkpoint's files in a local folder, verified: in place on local disk without ``local_dir``."""
        in_place = place.storage.local_path(manifest.name) if local_dir is None else None
        target = in_place or os.fspath(local_dir or tempfile.mkdtemp(prefix=f"ckptman-restore-{manifest.step}-"))
        items = [
            (file_path(manifest.name, entry.path), entry, None if in_place else os.path.join(target, *entry.path.split("/")))
            for entry in manifest.files
        ]
        try:
            place.transfers.download_files(place.storage, items)
        except BaseException:
            for _, _, path in items:  # leave no mix of two checkpoints behind a fallback
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            raise
        return target


class Sharded:
    kind: CheckpointKind = "sharded"

    @staticmethod
    def write(place: Place, ranks: Coordinator, payload: Any, name: str) -> list[FileEntry]:
        sharded_io.save(payload, place.folder_url(name), place.storage_options, ranks, place.storage.is_local)
        stored = sharded_io.files_of_rank(place.storage.list_files(name), ranks.rank)
        return [transfer.describe_stored(place.storage, file_path(name, path), path) for path in stored]

    @staticmethod
    def load(place: Place, ranks: Coordinator, manifest: Manifest, state: dict[str, Any]) -> dict[str, Any]:
        require_kind(manifest, "sharded")
        # Each rank checks a share of the files; all ranks see every failure, so all decide alike.
        mine = manifest.files[ranks.rank :: ranks.world_size]
        shares = ranks.all_gather(verify.check_files(place.transfers, place.storage, manifest, mine))
        problems = [problem for share in shares for problem in share]
        if problems:
            raise CorruptCheckpointError("; ".join(problems))
        sharded_io.load(state, place.folder_url(manifest.name), place.storage_options, ranks)
        return state
