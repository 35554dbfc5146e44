"""Which committed checkpoints to keep: composable, pure keep-rules.

Each rule looks at the committed records and names the steps it protects;
the kept set is the union over all rules, and every kept step carries the
reasons that keep it (what ``ckptman ls`` shows). Nothing here deletes
anything: the manager deletes what :func:`decide` does not keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ckptman.policy.best import Metric, top_k
from ckptman.policy.save import require_int
from ckptman.record import CheckpointRecord


class RetentionRule(Protocol):
    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        """Map each protected step to a short human reason."""
        ...


@dataclass(frozen=True)
class KeepAll:
    """Used when ``keep_last`` is None: nothing is ever rotated away."""

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        return {r.step: "keep all" for r in records}


@dataclass(frozen=True)
class KeepLast:
    """The newest ``n`` checkpoints."""

    n: int

    def __post_init__(self) -> None:
        require_int("keep_last", self.n, minimum=1)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        newest = sorted((r.step for r in records), reverse=True)[: self.n]
        return {step: f"last {self.n}" for step in newest}


@dataclass(frozen=True)
class KeepEvery:
    """Steps divisible by ``n`` are never rotated away (periodic archive)."""

    n: int

    def __post_init__(self) -> None:
        require_int("keep_every", self.n, minimum=1)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        return {r.step: f"every {self.n}" for r in records if r.step % self.n == 0}


@dataclass(frozen=True)
class KeepBest:
    """The ``k`` best checkpoints with a finite value of ``metric``."""

    metric: Metric
    k: int

    def __post_init__(self) -> None:
        require_int("keep_best", self.k, minimum=1)

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        ranked = top_k(records, self.metric, self.k)
        return {r.step: f"best {self.metric.name} #{i + 1}" for i, r in enumerate(ranked)}


@dataclass(frozen=True)
class KeepLatest:
    """The newest committed checkpoint is always kept: it is what a restart resumes from."""

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        return {max(r.step for r in records): "latest"} if records else {}


@dataclass(frozen=True)
class KeepSteps:
    """Explicitly pinned steps, e.g. the checkpoint this run resumed from."""

    steps: frozenset[int]
    reason: str

    def keep(self, records: Sequence[CheckpointRecord]) -> dict[int, str]:
        return {r.step: self.reason for r in records if r.step in self.steps}


def decide(records: Sequence[CheckpointRecord], rules: Sequence[RetentionRule]) -> dict[int, tuple[str, ...]]:
    """Every step that at least one rule keeps, with all the reasons that keep it."""
    reasons: dict[int, list[str]] = {}
    for rule in rules:
        for step, reason in rule.keep(records).items():
            reasons.setdefault(step, []).append(reason)
    return {step: tuple(why) for step, why in sorted(reasons.items())}
