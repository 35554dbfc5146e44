"""Rank 0's bookkeeping of a run directory: what happens around the commits.

Opening (list, read every manifest, clean up what interrupted saves left,
repair the sidecar and ``latest``), the steps after a commit (``latest``,
retention, the sidecar), rewriting a manifest for ``report()``, deleting a
checkpoint, and the lease check before every change. Only the coordinator
(rank 0, or the single process) runs these; every change goes to the
:class:`~ckptman.catalog.Catalog` that the other ranks then receive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

from ckptman import commit
from ckptman import staging as staging_dirs
from ckptman.catalog import Catalog
from ckptman.errors import (
    CheckpointWarning,
    LeaseLostError,
    ManifestError,
    ReadOnlyError,
    StepExistsError,
    UnreadableFolderError,
)
from ckptman.lease import Lease
from ckptman.manifest import Manifest
from ckptman.naming import NameFormat
from ckptman.policy import Policy
from ckptman.policy.best import top_k
from ckptman.state import SIDECAR_NAME, SidecarState
from ckptman.storage import Storage

logger = logging.getLogger("ckptman")
T = TypeVar("T")
_FALLBACK = "the state is rebuilt from the manifests (a writable manager rewrites the sidecar); nothing is deleted"


def in_background(call: Callable[[], T]) -> Future[T]:
    """``call`` on a thread of its own; its result or error in the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
            future.set_exception(exc)

    threading.Thread(target=run, name="ckptman-lease-read", daemon=True).start()
    return future


