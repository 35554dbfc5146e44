"""ckptman: a framework-neutral checkpoint manager for PyTorch training on fsspec."""

from ckptman.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    InvalidMetricError,
    InvalidStepError,
    LeaseLostError,
    ManagerClosedError,
    ManifestError,
    NotADirectoryStorageError,
    PeerRankError,
    PolicyConfigError,
    ReadOnlyError,
    StepExistsError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedProtocolError,
)
from ckptman.lease import LeaseWarning
from ckptman.errors import CheckpointWarning
from ckptman.manager import CheckpointManager
from ckptman.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "InvalidMetricError",
    "InvalidStepError",
    "LeaseLostError",
    "LeaseWarning",
    "RetryPolicy",
    "ManagerClosedError",
    "ManifestError",
    "NotADirectoryStorageError",
    "PeerRankError",
    "PolicyConfigError",
    "ReadOnlyError",
    "StepExistsError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedProtocolError",
]
