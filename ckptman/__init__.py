"""ckptman: a framework-neutral checkpoint manager for PyTorch training on fsspec."""

from ckptman.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidMetricError,
    InvalidStepError,
    ManagerClosedError,
    ManifestError,
    NotADirectoryStorageError,
    PolicyConfigError,
    ReadOnlyError,
    StepExistsError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedProtocolError,
)
from ckptman.manager import CheckpointManager, CheckpointWarning

__version__ = "0.1.0"

__all__ = [
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "InvalidMetricError",
    "InvalidStepError",
    "ManagerClosedError",
    "ManifestError",
    "NotADirectoryStorageError",
    "PolicyConfigError",
    "ReadOnlyError",
    "StepExistsError",
    "StorageError",
    "UnsafeCheckpointError",
    "UnsupportedProtocolError",
]
