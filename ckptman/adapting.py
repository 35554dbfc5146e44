"""What every framework adapter shares (ckptman.lightning, ckptman.transformers)."""

from __future__ import annotations

import warnings

from ckptman.errors import CheckpointWarning
from ckptman.manager import CheckpointManager


def remove_dead_branch(mgr: CheckpointManager, resumed: int, *, stacklevel: int = 2) -> None:
    """Delete the checkpoints newer than the one a resume fell back to: they failed verification, and
    training from ``resumed`` would reach their steps again (ckptman's steps only increase)."""
    for step in [s for s in mgr.all_steps() if s > resumed]:
        warnings.warn(
            f"deleting {mgr.checkpoint_path(step)}: it failed verification and training resumes from step {resumed}",
            CheckpointWarning,
            stacklevel=stacklevel + 1,
        )
        mgr.delete(step)
