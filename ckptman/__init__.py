"""ckptman: a framework-neutral checkpoint manager for PyTorch training on fsspec.

Names are exported lazily (PEP 562): ``import ckptman`` loads neither torch
nor fsspec, so the ``ckptman`` command starts in a fraction of a second and
a program pays for a module only when it uses a name from it. The errors are
cheap and loaded at once, so ``except ckptman.CheckpointError`` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptman.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    DirectoryLockedError,
    EmptyCheckpointError,
    FileNameClashError,
    InvalidMetricError,
    InvalidStepError,
    LeaseLostError,
    ManagerClosedError,
    ManifestError,
    MissingKeysError,
    MissingRanksError,
    NotADirectoryStorageError,
    PeerRankError,
    PolicyConfigError,
    PublishTargetError,
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

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from ckptman.distributed import THIS_PROCESS
    from ckptman.lease import LeaseWarning
    from ckptman.manager import CheckpointManager
    from ckptman.record import CheckpointKind, CheckpointRecord
    from ckptman.retry import RetryPolicy
    from ckptman.verify import CheckResult, VerifyReport

__version__ = "0.1.0"

#: lazily exported name -> the module that defines it
_LAZY = {
    "THIS_PROCESS": "ckptman.distributed",
    "LeaseWarning": "ckptman.lease",
    "CheckpointManager": "ckptman.manager",
    "CheckpointKind": "ckptman.record",
    "CheckpointRecord": "ckptman.record",
    "RetryPolicy": "ckptman.retry",
    "CheckResult": "ckptman.verify",
    "VerifyReport": "ckptman.verify",
}


def __getattr__(name: str) -> Any:
    """Import the defining module on first use; an unknown name is an AttributeError, never a silent None."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptman' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "THIS_PROCESS",
    "BucketNotFoundError",
    "CheckResult",
    "CheckpointError",
    "CheckpointKind",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointRecord",
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
    "MissingKeysError",
    "MissingRanksError",
    "NotADirectoryStorageError",
    "PeerRankError",
    "PolicyConfigError",
    "PublishTargetError",
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
    "VerifyReport",
    "WrongCheckpointKindError",
]
