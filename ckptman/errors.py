"""Typed errors and warnings: every failure a caller can act on has its own class.

Each class also derives from the closest built-in (``ValueError``,
``LookupError``, ...) so code written against the standard library's
conventions keeps working.
"""

from __future__ import annotations

from typing import Any, Mapping


class CheckpointError(Exception):
    """Base class of every error ckptman raises on purpose."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """The asked-for checkpoint is not committed in the directory."""


class StepExistsError(CheckpointError, ValueError):
    """A checkpoint for this step is already committed."""


class InvalidStepError(CheckpointError, ValueError):
    """A step is not a non-negative int, or does not move forward."""


class InvalidMetricError(CheckpointError, ValueError):
    """A metric name or value cannot be used (not a real number, bad name)."""


class PolicyConfigError(CheckpointError, ValueError):
    """The manager's save, retention or best-tracking settings are invalid."""


class ReadOnlyError(CheckpointError, PermissionError):
    """A write was attempted through a manager opened with ``read_only=True``."""


class ManagerClosedError(CheckpointError):
    """The manager was closed; open a new one to continue."""


class StorageError(CheckpointError):
    """The storage backend cannot be reached or used as asked."""


class UnsupportedProtocolError(StorageError, ValueError):
    """The directory URL names a protocol fsspec does not know or cannot load."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket in an object-store URL does not exist (it is never created implicitly)."""


class NotADirectoryStorageError(StorageError, NotADirectoryError):
    """The checkpoint directory is an existing file."""


class ManifestError(CheckpointError):
    """A manifest or sidecar is malformed, of an unknown version, or unsafe."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint's bytes do not match its manifest (size or checksum)."""


class UnsafeCheckpointError(CheckpointError):
    """``restore(weights_only=True)`` met pickled objects beyond tensors and plain containers."""


class DirectoryLockedError(CheckpointError):
    """Another writable manager holds the directory's lease (its host, pid and start time are in the message)."""


class LeaseLostError(DirectoryLockedError):
    """This manager's lease was taken over by another writer; it writes nothing more."""


class PeerRankError(CheckpointError, RuntimeError):
    """Another rank died or stopped answering during one of ckptman's collectives; the job must be restarted.

    A ``RuntimeError`` too, as the gloo error it replaces (kept as ``__cause__``).
    """


class MissingRanksError(PeerRankError):
    """Not every rank constructed the (collective) manager in time: usually code that runs on one rank only.

    Raised before any process group is created, so unlike its base class it
    leaves the job usable: pass ``process_group=ckptman.THIS_PROCESS`` there.
    """


class ShardedOnOneRankError(CheckpointError, ValueError):
    """``sharded=True`` on a manager built with ``process_group=THIS_PROCESS``: DCP needs every rank."""


class SaveFailedError(CheckpointError):
    """A save failed on one or more ranks; nothing was committed and its folder was removed.

    ``failed_ranks`` maps each rank that failed to its error as ``"Type: message"``.
    """

    def __init__(self, step: int, failed_ranks: Mapping[int, str]) -> None:
        self.step = step
        self.failed_ranks = dict(failed_ranks)
        causes = "; ".join(f"rank {rank}: {error}" for rank, error in sorted(self.failed_ranks.items()))
        super().__init__(
            f"the save of step {step} failed, nothing was committed: {causes}. Fix the cause and save again"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Handed from rank 0 to every rank with its fields, not rebuilt from the message.
        return type(self), (self.step, self.failed_ranks)


class WrongCheckpointKindError(CheckpointError, TypeError):
    """The restore call does not load this checkpoint's kind; ``use`` names the call that does."""

    def __init__(self, name: str, kind: str, use: str) -> None:
        self.name, self.kind, self.use = name, kind, use
        super().__init__(f"checkpoint {name} is a {kind} checkpoint; use {use}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.kind, self.use)


class MissingKeysError(CheckpointError, LookupError):
    """``publish(keys=...)`` names keys the checkpoint's top-level dict lacks (or its state is no dict at all).

    ``missing`` are the asked-for keys not found, ``present`` the keys the state has.
    """

    def __init__(self, name: str, missing: tuple[str, ...], present: tuple[str, ...], found: str = "dict") -> None:
        self.name, self.missing, self.present, self.found = name, tuple(missing), tuple(present), found
        if found != "dict":
            what = f"holds a {found}, not a dict, so it has none of the keys {list(missing)}; publish it whole with keys=None"
        else:
            what = f"has no top-level key(s) {list(missing)}; its keys are {list(present)}: pass keys= from those"
        super().__init__(f"checkpoint {name} {what}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.missing, self.present, self.found)


class PublishTargetError(CheckpointError, ValueError):
    """``publish(to=...)`` points inside the checkpoint directory but outside its ``published/`` folder."""


class StateRequiredError(CheckpointError, TypeError):
    """``restore(sharded=True)`` without ``state=``: a sharded checkpoint loads in place into a state dict."""


class ReservedNameError(CheckpointError, ValueError):
    """A ``save_directory()`` block wrote a file under a name ckptman writes itself (its manifest)."""


class EmptyCheckpointError(CheckpointError, ValueError):
    """A ``save_directory()`` block wrote no file on any rank; an empty checkpoint is never committed."""


class FileNameClashError(CheckpointError, ValueError):
    """Two ranks wrote a file of the same name into one checkpoint; nothing was committed."""


class UnreadableFolderError(CheckpointError, FileExistsError):
    """The folder of the step being saved exists with a manifest ckptman cannot read; it is never overwritten."""


class CheckpointWarning(UserWarning):
    """Something on storage needed repair (stale sidecar, leftovers, a skipped checkpoint); nothing committed was lost."""
