"""torch serialization of state checkpoints: the save, the weights-only load, the fallback past corrupted ones."""

from __future__ import annotations

import pickle
import threading
import warnings
from typing import IO, Any, Callable, Sequence, TypeVar

from ckptman.errors import CheckpointNotFoundError, CheckpointWarning, CorruptCheckpointError, ManifestError, UnsafeCheckpointError
from ckptman.manifest import FileEntry, Manifest

T = TypeVar("T")


def entry(manifest: Manifest, path: str) -> FileEntry:
    for candidate in manifest.files:
        if candidate.path == path:
            return candidate
    raise ManifestError(f"checkpoint {manifest.name} has no {path} in its manifest; it is incomplete or corrupted")


_CRC_LOCK = threading.Lock()


def save_state(state: Any, target: IO[bytes]) -> None:
    """``torch.save`` without the zip CRC32 of every record (~15% of its time on 256 MiB).

    The manifest's xxh3 checksum, computed while the same bytes stream, covers
    the file; ``torch.load`` reads files without CRC32 (a plain ``unzip`` would
    warn about them). The switch is torch's process-wide serialization config,
    restored right after; a ``torch.save`` on another thread meanwhile also
    skips CRC32 and stays loadable.
    """
    import torch  # here, not at the top: reading a directory (ckptman ls) needs no torch

    try:
        from torch.utils.serialization import config
    except ImportError:  # torch without the switch: CRC32 is computed, nothing else changes
        torch.save(state, target)
        return
    with _CRC_LOCK:
        previous = config.save.compute_crc32
        config.save.compute_crc32 = False
        try:
            torch.save(state, target)
        finally:
            config.save.compute_crc32 = previous


def load_state(manifest: Manifest, path: str, map_location: Any, weights_only: bool) -> Any:
    """``torch.load`` of a verified file, memory-mapped: its pages were just read by the checksum pass."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise
        raise UnsafeCheckpointError(
            f"checkpoint {manifest.name} holds objects that weights_only=True refuses to load ({exc}). "
            "Save only tensors and plain containers, or pass weights_only=False if you trust this checkpoint: "
            "unpickling can run arbitrary code"
        ) from exc


def first_loadable(
    manifests: Sequence[Manifest],
    load: Callable[[Manifest], T],
    still_committed: Callable[[Manifest], bool],
    *,
    fall_back: bool,
    directory: str,
) -> tuple[Manifest, T]:
    """``load`` the first manifest; with ``fall_back``, skip (with a warning) those that fail verification.

    A checkpoint whose manifest is gone since the listing was rotated out by
    its writer: that is "not found", not "corrupted".
    """
    skipped: list[str] = []
    for manifest in manifests:
        try:
            result = _load_listed(manifest, load, still_committed, directory)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if not fall_back:
                raise
            skipped.append(f"{manifest.name}: {exc}")
            continue
        if skipped:
            warnings.warn(
                f"restored {manifest.name} instead of newer checkpoints that failed verification: {'; '.join(skipped)}",
                CheckpointWarning,
                stacklevel=4,
            )
        return manifest, result
    raise CorruptCheckpointError(f"no committed checkpoint in {directory} verifies: {'; '.join(skipped)}")


def _load_listed(manifest: Manifest, load: Callable[[Manifest], T], still_committed: Callable[[Manifest], bool], directory: str) -> T:
    try:
        return load(manifest)
    except CorruptCheckpointError:
        if still_committed(manifest):
            raise
        raise CheckpointNotFoundError(
            f"checkpoint {manifest.name} was deleted since this manager listed {directory} "
            "(rotated out by its writer?); call refresh() to see the current checkpoints"
        ) from None
