"""What the decision logic knows about one committed checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping

CheckpointKind = Literal["state", "directory", "sharded"]


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint: its step, folder name, metrics and (if given) epoch.

    Records are immutable; a later ``report()`` rewrites the manifest they are read from.
    """

    step: int
    name: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: float = 0.0
    size: int = 0
    kind: CheckpointKind = "state"
    epoch: int | None = None  # completed epochs when saved, if the caller said

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        """Picklable (ranks exchange records), although the metrics view is read-only."""
        return (CheckpointRecord, (self.step, self.name, dict(self.metrics), self.created, self.size, self.kind, self.epoch))
