"""The in-memory catalog of a directory's committed checkpoints, the same on every rank.

Storage is the truth; the catalog is what the last listing and this
manager's own commits say is there: the manifests by step, the folders whose
manifest could not be read, the sidecar as found, and the checkpoint pinned
against retention (the one restored from). Rank 0 changes it; every other
rank receives rank 0's copy (:meth:`Catalog.on_coordinator`), so all ranks
answer queries alike.

The manifests dict is replaced, never changed in place (copy-on-write), so
a reader on the training thread never sees it change under it while the
background writer commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, TypeVar

from ckptman import distributed
from ckptman.errors import CheckpointNotFoundError, InvalidStepError, StepExistsError
from ckptman.manifest import Manifest
from ckptman.naming import check_step
from ckptman.record import CheckpointRecord
from ckptman.state import SidecarState

T = TypeVar("T")
RESUMED = "resumed from"


@dataclass
class Catalog:
    directory: str
    manifests: Mapping[int, Manifest] = field(default_factory=dict)
    unreadable: Mapping[str, str] = field(default_factory=dict)
    stored: SidecarState | None = None
    pinned: Mapping[int, str] = field(default_factory=dict)
    _saved_epoch: int | None = None
    _epochs_seen_in: Mapping[int, Manifest] | None = None

    # -- replication -----------------------------------------------------------
    def on_coordinator(self, group: distributed.Coordinator, change: Callable[[], T]) -> T:
        """Run ``change`` on rank 0 and give every rank rank 0's catalog (and ``change``'s result)."""

        def run() -> tuple[T, tuple[Mapping[int, Manifest], Mapping[str, str], SidecarState | None]]:
            return change(), (self.manifests, self.unreadable, self.stored)

        result, (self.manifests, self.unreadable, self.stored) = distributed.on_coordinator(group, run)
        return result

    # -- changes (rank 0) --------------------------------------------------------
    def put(self, manifest: Manifest) -> None:
        self.manifests = {**self.manifests, manifest.step: manifest}

    def drop(self, step: int) -> None:
        self.manifests = {s: m for s, m in self.manifests.items() if s != step}

    def pin_resumed(self, step: int) -> None:
        """Protect the checkpoint a run restored from until a newer one is committed."""
        self.pinned = {step: RESUMED}

    # -- queries -------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manifests)

    def latest_step(self) -> int | None:
        return max(self.manifests) if self.manifests else None

    def latest_name(self) -> str | None:
        latest = self.latest_step()
        return None if latest is None else self.manifests[latest].name

    def records(self) -> list[CheckpointRecord]:
        return [m.record() for m in self.manifests.values()]

    def newest_first(self) -> list[Manifest]:
        return [self.manifests[s] for s in sorted(self.manifests, reverse=True)]

    def manifest(self, step: int | None) -> Manifest:
        """A committed checkpoint's manifest (the latest when ``step`` is None)."""
        if step is None:
            if not self.manifests:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory}")
            return self.manifests[max(self.manifests)]
        step = check_step(step)
        if step not in self.manifests:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; committed steps: {self.steps()}"
            )
        return self.manifests[step]

    def check_new_step(self, step: int, inflight: CheckpointRecord | None) -> None:
        """A new save's step must be new and no older than the latest (committed or in flight)."""
        if step in self.manifests:
            raise StepExistsError(
                f"step {step} is already committed as {self.manifests[step].name} in {self.directory}; "
                "delete it first or save a later step"
            )
        if inflight is not None and step == inflight.step:
            raise StepExistsError(f"step {step} is being saved in the background; save a later step")
        latest = max((s for s in (self.latest_step(), inflight.step if inflight else None) if s is not None), default=None)
        if latest is not None and step < latest:
            raise InvalidStepError(
                f"step {step} is older than the latest committed step {latest} in {self.directory}; "
                "steps must increase (delete newer checkpoints first to roll back)"
            )

    def saved_epoch(self, inflight: CheckpointRecord | None) -> int | None:
        """The highest epoch a checkpoint committed (since this catalog was made) or in flight records.

        It never goes down when retention deletes the checkpoint recording it,
        so an epoch is saved once; cached per manifests dict, as it is asked on
        every training step.
        """
        manifests = self.manifests
        if manifests is not self._epochs_seen_in:
            epochs = [m.epoch for m in manifests.values() if m.epoch is not None]
            if self._saved_epoch is not None:
                epochs.append(self._saved_epoch)
            self._saved_epoch = max(epochs, default=None)
            self._epochs_seen_in = manifests
        if inflight is None or inflight.epoch is None:
            return self._saved_epoch
        return inflight.epoch if self._saved_epoch is None else max(self._saved_epoch, inflight.epoch)
