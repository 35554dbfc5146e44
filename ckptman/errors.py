"""Typed errors and warnings: every failure a caller can act on has its own class.

Each class also derives from the closest built-in (``ValueError``,
``LookupError``, ...) so code written against the standard library's
conventions keeps working.
"""

from __future__ import annotations


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


class CheckpointWarning(UserWarning):
    """Something on storage needed repair (stale sidecar, leftovers, a skipped checkpoint); nothing committed was lost."""
