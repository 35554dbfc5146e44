"""CheckpointManager: orchestration only.

Decisions come from :mod:`ckptman.policy` (pure), bytes go through
:mod:`ckptman.storage`, and the commit protocol is :mod:`ckptman.commit`.
The manager keeps the committed manifests in memory, keyed by step; storage
is the truth, re-read on construction and by :meth:`CheckpointManager.refresh`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
import time
import warnings
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar


from ckptman import commit, distributed, restore, transfer, verify
from ckptman import sharded as sharded_io
from ckptman import staging as staging_dirs
from ckptman.background import BackgroundWriter, Snapshotter
from ckptman.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    InvalidMetricError,
    InvalidStepError,
    ManagerClosedError,
    ManifestError,
    ReadOnlyError,
    StepExistsError,
)
from ckptman.lease import Lease
from ckptman.manifest import MANIFEST_NAME, FileEntry, Manifest
from ckptman.naming import NameFormat, check_epoch, check_step
from ckptman.policy import build_policy
from ckptman.policy.best import coerce_metrics, top_k
from ckptman.policy.save import Progress, require_int
from ckptman.record import CheckpointKind, CheckpointRecord
from ckptman.retry import RetryPolicy
from ckptman.state import SIDECAR_NAME, SidecarState
from ckptman.storage import Storage
from ckptman.transfer import Transfers
from ckptman.verify import VerifyReport

logger = logging.getLogger("ckptman")
T = TypeVar("T")

STATE_FILE = "state.pt"
_FALLBACK = "the state is rebuilt from the manifests (a writable manager rewrites the sidecar); nothing is deleted"
RESUMED = "resumed from"


class CheckpointManager:
    """Decides when to save, commits checkpoints through fsspec, keeps them by policy.

    See docs/getting-started.md for the argument reference; every argument is validated
    here, so a bad setting fails at construction, not after hours of training.

    ``dist_timeout`` (a ``datetime.timedelta`` or seconds; None: torch's default, 30
    minutes for gloo) bounds how long a rank waits in ckptman's collectives for the
    others, so a peer that hangs fails the job with ``PeerRankError`` instead of
    stalling it; it must exceed the longest time ranks reach a ckptman call apart,
    such as the slowest rank's upload. See docs/distributed.md.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        save_interval_steps: int | None = None,
        save_begin: int = 0,
        keep_last: int | None = None,
        keep_every: int | None = None,
        best: str | Sequence[str] | None = None,
        mode: str | Mapping[str, str] | None = None,
        keep_best: int = 1,
        name_format: str = "step_{step:08d}",
        read_only: bool = False,
        lease_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        async_save: bool = False,
        max_concurrency: int = 16,
        progress: bool | None = None,
        process_group: Any = None,
        dist_timeout: datetime.timedelta | float | None = None,
        save_interval_epochs: int | None = None,
        save_interval_seconds: float | None = None,
    ) -> None:
        self._policy = build_policy(
            save_interval_steps=save_interval_steps,
            save_begin=save_begin,
            keep_last=keep_last,
            keep_every=keep_every,
            best=best,
            mode=mode,
            keep_best=keep_best,
            save_interval_epochs=save_interval_epochs,
            save_interval_seconds=save_interval_seconds,
        )
        self._names = NameFormat(name_format)
        self._transfers = Transfers(require_int("max_concurrency", max_concurrency, minimum=1), progress)
        timeout = distributed.check_timeout(dist_timeout)
        self._read_only = bool(read_only)
        self._closed = False
        self._pinned: dict[int, str] = {}
        self._manifests: dict[int, Manifest] = {}
        self._unreadable: dict[str, str] = {}
        self._stored: SidecarState | None = None
        self._storage_options = dict(storage_options or {})
        self._storage = Storage(directory, storage_options, retry)
        self._background = BackgroundWriter(bool(async_save))
        self._snapshots = Snapshotter()
        self._leftovers: set[str] = set()  # folders of failed saves whose cleanup failed too
        # What the triggers look at besides the step (see _progress).
        self._last_save_at = time.monotonic()  # of this manager's last committed save, or its opening
        self._saved_epoch: int | None = None  # the highest epoch a committed checkpoint recorded
        self._epochs_seen_in: Mapping[int, Manifest] | None = None
        # Decisions on the caller's thread and background saves each get their own group,
        # so their collectives never interleave.
        self._control = distributed.coordinator(process_group, timeout)
        self._data = distributed.coordinator(process_group, timeout) if async_save else self._control
        self._lease: Lease | None = None
        if not self._read_only:
            distributed.on_coordinator(self._control, lambda: self._take_lease(lease_timeout))
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    def _take_lease(self, timeout: float) -> None:
        """Rank 0 alone holds the directory's lease, for the whole job."""
        self._storage.ensure_directory()
        lease = Lease(self._storage, timeout)
        lease.acquire()
        self._lease = lease
        # Released on close(), on garbage collection and at interpreter exit.
        self._release = weakref.finalize(self, lease.release_from_finalizer)

    def __repr__(self) -> str:
        return f"CheckpointManager({self._storage.url!r}, steps={self.all_steps()}, read_only={self._read_only})"

    @property
    def directory(self) -> str:
        """The checkpoint directory as a URL (without credentials)."""
        return self._storage.url

    # -- queries --------------------------------------------------------------
    def should_save(self, step: int, *, epoch: int | None = None) -> bool:
        """Whether ``step`` (and ``epoch``, the completed epochs) is due by a save trigger; cheap: call it every step.

        ``save()`` decides on rank 0 and tells every rank; with a wall-clock
        trigger this call on another rank reads that rank's clock, so branch
        on what ``save()`` returns, not on this.
        """
        step = step if type(step) is int else check_step(step)
        epoch = epoch if epoch is None or type(epoch) is int and epoch >= 0 else check_epoch(epoch)
        return self._policy.save.due(self._progress(step, epoch))

    def all_steps(self) -> list[int]:
        return sorted(self._manifests)

    def latest_step(self) -> int | None:
        return max(self._manifests) if self._manifests else None

    def best_step(self, metric: str | None = None) -> int | None:
        """The best committed step for ``metric`` (the first tracked metric when None)."""
        best = self._policy.best(self._records(), metric)
        return best.step if best else None

    def metrics(self, step: int) -> dict[str, float]:
        return dict(self._manifest(step).metrics)

    def kept_reasons(self) -> dict[int, tuple[str, ...]]:
        """Why each committed checkpoint is kept, by retention rule (what ``ckptman ls`` shows)."""
        return self._policy.retain(self._records(), self._pinned)

    def checkpoint_path(self, step: int) -> str:
        """The URL of a committed checkpoint's folder."""
        return f"{self._storage.url}/{self._manifest(step).name}"

    def record(self, step: int) -> CheckpointRecord:
        return self._manifest(step).record()

    # -- saving ---------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        *,
        metrics: Mapping[str, object] | None = None,
        force: bool = False,
        epoch: int | None = None,
        sharded: bool = False,
    ) -> bool:
        """Save ``state`` (anything ``torch.save`` accepts) if forced, due, or a new best.

        Returns True when a checkpoint was written and committed, or, with
        ``async_save=True``, snapshotted and handed to the background writer
        (its errors are raised by the manager's next call). In a distributed
        run a plain save holds replicated state, written by rank 0; with
        ``sharded=True`` every rank passes its own state dict (DTensor or
        ShardedTensor shards) and it is written through torch.distributed.checkpoint.
        ``epoch`` (completed epochs) is recorded in the manifest and drives
        ``save_interval_epochs``.
        """
        candidate = self._decide(step, metrics, force, epoch)
        if candidate is None:
            return False
        payload = state
        if self._background.enabled:
            self._background.wait()  # one save in flight; its buffers are free again
            payload = self._snapshots.take(state)

        def write_state(name: str) -> list[FileEntry]:
            """A plain save holds replicated state (as under DDP): rank 0 writes it."""
            if not self._data.is_coordinator:
                return []
            rel = f"{name}/{STATE_FILE}"
            return [self._transfers.write(self._storage, rel, lambda f: restore.save_state(payload, f), STATE_FILE)]

        def write_shards(name: str) -> list[FileEntry]:
            sharded_io.save(payload, self._folder_url(name), self._storage_options, self._data, self._storage.is_local)
            stored = sharded_io.files_of_rank(self._storage.list_files(name), self._data.rank)
            return [transfer.describe_stored(self._storage, f"{name}/{path}", path) for path in stored]

        record = dataclasses.replace(candidate, kind="sharded" if sharded else "state")
        writer = write_shards if sharded else write_state
        self._background.submit(lambda: self._save_collectively(record, writer), record)
        return True

    @contextlib.contextmanager
    def save_directory(
        self, step: int, *, metrics: Mapping[str, object] | None = None, force: bool = False, epoch: int | None = None
    ) -> Iterator[str | None]:
        """A local folder to write any files into (DeepSpeed-style); committed on clean exit.

        Yields None when the step is not due (write nothing then). On an
        exception inside the block nothing is committed and the error
        propagates. With ``async_save=True`` the files are uploaded and
        committed in the background after the block.
        """
        candidate = self._decide(step, metrics, force, epoch)
        if candidate is None:
            yield None
            return
        record = dataclasses.replace(candidate, kind="directory")
        step = record.step
        staging = staging_dirs.make(f"save-{step}")
        try:
            yield staging
            self._check_open()
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if self._data.world_size > 1 and isinstance(exc, Exception):
                self._fail_collectively(record, exc)
            raise

        def upload(name: str) -> tuple[FileEntry, ...]:
            files = transfer.local_files(staging)
            if MANIFEST_NAME in files:
                raise CheckpointError(f"save_directory({step}) wrote {MANIFEST_NAME}, a name ckptman reserves; rename it")
            items = [(os.path.join(staging, path), f"{name}/{path}", path) for path in files]
            return self._transfers.upload_files(self._storage, items)

        def save() -> None:
            try:
                self._save_collectively(record, upload)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._background.submit(save, record)

    def report(self, step: int, metrics: Mapping[str, object]) -> None:
        """Metrics for an already committed step (evaluation after the save); retention re-runs."""
        self._check_writable()
        self._background.wait()
        values = coerce_metrics(metrics)
        if not values:
            raise InvalidMetricError("report() needs at least one metric, e.g. {'val/loss': 0.25}")
        values = self._control.broadcast(values)  # rank 0's evaluation counts on every rank
        manifest = self._manifest(check_step(step)).with_metrics(values)

        def rewrite() -> dict[int, Manifest]:
            self._check_lease()
            commit.rewrite(self._storage, manifest)
            self._put(manifest)
            self._apply_retention()
            return self._manifests

        self._manifests = distributed.on_coordinator(self._control, rewrite)

    def delete(self, step: int) -> None:
        """Delete one committed checkpoint (manifest first)."""
        self._check_writable()
        self._background.wait()
        manifest = self._manifest(check_step(step))

        def remove() -> dict[int, Manifest]:
            self._check_lease()
            commit.uncommit(self._storage, manifest.name)
            self._drop(manifest.step)
            self._write_latest()
            self._write_sidecar()
            return self._manifests

        self._manifests = distributed.on_coordinator(self._control, remove)
        self._pinned.pop(manifest.step, None)

    # -- restoring ------------------------------------------------------------
    def restore(
        self,
        step: int | None = None,
        *,
        map_location: Any = "cpu",
        weights_only: bool = True,
        sharded: bool = False,
        state: dict[str, Any] | None = None,
    ) -> Any:
        """Load a committed state checkpoint (latest when ``step`` is None), verified against its manifest.

        With ``step=None`` a checkpoint that fails verification is skipped with
        a warning and the next newest is tried; an explicit step never falls back.
        ``weights_only=True`` (the default) refuses arbitrary pickled objects;
        pass False only for checkpoints you trust: unpickling can run code.
        ``sharded=True`` loads a sharded checkpoint in place into ``state``
        (every rank passes its own state dict; DCP reshards to this world size)
        and returns it.
        """
        if sharded:
            return self._restore_sharded(step, state)

        def load(manifest: Manifest) -> Any:
            if manifest.kind != "state":
                how = "restore(sharded=True, state=...)" if manifest.kind == "sharded" else f"restore_directory({manifest.step})"
                raise CheckpointError(f"checkpoint {manifest.name} is a {manifest.kind} checkpoint; use {how}")
            rel = f"{manifest.name}/{STATE_FILE}"
            with transfer.verified_local_copy(self._storage, rel, restore.entry(manifest, STATE_FILE)) as path:
                return restore.load_state(manifest, path, map_location, weights_only)

        return self._first_verified(step, load)[1]

    def restore_directory(self, step: int | None = None, local_dir: str | os.PathLike[str] | None = None) -> str:
        """A local directory holding a committed checkpoint's files, verified against its manifest.

        On local disk with ``local_dir=None`` this is the checkpoint folder
        itself (no copy; treat it as read-only). Otherwise the files are
        downloaded into ``local_dir`` (a new temporary folder when None, which
        the caller owns). Falls back like :meth:`restore` when ``step`` is None.
        """

        def fetch(manifest: Manifest) -> str:
            in_place = self._storage.local_path(manifest.name) if local_dir is None else None
            target = in_place or os.fspath(local_dir or tempfile.mkdtemp(prefix=f"ckptman-restore-{manifest.step}-"))
            items = [
                (f"{manifest.name}/{entry.path}", entry, None if in_place else os.path.join(target, *entry.path.split("/")))
                for entry in manifest.files
            ]
            try:
                self._transfers.download_files(self._storage, items)
            except BaseException:
                for _, _, path in items:  # leave no mix of two checkpoints behind a fallback
                    if path:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                raise
            return target

        return self._first_verified(step, fetch)[1]

    def _restore_sharded(self, step: int | None, state: dict[str, Any] | None) -> dict[str, Any]:
        if not isinstance(state, dict):
            raise TypeError("restore(sharded=True) loads in place: pass state=<the state dict to fill>, e.g. model.state_dict()")

        def load(manifest: Manifest) -> dict[str, Any]:
            if manifest.kind != "sharded":
                raise CheckpointError(f"checkpoint {manifest.name} is a {manifest.kind} checkpoint, not sharded; restore it without sharded=True")
            # Each rank checks a share of the files; all ranks see every failure, so all decide alike.
            mine = manifest.files[self._control.rank :: self._control.world_size]
            problems = [p for share in self._control.all_gather(verify.check_files(self._transfers, self._storage, manifest, mine)) for p in share]
            if problems:
                raise CorruptCheckpointError("; ".join(problems))
            sharded_io.load(state, self._folder_url(manifest.name), self._storage_options, self._control)
            return state

        return self._first_verified(step, load)[1]

    def _folder_url(self, name: str) -> str:
        return f"{self._storage.url}/{name}"

    def verify(self, step: int | None = None) -> VerifyReport:
        """Check sizes and checksums of one or all committed checkpoints, without loading tensors.

        Folders whose manifest is unreadable count as failures when checking all.
        """
        self._check_open()
        if step is not None:
            return VerifyReport(self.directory, (verify.check(self._transfers, self._storage, self._manifest(step)),))
        results = [verify.check(self._transfers, self._storage, self._manifests[s]) for s in sorted(self._manifests)]
        results += [verify.CheckResult(name, None, (reason,)) for name, reason in sorted(self._unreadable.items())]
        return VerifyReport(self.directory, tuple(results))

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sidecar's content: committed checkpoints, metrics, best steps (JSON-serializable)."""
        return self._sidecar().to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt metrics from a saved ``state_dict()``; storage wins where both know a value.

        Checkpoints the dict lists but storage does not have are ignored with a
        warning; nothing is ever deleted because of a state dict.
        """
        loaded = SidecarState.from_dict(state, "load_state_dict() argument")
        self._background.wait()
        self._manifests = distributed.on_coordinator(self._control, lambda: self._adopt(loaded))

    def _adopt(self, loaded: SidecarState) -> dict[int, Manifest]:
        changed = False
        for record in loaded.checkpoints:
            manifest = self._manifests.get(record.step)
            if manifest is None or manifest.name != record.name:
                warnings.warn(
                    f"state dict lists checkpoint {record.name} (step {record.step}), which is not committed in "
                    f"{self.directory}; ignored",
                    CheckpointWarning,
                    stacklevel=4,
                )
                continue
            missing = {k: v for k, v in record.metrics.items() if k not in manifest.metrics}
            if missing:
                self._check_writable()
                self._check_lease()
                updated = manifest.with_metrics(missing)
                commit.rewrite(self._storage, updated)
                self._put(updated)
                changed = True
        if changed:
            self._apply_retention()
        return self._manifests

    def refresh(self) -> None:
        """Re-read the directory: manifests are the truth; repair leftovers and the sidecar if writable."""
        self._check_open()
        self._background.wait()
        self._manifests, self._unreadable, self._stored = distributed.on_coordinator(self._control, self._scan)

    def _scan(self) -> tuple[dict[int, Manifest], dict[str, str], SidecarState | None]:
        """Rank 0's listing, handed to every rank; a writable manager also cleans up and repairs."""
        found = commit.scan(self._storage, self._names.matches)
        manifests: dict[int, Manifest] = {}
        for manifest in sorted(found.committed.values(), key=lambda m: (not self._names.matches(m.name), m.name)):
            if manifest.step in manifests:
                found.unreadable[manifest.name] = f"step {manifest.step} is also committed as {manifests[manifest.step].name}"
                continue
            manifests[manifest.step] = manifest
        self._manifests = manifests
        self._unreadable = found.unreadable
        for name, reason in found.unreadable.items():
            warnings.warn(f"ignoring checkpoint folder {name}: {reason}", CheckpointWarning, stacklevel=5)
        self._stored = self._read_sidecar()
        if not self._read_only:
            self._check_lease()  # cleanup deletes: only the lease holder may
            for name in found.incomplete:
                commit.discard_incomplete(self._storage, name)
            self._storage.remove_temporaries()
            staging_dirs.remove_stale()
            self._repair_sidecar()
        return self._manifests, self._unreadable, self._stored

    def stored_state(self) -> dict[str, Any] | None:
        """The sidecar as found on storage at the last refresh (None if missing or unreadable).

        Unlike :meth:`state_dict`, this reflects the policy of whoever wrote
        the directory: ``stored_state()["policy"]["config"]`` rebuilds it
        with :func:`ckptman.policy.policy_from_config`.
        """
        return self._stored.to_dict() if self._stored else None

    # -- lifecycle ------------------------------------------------------------
    def wait_until_finished(self) -> None:
        """Block until the save in flight is committed; raises its error if it failed."""
        self._check_open()
        self._background.wait()

    def close(self) -> None:
        """Wait for saves in flight, then release the directory's lease."""
        if self._closed:
            return
        try:
            self._background.close()
        finally:
            self._closed = True
            if self._lease is not None:
                self._release.detach()
                self._lease.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------
    def _records(self) -> list[CheckpointRecord]:
        return [m.record() for m in self._manifests.values()]

    def _manifest(self, step: int | None) -> Manifest:
        if step is None:
            if not self._manifests:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory}")
            return self._manifests[max(self._manifests)]
        step = check_step(step)
        if step not in self._manifests:
            raise CheckpointNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory}; committed steps: {self.all_steps()}"
            )
        return self._manifests[step]

    def _first_verified(self, step: int | None, load: Callable[[Manifest], T]) -> tuple[Manifest, T]:
        """``load`` the asked-for checkpoint; for the latest, fall back past corrupted ones with a warning."""
        self._check_open()
        newest_first = [self._manifests[s] for s in sorted(self._manifests, reverse=True)]
        candidates = [self._manifest(step)] if step is not None else newest_first or [self._manifest(None)]

        def still_committed(manifest: Manifest) -> bool:
            return self._storage.exists(commit.manifest_path(manifest.name))

        manifest, result = restore.first_loadable(
            candidates, load, still_committed, fall_back=step is None, directory=self.directory
        )
        self._pinned = {manifest.step: RESUMED}
        return manifest, result

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"the manager for {self.directory} is closed; create a new CheckpointManager")
        if self._control.world_size == 1:
            # Across ranks a failure is raised where every rank waits for the save, so all raise at the same call.
            self._background.raise_if_failed()

    def _put(self, manifest: Manifest) -> None:
        """Copy-on-write, so readers on the caller's thread never see a dict change under them."""
        self._manifests = {**self._manifests, manifest.step: manifest}

    def _drop(self, step: int) -> None:
        self._manifests = {s: m for s, m in self._manifests.items() if s != step}

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(f"the manager for {self.directory} was opened with read_only=True; it cannot write")
        if self._lease is not None:
            self._lease.raise_if_lost()

    def _check_lease(self) -> None:
        """Read the lease before changing anything on storage: a writer that lost it must not write or delete."""
        if self._lease is not None:
            self._lease.check()

    def _check_save(
        self, step: object, metrics: Mapping[str, object] | None, epoch: object
    ) -> tuple[int, dict[str, float], int | None]:
        self._check_writable()
        step = check_step(step)
        values = coerce_metrics(metrics)
        checked_epoch = None if epoch is None else check_epoch(epoch)
        if step in self._manifests:
            raise StepExistsError(
                f"step {step} is already committed as {self._manifests[step].name} in {self.directory}; "
                "delete it first or save a later step"
            )
        inflight = self._background.inflight
        latest = max((s for s in (self.latest_step(), inflight.step if inflight else None) if s is not None), default=None)
        if inflight is not None and step == inflight.step:
            raise StepExistsError(f"step {step} is being saved in the background; save a later step")
        if latest is not None and step < latest:
            raise InvalidStepError(
                f"step {step} is older than the latest committed step {latest} in {self.directory}; "
                "steps must increase (delete newer checkpoints first to roll back)"
            )
        return step, values, checked_epoch

    def _decide(
        self, step: object, metrics: Mapping[str, object] | None, force: bool, epoch: object
    ) -> CheckpointRecord | None:
        """Validate a save and decide it on rank 0: the checkpoint to write, as every rank sees it, or None."""
        checked, values, checked_epoch = self._check_save(step, metrics, epoch)
        candidate = CheckpointRecord(checked, self._names(checked), values, epoch=checked_epoch)
        # Every rank joins, with or without metrics of its own (evaluation may run on rank 0 only).
        candidate, wanted = self._control.broadcast((candidate, force or self._wants(candidate)))
        return candidate if wanted else None

    def _wants(self, candidate: CheckpointRecord) -> bool:
        """Decided against the committed checkpoints plus the one being written in the background."""
        progress = self._progress(candidate.step, candidate.epoch)
        if self._policy.save.due(progress):
            return True
        if not candidate.metrics or not self._policy.metrics:
            return False  # the common per-step call: no history needed
        inflight = self._background.inflight
        history = self._records() + ([inflight] if inflight else [])
        return self._policy.wants(history, candidate, progress)

    def _progress(self, step: int, epoch: int | None) -> Progress:
        """What the triggers see: the clock since the last commit (none while a save is in flight, which
        counts as the newest save) and the highest epoch recorded, committed or in flight."""
        manifests = self._manifests
        if manifests is not self._epochs_seen_in:  # copy-on-write: a new dict means new manifests
            epochs = [m.epoch for m in manifests.values() if m.epoch is not None]
            if epochs:
                self._saved_epoch = max(epochs) if self._saved_epoch is None else max(self._saved_epoch, *epochs)
            self._epochs_seen_in = manifests
        saved_epoch = self._saved_epoch
        inflight = self._background.inflight
        if inflight is None:
            return Progress(step, epoch, time.monotonic() - self._last_save_at, saved_epoch)
        if inflight.epoch is not None and (saved_epoch is None or inflight.epoch > saved_epoch):
            saved_epoch = inflight.epoch
        return Progress(step, epoch, 0.0, saved_epoch)

    def _prepare_folder(self, step: int) -> str:
        name = self._names(step)
        if name in self._unreadable:
            raise CheckpointError(
                f"{self.directory}/{name} exists with an unreadable manifest ({self._unreadable[name]}); "
                "inspect it and delete it by hand before saving this step"
            )
        if name in self._leftovers:  # anything else was cleaned when the directory was opened
            if self._storage.exists(commit.manifest_path(name)):
                raise CheckpointError(
                    f"{self.directory}/{name} was committed by a save that reported a storage error; "
                    "call refresh() to see it"
                )
            commit.discard(self._storage, name)
            self._leftovers.discard(name)
        return name

    @contextlib.contextmanager
    def _discard_on_error(self, name: str) -> Iterator[None]:
        """A save that fails leaves nothing visible: its uncommitted folder is removed."""
        try:
            yield
        except BaseException:
            try:
                if self._storage.exists(commit.manifest_path(name)):
                    self._leftovers.add(name)  # committed although the call failed: never overwrite it blindly
                else:
                    commit.discard(self._storage, name)
            except Exception:  # noqa: BLE001 - storage is failing; clean up before this name is used again
                self._leftovers.add(name)
            raise

    def _fail_collectively(self, record: CheckpointRecord, error: Exception) -> None:
        """This rank failed before its save began: still take part, so every rank fails the save together."""

        def fail(name: str) -> list[FileEntry]:
            raise error

        self._background.wait()
        with contextlib.suppress(Exception):  # the caller gets the original error
            self._save_collectively(record, fail)

    def _save_collectively(self, record: CheckpointRecord, write_own: Callable[[str], Sequence[FileEntry]]) -> None:
        """The save sequence across ranks (see ckptman.commit): every rank writes its own files,
        rank 0 gathers their entries and commits, or discards the folder if any rank failed."""
        step, name = record.step, record.name
        distributed.on_coordinator(self._data, lambda: self._prepare_folder(step))
        own: tuple[FileEntry, ...] = ()
        failure: BaseException | None = None
        try:
            own = tuple(write_own(name))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every rank must reach the gather below (DCP raises BaseException)
            failure = exc
        reports = self._data.gather((own, None if failure is None else distributed.portable(failure)))

        def finish() -> dict[int, Manifest]:
            with self._discard_on_error(name):
                failed = [f"rank {rank}: {error[0]}: {error[1]}" for rank, (_, error) in enumerate(reports) if error]
                if failed:
                    raise CheckpointError(f"the save of step {step} failed, nothing was committed: {'; '.join(failed)}")
                entries = tuple(entry for files, _ in reports for entry in files)
                if not entries:
                    raise CheckpointError(f"save_directory({step}) wrote no files; nothing was committed")
                paths = [entry.path for entry in entries]
                if len(set(paths)) != len(paths):
                    raise CheckpointError(f"ranks wrote files with the same name into step {step}: {sorted(paths)}")
                self._commit(Manifest(step, name, record.kind, time.time(), entries, record.metrics, record.epoch))
            return self._manifests

        try:
            self._manifests = distributed.on_coordinator(self._data, finish)
        except Exception:
            if isinstance(failure, Exception):
                raise failure from None  # the failing rank reports its own error
            if failure is not None:
                raise CheckpointError(f"the save of step {step} failed on this rank: {failure}") from failure
            raise
        self._pinned = {}  # on every rank, as rank 0 did in _commit

    def _commit(self, manifest: Manifest) -> None:
        self._check_lease()
        commit.commit(self._storage, manifest)
        self._put(manifest)
        self._last_save_at = time.monotonic()
        self._pinned = {}  # a newer checkpoint is now the resume point
        logger.info("committed %s/%s (%d files, %d bytes)", self.directory, manifest.name, len(manifest.files), manifest.size)
        try:
            self._write_latest()
            self._apply_retention()
        except Exception as exc:  # noqa: BLE001 - the checkpoint is committed: say so, do not pretend it failed
            warnings.warn(
                f"checkpoint {manifest.name} is committed, but updating latest/retention/sidecar failed ({exc}); "
                "the next save or the next manager to open the directory repairs them",
                CheckpointWarning,
                stacklevel=4,
            )

    def _apply_retention(self) -> None:
        kept = self.kept_reasons()
        for step in sorted(set(self._manifests) - set(kept)):
            name = self._manifests[step].name
            logger.info("retention: deleting %s/%s", self.directory, name)
            commit.uncommit(self._storage, name)
            self._drop(step)
        self._write_sidecar()

    def _sidecar(self) -> SidecarState:
        records = self._records()
        best = {
            m.name: {"mode": m.mode, "steps": [r.step for r in top_k(records, m, self._policy.keep_best)]}
            for m in self._policy.metrics
        }
        latest = self._manifests[max(self._manifests)].name if self._manifests else None
        return SidecarState(tuple(records), best, latest, self._policy.describe())

    def _write_sidecar(self) -> None:
        state = self._sidecar()
        commit.write_sidecar(self._storage, state)
        self._stored = state

    def _write_latest(self) -> None:
        latest = self.latest_step()
        commit.write_latest(self._storage, None if latest is None else self._manifests[latest].name)

    def _read_sidecar(self) -> SidecarState | None:
        source = f"{self.directory}/{SIDECAR_NAME}"
        try:
            return commit.read_sidecar(self._storage)
        except FileNotFoundError:
            if self._manifests:
                warnings.warn(f"{source} is missing; {_FALLBACK}", CheckpointWarning, stacklevel=4)
        except ManifestError as exc:
            warnings.warn(f"{exc}; {_FALLBACK}", CheckpointWarning, stacklevel=4)
        return None

    def _repair_sidecar(self) -> None:
        """Rewrite the sidecar and ``latest`` when they disagree with the manifests."""
        stored, current = self._stored, self._sidecar()
        if stored is None and not self._manifests:
            return
        if stored is not None and stored.same_checkpoints(current):
            if stored.latest == current.latest and commit.read_latest(self._storage) == current.latest:
                return
        elif stored is not None:
            logger.warning("%s/%s was out of date with the manifests (interrupted save?); rebuilt", self.directory, SIDECAR_NAME)
        self._write_latest()
        self._write_sidecar()
