"""ckptman: a framework-neutral checkpoint manager for PyTorch training on fsspec."""

from ckptman.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    EmptyCheckpointError,
    FileNameClashError,
    InvalidMetricError,
    InvalidStepError,
    LeaseLostError,
    ManagerClosedError,
    ManifestError,
    MissingRanksError,
    NotADirectoryStorageError,
    PeerRankError,
    PolicyConfigError,
    ReadOnlyError,
    ReservedNameError,
    SaveFailedError,
    ShardedOnOneRankError,
    StateRequiredError,
    StepExistsError,
    StorageError,
    UnreadableFolderError,
    UnsafeCheckpointError,
    UnsupportedProtocolError,
    WrongCheckpointKindError,
)
from ckptman.lease import LeaseWarning
from ckptman.errors import CheckpointWarning
from ckptman.distributed import THIS_PROCESS
from ckptman.manager import CheckpointManager
from ckptman.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "THIS_PROCESS",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "EmptyCheckpointError",
    "FileNameClashError",
    "InvalidMetricError",
    "InvalidStepError",
    "LeaseLostError",
    "LeaseWarning",
    "ManagerClosedError",
    "ManifestError",
    "MissingRanksError",
    "NotADirectoryStorageError",
    "PeerRankError",
    "PolicyConfigError",
    "ReadOnlyError",
    "ReservedNameError",
    "RetryPolicy",
    "SaveFailedError",
    "ShardedOnOneRankError",
    "StateRequiredError",
    "StepExistsError",
    "StorageError",
    "UnreadableFolderError",
    "UnsafeCheckpointError",
    "UnsupportedProtocolError",
    "WrongCheckpointKindError",
]
