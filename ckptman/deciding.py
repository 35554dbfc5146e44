"""The save decision: is this call due, and what checkpoint does it write, as every rank sees it.

The policy (pure) answers from values; this module gathers them: the step
and epoch of the call, the clock since this process's last commit, the
highest epoch recorded, and the history the "new best" test ranks against,
all counting the save still in flight in the background as the newest. In a
distributed run rank 0's answer is broadcast, so every rank writes or skips
the same checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

from ckptman.background import BackgroundWriter
from ckptman.bookkeeping import Bookkeeper
from ckptman.catalog import Catalog
from ckptman.distributed import Coordinator
from ckptman.naming import NameFormat, check_epoch, check_step
from ckptman.policy import Policy
from ckptman.policy.best import coerce_metrics
from ckptman.policy.save import Progress
from ckptman.record import CheckpointRecord


@dataclass(frozen=True)
class Decider:
    policy: Policy
    names: NameFormat
    catalog: Catalog
    books: Bookkeeper
    background: BackgroundWriter

    def should_save(self, step: object, epoch: object) -> bool:
        """The triggers alone (no metrics), without I/O: cheap enough for every step."""
        step = step if type(step) is int else check_step(step)
        epoch = epoch if epoch is None or type(epoch) is int and epoch >= 0 else check_epoch(epoch)
        return self.policy.save.due(self.progress(step, epoch))

    def decide(
        self, ranks: Coordinator, step: object, metrics: Mapping[str, object] | None, force: bool, epoch: object
    ) -> CheckpointRecord | None:
        """Validate a save and decide it on rank 0: the checkpoint to write, as every rank sees it, or None."""
        checked = check_step(step)
        values = coerce_metrics(metrics)
        checked_epoch = None if epoch is None else check_epoch(epoch)
        self.catalog.check_new_step(checked, self.background.inflight)
        candidate = CheckpointRecord(checked, self.names(checked), values, epoch=checked_epoch)
        # Every rank joins, with or without metrics of its own (evaluation may run on rank 0 only).
        candidate, wanted = ranks.broadcast((candidate, force or self._wants(candidate)))
        return candidate if wanted else None

    def _wants(self, candidate: CheckpointRecord) -> bool:
        """Due by a trigger, or a new best against the committed checkpoints plus the one in flight."""
        progress = self.progress(candidate.step, candidate.epoch)
        if self.policy.save.due(progress):
            return True
        if not candidate.metrics or not self.policy.metrics:
            return False  # the common per-step call: no history needed
        inflight = self.background.inflight
        history = self.catalog.records() + ([inflight] if inflight else [])
        return self.policy.wants(history, candidate, progress)

    def progress(self, step: int, epoch: int | None) -> Progress:
        """What the triggers see: the clock since the last commit (none while a save is in flight, which
        counts as the newest save) and the highest epoch recorded, committed or in flight."""
        inflight = self.background.inflight
        since = time.monotonic() - self.books.last_commit_at if inflight is None else 0.0
        return Progress(step, epoch, since, self.catalog.saved_epoch(inflight))