@dataclass
class Bookkeeper:
    storage: Storage
    policy: Policy
    names: NameFormat
    catalog: Catalog
    read_only: bool
    lease: Lease | None = None
    leftovers: set[str] = field(default_factory=set)  # folders of failed saves whose cleanup failed too
    last_commit_at: float = field(default_factory=time.monotonic)  # this process's clock; the opening until a commit
    _lease_ahead: Future[float] | None = field(default=None, repr=False)

    def check_lease(self) -> None:
        """Read the lease before changing anything on storage: a writer that lost it must not write or delete."""
        if self.lease is not None:
            self.lease.check()

    def read_lease_ahead(self) -> None:
        """Start the lease read of the coming commit now, so that it overlaps the upload of the payload.

        The read proves the lease ours until a deadline (:meth:`Lease.check`);
        the commit relies on it only before then, else it reads again.
        """
        if self.lease is not None:
            self._lease_ahead = in_background(self.lease.check)

    def _check_lease_for_commit(self) -> None:
        ahead, self._lease_ahead = self._lease_ahead, None
        if ahead is not None and self.lease is not None:
            try:
                held_until = ahead.result()
            except LeaseLostError:
                raise
            except Exception:  # noqa: BLE001 - a storage error of the early read: read again, now
                held_until = 0.0
            if time.time() < held_until:
                self.lease.raise_if_lost()
                return
        self.check_lease()

    # -- opening -----------------------------------------------------------------
    def scan(self) -> None:
        """List the directory into the catalog; a writable manager also cleans up and repairs."""
        found = commit.scan(self.storage, self.names.matches)
        manifests: dict[int, Manifest] = {}
        for manifest in sorted(found.committed.values(), key=lambda m: (not self.names.matches(m.name), m.name)):
            if manifest.step in manifests:
                found.unreadable[manifest.name] = f"step {manifest.step} is also committed as {manifests[manifest.step].name}"
                continue
            manifests[manifest.step] = manifest
        self.catalog.manifests = manifests
        self.catalog.unreadable = found.unreadable
        for name, reason in found.unreadable.items():
            warnings.warn(f"ignoring checkpoint folder {name}: {reason}", CheckpointWarning, stacklevel=6)
        self.catalog.stored = self._read_sidecar()
        if self.read_only:
            return
        self.check_lease()  # cleanup deletes: only the lease holder may
        for name in found.incomplete:
            commit.discard_incomplete(self.storage, name)
        self.storage.remove_temporaries()
        staging_dirs.remove_stale()
        self._repair_sidecar()

    def _read_sidecar(self) -> SidecarState | None:
        source = f"{self.storage.url}/{SIDECAR_NAME}"
        try:
            return commit.read_sidecar(self.storage)
        except FileNotFoundError:
            if self.catalog.manifests:
                warnings.warn(f"{source} is missing; {_FALLBACK}", CheckpointWarning, stacklevel=7)
        except ManifestError as exc:
            warnings.warn(f"{exc}; {_FALLBACK}", CheckpointWarning, stacklevel=7)
        return None

    def _repair_sidecar(self) -> None:
        """Rewrite the sidecar and ``latest`` when they disagree with the manifests."""
        stored, current = self.catalog.stored, self.sidecar()
        if stored is None and not self.catalog.manifests:
            return
        if stored is not None and stored.same_checkpoints(current):
            if stored.latest == current.latest and commit.read_latest(self.storage) == current.latest:
                return
        elif stored is not None:
            logger.warning("%s/%s was out of date with the manifests (interrupted save?); rebuilt", self.storage.url, SIDECAR_NAME)
        self.write_latest()
        self.write_sidecar()

    # -- the state around the manifests ----------------------------------------------
    def kept_reasons(self) -> dict[int, tuple[str, ...]]:
        return self.policy.retain(self.catalog.records(), self.catalog.pinned)

    def sidecar(self) -> SidecarState:
        records = self.catalog.records()
        best = {
            m.name: {"mode": m.mode, "steps": [r.step for r in top_k(records, m, self.policy.keep_best)]}
            for m in self.policy.metrics
        }
        return SidecarState(tuple(records), best, self.catalog.latest_name(), self.policy.describe())

    def write_sidecar(self) -> None:
        state = self.sidecar()
        commit.write_sidecar(self.storage, state)
        self.catalog.stored = state

    def write_latest(self) -> None:
        commit.write_latest(self.storage, self.catalog.latest_name())

    def apply_retention(self) -> None:
        kept = self.kept_reasons()
        for step in sorted(set(self.catalog.manifests) - set(kept)):
            name = self.catalog.manifests[step].name
            logger.info("retention: deleting %s/%s", self.storage.url, name)
            commit.uncommit(self.storage, name)
            self.catalog.drop(step)
        self.write_sidecar()

    # -- changes ---------------------------------------------------------------------
    def commit(self, manifest: Manifest) -> None:
        """Steps 4 to 7 of the save sequence: the lease, the manifest, then ``latest``, retention and the sidecar.

        When retention deletes nothing, ``latest`` and the sidecar are written
        together (concurrently on object stores): one round trip instead of two.
        """
        self._check_lease_for_commit()
        commit.commit(self.storage, manifest)
        self.catalog.put(manifest)
        self.catalog.pinned = {}  # a newer checkpoint is now the resume point
        self.last_commit_at = time.monotonic()
        logger.info("committed %s/%s (%d files, %d bytes)", self.storage.url, manifest.name, len(manifest.files), manifest.size)
        try:
            latest = self.catalog.latest_name()
            if latest is not None and set(self.catalog.manifests) <= set(self.kept_reasons()):
                state = self.sidecar()
                commit.write_latest_and_sidecar(self.storage, latest, state)
                self.catalog.stored = state
                return
            self.write_latest()
            self.apply_retention()
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed: say so, do not pretend it failed
            warnings.warn(
                f"checkpoint {manifest.name} is committed, but updating latest/retention/sidecar failed ({exc}); "
                "the next save or the next manager to open the directory repairs them",
                CheckpointWarning,
                stacklevel=5,
            )

    def rewrite(self, manifest: Manifest) -> None:
        """Replace a committed manifest (later metrics, adopted metrics); retention re-runs."""
        self.check_lease()
        commit.rewrite(self.storage, manifest)
        self.catalog.put(manifest)

    def delete(self, manifest: Manifest) -> None:
        self.check_lease()
        commit.uncommit(self.storage, manifest.name)
        self.catalog.drop(manifest.step)
        self.write_latest()
        self.write_sidecar()

    def adopt(self, loaded: SidecarState) -> None:
        """Metrics a saved state dict knows and storage lacks are written into the manifests."""
        changed = False
        for record in loaded.checkpoints:
            manifest = self.catalog.manifests.get(record.step)
            if manifest is None or manifest.name != record.name:
                warnings.warn(
                    f"state dict lists checkpoint {record.name} (step {record.step}), which is not committed in "
                    f"{self.storage.url}; ignored",
                    CheckpointWarning,
                    stacklevel=6,
                )
                continue
            missing = {k: v for k, v in record.metrics.items() if k not in manifest.metrics}
            if missing:
                if self.read_only:
                    raise ReadOnlyError(
                        f"the state dict has metrics {sorted(missing)} for {record.name} that {self.storage.url} lacks, "
                        "and this manager was opened with read_only=True; open a writable manager to adopt them"
                    )
                self.rewrite(manifest.with_metrics(missing))
                changed = True
        if changed:
            self.apply_retention()

    # -- the folder of a save ----------------------------------------------------------
    def prepare_folder(self, step: int) -> str:
        name = self.names(step)
        if name in self.catalog.unreadable:
            raise UnreadableFolderError(
                f"{self.storage.url}/{name} exists with an unreadable manifest ({self.catalog.unreadable[name]}); "
                "inspect it and delete it by hand before saving this step"
            )
        if name in self.leftovers:  # anything else was cleaned when the directory was opened
            if self.storage.exists(commit.manifest_path(name)):
                raise StepExistsError(
                    f"{self.storage.url}/{name} was committed by a save that reported a storage error; "
                    "call refresh() to see it"
                )
            commit.discard(self.storage, name)
            self.leftovers.discard(name)
        return name

    @contextlib.contextmanager
    def discard_on_error(self, name: str) -> Iterator[None]:
        """A save that fails leaves nothing visible: its uncommitted folder is removed."""
        try:
            yield
        except BaseException:
            try:
                if self.storage.exists(commit.manifest_path(name)):
                    self.leftovers.add(name)  # committed although the call failed: never overwrite it blindly
                else:
                    commit.discard(self.storage, name)
            except Exception:  # noqa: BLE001 - storage is failing; clean up before this name is used again
                self.leftovers.add(name)
            raise
