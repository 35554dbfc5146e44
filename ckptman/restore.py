"""Loading committed checkpoints: the weights-only load and the fallback past corrupted ones."""

from __future__ import annotations

import pickle
import warnings
from typing import Any, Callable, Sequence, TypeVar

import torch

from ckptman.errors import CheckpointNotFoundError, CheckpointWarning, CorruptCheckpointError, ManifestError, UnsafeCheckpointError
from ckptman.manifest import FileEntry, Manifest

T = TypeVar("T")


def entry(manifest: Manifest, path: str) -> FileEntry:
    for candidate in manifest.files:
        if candidate.path == path:
            return candidate
    raise ManifestError(f"checkpoint {manifest.name} has no {path} in its manifest; it is incomplete or corrupted")


def load_state(manifest: Manifest, path: str, map_location: Any, weights_only: bool) -> Any:
    """``torch.load`` of a verified file, memory-mapped: its pages were just read by the checksum pass."""
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
