"""Publishing: one state checkpoint, trimmed to some top-level keys, as a standalone ``.pth`` file.

The seed's ``published_keys`` (mmengine's ``CheckpointHook``): a published
file is for people and tools outside ckptman (a model zoo, a plain
``torch.load``), so it is an ordinary ``torch.save`` file, named by default
``<name>-<first 8 hex of the sha256 of its bytes>.pth`` as mmengine names
them, in ``<directory>/published/``. That folder is outside retention: no
``name_format`` produces ``published`` (a checkpoint name always holds the
step's digits) and it has no manifest, so listing, cleanup and ``verify``
pass it by.

The file is written in one atomic write through :mod:`ckptman.storage`
(local: temporary name and rename; object stores: one PUT), so a reader never
sees part of it. Everything that can be refused (the keys, the target) is
checked before a byte is read.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ckptman.errors import MissingKeysError, PublishTargetError, WrongCheckpointKindError
from ckptman.kinds import Place, StateFile, loading_call
from ckptman.manifest import Manifest
from ckptman.storage import Storage

PUBLISHED_FOLDER = "published"


@dataclass(frozen=True)
class Target:
    """Where the file goes: ``folder`` (relative to ``storage``) and a file name (None: the default name)."""

    storage: Storage
    folder: str
    name: str | None
    inside_directory: bool

    def url(self, name: str) -> str:
        return f"{self.storage.url}/{self.rel(name)}"

    def rel(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name


@dataclass(frozen=True)
class Request:
    """One ``publish()`` call's arguments, validated: what to keep and where to write."""

    keys: tuple[str, ...] | None
    target: Target


def check_keys(keys: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``keys`` as a tuple of distinct names (one string is a list of one); None keeps everything."""
    if keys is None:
        return None
    names = [keys] if isinstance(keys, str) else keys
    if not isinstance(names, Sequence) or not all(isinstance(key, str) for key in names):
        raise TypeError(f"publish(keys=...) takes a key name or a list of them, e.g. keys=['state_dict'], got {keys!r}")
    if not names:
        raise ValueError("publish(keys=[]) would publish an empty dict; name the keys to keep, or pass keys=None for all")
    return tuple(dict.fromkeys(names))


def resolve(to: str | os.PathLike[str] | None, directory: Storage, storage_options: Mapping[str, Any]) -> Target:
    """The target of ``to=``: the default folder when None; a URL or path ending in ``/`` is a folder.

    A target inside the checkpoint directory must be under ``published/``:
    anywhere else a listing would take it for a checkpoint's file or for
    debris. It is opened with the manager's ``storage_options`` when it uses
    the directory's protocol, with none otherwise.
    """
    if to is None:
        return Target(directory, PUBLISHED_FOLDER, None, True)
    if not isinstance(to, (str, os.PathLike)):
        raise TypeError(f"publish(to=...) must be a path or URL string, got {type(to).__name__}")
    folder_url, name = _split(os.fspath(to))
    same_protocol = _protocol(folder_url) == _protocol(directory.url)
    folder = Storage(folder_url, storage_options if same_protocol else None, directory.retry)
    if folder.url != directory.url and not folder.url.startswith(directory.url + "/"):
        return Target(folder, "", name, False)
    inner = folder.url[len(directory.url) + 1 :]
    if inner.split("/", 1)[0] != PUBLISHED_FOLDER:
        raise PublishTargetError(
            f"publish(to={os.fspath(to)!r}) is inside the checkpoint directory {directory.url} but not under its "
            f"{PUBLISHED_FOLDER}/ folder, where retention could take it for debris; publish to "
            f"{directory.url}/{PUBLISHED_FOLDER}/ (to=None) or outside the directory"
        )
    return Target(directory, inner, name, True)


def load(place: Place, manifest: Manifest, weights_only: bool) -> tuple[Manifest, Any]:
    """The verified state of a ``save()`` checkpoint (restore's own load); other kinds name what to do."""
    if manifest.kind != StateFile.kind:
        raise WrongCheckpointKindError(
            manifest.name,
            manifest.kind,
            f"publish() with the step of a save() checkpoint, or load this one with {loading_call(manifest)} "
            "and torch.save what you need",
        )
    return manifest, StateFile.load(place, manifest, "cpu", weights_only)


def select(state: Any, keys: tuple[str, ...] | None, name: str) -> Any:
    """Only ``keys`` of the top-level dict, in the order asked; everything when ``keys`` is None."""
    if keys is None:
        return state
    if not isinstance(state, Mapping):
        raise MissingKeysError(name, keys, (), type(state).__name__)
    missing = tuple(key for key in keys if key not in state)
    if missing:
        raise MissingKeysError(name, missing, tuple(str(key) for key in state))
    return {key: state[key] for key in keys}


def publish(request: Request, load_verified: Callable[[], tuple[Manifest, Any]]) -> str:
    """Load, trim, serialize, write once; returns the file's URL. Nothing is written if any step fails."""
    import torch  # only publishing serializes: importing ckptman stays fast

    manifest, state = load_verified()
    buffer = io.BytesIO()
    torch.save(select(state, request.keys, manifest.name), buffer)
    data = buffer.getvalue()
    target = request.target
    name = target.name or f"{manifest.name}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    target.storage.write_atomic(target.rel(name), data)
    return target.url(name)


def _split(to: str) -> tuple[str, str | None]:
    """``(folder URL, file name)`` of a target; the name is None for a folder (a trailing ``/``)."""
    protocol, sep, path = to.rpartition("://") if "://" in to else ("", "", to)
    folder, slash, name = path.rpartition("/")
    if not slash:
        folder = "" if sep else "."
    elif not folder:
        folder = "/"
    if name in (".", ".."):
        raise ValueError(f"publish(to={to!r}) must name a file, or end with '/' to name a folder")
    return f"{protocol}{sep}{folder}", name or None


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"
