"""CheckpointManager: orchestration only.

Decisions come from :mod:`ckptman.policy` (pure); what is committed lives in
the :class:`~ckptman.catalog.Catalog`, the same on every rank; rank 0's
bookkeeping (open, repair, retention, ``latest``, sidecar) is
:mod:`ckptman.bookkeeping`; the save sequence across ranks is
:mod:`ckptman.saving`; how each checkpoint kind is written and read is
:mod:`ckptman.kinds`; publishing a checkpoint as a standalone file is
:mod:`ckptman.publish`; bytes go through :mod:`ckptman.storage`. Storage is the
truth, re-read on construction and by :meth:`CheckpointManager.refresh`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from ckptman import commit, distributed, restore, saving, verify
from ckptman import publish as publishing
from ckptman import staging as staging_dirs
from ckptman.background import BackgroundWriter, Snapshotter
from ckptman.bookkeeping import Bookkeeper
from ckptman.catalog import Catalog
from ckptman.deciding import Decider
from ckptman.errors import (
    InvalidMetricError,
    ManagerClosedError,
    ReadOnlyError,
    StateRequiredError,
)
from ckptman.kinds import Directory, Place, Sharded, StateFile
from ckptman.lease import Lease
from ckptman.manifest import Manifest
from ckptman.naming import NameFormat, check_step
from ckptman.policy import build_policy
from ckptman.policy.best import coerce_metrics
from ckptman.policy.save import require_int
from ckptman.record import CheckpointRecord
from ckptman.retry import RetryPolicy
from ckptman.state import SidecarState
from ckptman.storage import Storage
from ckptman.transfer import Transfers
from ckptman.verify import VerifyReport

T = TypeVar("T")


class CheckpointManager:
    """Decides when to save, commits checkpoints through fsspec, keeps them by policy.

    See docs/getting-started.md for the argument reference; every argument is validated
    here, so a bad setting fails at construction, not after hours of training.

    ``process_group=None`` inside an initialised torch.distributed job makes the
    manager collective: every rank of the default group constructs it and calls
    it. Code that runs on one rank only (a framework hook on rank 0) passes
    ``process_group=ckptman.THIS_PROCESS``: a manager for this process alone, with
    no process group and no collective (no sharded saves; the lease is this
    process's). A collective manager constructed on some ranks only raises
    ``MissingRanksError`` once ``dist_timeout`` (None: 60 s) has passed.

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
        transfers = Transfers(require_int("max_concurrency", max_concurrency, minimum=1), progress)
        timeout = distributed.check_timeout(dist_timeout)
        self._read_only = bool(read_only)
        self._closed = False
        self._storage = Storage(directory, storage_options, retry, transfers.max_concurrency)
        self._place = Place(self._storage, transfers, dict(storage_options or {}))
        self._catalog = Catalog(self._storage.url)
        self._books = Bookkeeper(self._storage, self._policy, self._names, self._catalog, self._read_only)
        self._background = BackgroundWriter(bool(async_save))
        self._decider = Decider(self._policy, self._names, self._catalog, self._books, self._background)
        self._snapshots = Snapshotter()
        # Decisions on the caller's thread and background saves each get their own group,
        # so their collectives never interleave.
        self._control = distributed.coordinator(process_group, timeout)
        self._data = distributed.coordinator(process_group, timeout) if async_save else self._control
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
        self._books.lease = lease
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
        return self._decider.should_save(step, epoch)

    def all_steps(self) -> list[int]:
        return self._catalog.steps()

    def latest_step(self) -> int | None:
        return self._catalog.latest_step()

    def best_step(self, metric: str | None = None) -> int | None:
        """The best committed step for ``metric`` (the first tracked metric when None)."""
        best = self._policy.best(self._catalog.records(), metric)
        return best.step if best else None

    def metrics(self, step: int) -> dict[str, float]:
        return dict(self._catalog.manifest(step).metrics)

    def kept_reasons(self) -> dict[int, tuple[str, ...]]:
        """Why each committed checkpoint is kept, by retention rule (what ``ckptman ls`` shows)."""
        return self._books.kept_reasons()

    def checkpoint_path(self, step: int) -> str:
        """The URL of a committed checkpoint's folder."""
        return self._place.folder_url(self._catalog.manifest(step).name)

    def record(self, step: int) -> CheckpointRecord:
        return self._catalog.manifest(step).record()

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
        if sharded:
            distributed.require_every_rank(self._control, "save(sharded=True)")
        candidate = self._decide(step, metrics, force, epoch)
        if candidate is None:
            return False
        payload = state
        if self._background.enabled:
            self._background.wait()  # one save in flight; its buffers are free again
            payload = self._snapshots.take(state)
        kind = Sharded if sharded else StateFile
        record = dataclasses.replace(candidate, kind=kind.kind)
        write_own = lambda name: kind.write(self._place, self._data, payload, name)  # noqa: E731
        self._background.submit(lambda: saving.save_collectively(self._data, self._books, record, write_own), record)
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
        record = dataclasses.replace(candidate, kind=Directory.kind)
        staging = staging_dirs.make(f"save-{record.step}")
        try:
            yield staging
            self._check_open()
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if self._data.world_size > 1 and isinstance(exc, Exception):
                self._background.wait()
                saving.fail_collectively(self._data, self._books, record, exc)
            raise

        def save() -> None:
            try:
                write_own = lambda name: Directory.upload(self._place, staging, record.step, name)  # noqa: E731
                saving.save_collectively(self._data, self._books, record, write_own)
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
        manifest = self._catalog.manifest(check_step(step)).with_metrics(values)

        def rewrite() -> None:
            self._books.rewrite(manifest)
            self._books.apply_retention()

        self._catalog.on_coordinator(self._control, rewrite)

    def delete(self, step: int) -> None:
        """Delete one committed checkpoint (manifest first)."""
        self._check_writable()
        self._background.wait()
        manifest = self._catalog.manifest(check_step(step))
        self._catalog.on_coordinator(self._control, lambda: self._books.delete(manifest))
        self._catalog.pinned = {s: r for s, r in self._catalog.pinned.items() if s != manifest.step}

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
        if not sharded:
            return self._first_verified(step, lambda m: StateFile.load(self._place, m, map_location, weights_only))
        distributed.require_every_rank(self._control, "restore(sharded=True)")
        if not isinstance(state, dict):
            raise StateRequiredError(
                "restore(sharded=True) loads in place: pass state=<the state dict to fill>, e.g. model.state_dict()"
            )
        return self._first_verified(step, lambda m: Sharded.load(self._place, self._control, m, state))

    def restore_directory(self, step: int | None = None, local_dir: str | os.PathLike[str] | None = None) -> str:
        """A local directory holding a committed checkpoint's files, verified against its manifest.

        On local disk with ``local_dir=None`` this is the checkpoint folder
        itself (no copy; treat it as read-only). Otherwise the files are
        downloaded into ``local_dir`` (a new temporary folder when None, which
        the caller owns). Falls back like :meth:`restore` when ``step`` is None.
        """
        return self._first_verified(step, lambda m: Directory.fetch(self._place, m, local_dir))

    def publish(
        self,
        step: int | None = None,
        *,
        keys: str | Sequence[str] | None = None,
        to: str | os.PathLike[str] | None = None,
        weights_only: bool = True,
    ) -> str:
        """Write a verified state checkpoint, trimmed to its top-level ``keys``, as one standalone ``.pth``; returns its URL.

        For handing weights on (a model zoo, inference): an ordinary
        ``torch.save`` file, written atomically, outside retention. By default
        it goes to ``<directory>/published/<name>-<sha256[:8]>.pth``, which
        needs a writable manager; a read-only manager publishes with ``to=``
        outside the directory (a file URL or path, or a folder ending in
        ``/``). The checkpoint is loaded as :meth:`restore` loads it (the
        latest that verifies when ``step`` is None) but is not pinned as
        resumed from. In a distributed run rank 0 writes and every rank gets the URL.
        """
        self._check_open()
        request = publishing.Request(publishing.check_keys(keys), publishing.resolve(to, self._storage, self._place.storage_options))
        if request.target.inside_directory:
            self._check_writable("publish() writes into the directory; pass to= a place outside it to publish from here")
        self._background.wait()  # "the latest" includes a save still in flight
        load = lambda m: publishing.load(self._place, m, weights_only)  # noqa: E731
        return distributed.on_coordinator(
            self._control, lambda: publishing.publish(request, lambda: self._first_verified(step, load, pin=False))
        )

    def verify(self, step: int | None = None) -> VerifyReport:
        """Check sizes and checksums of one or all committed checkpoints, without loading tensors.

        Folders whose manifest is unreadable count as failures when checking all.
        """
        self._check_open()

        def check(manifest: Manifest) -> verify.CheckResult:
            return verify.check(self._place.transfers, self._storage, manifest)

        if step is not None:
            return VerifyReport(self.directory, (check(self._catalog.manifest(step)),))
        results = [check(manifest) for manifest in reversed(self._catalog.newest_first())]
        results += [verify.CheckResult(name, None, (reason,)) for name, reason in sorted(self._catalog.unreadable.items())]
        return VerifyReport(self.directory, tuple(results))

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sidecar's content: committed checkpoints, metrics, best steps (JSON-serializable)."""
        return self._books.sidecar().to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt metrics from a saved ``state_dict()``; storage wins where both know a value.

        Checkpoints the dict lists but storage does not have are ignored with a
        warning; nothing is ever deleted because of a state dict.
        """
        loaded = SidecarState.from_dict(state, "load_state_dict() argument")
        self._background.wait()
        self._catalog.on_coordinator(self._control, lambda: self._books.adopt(loaded))

    def refresh(self) -> None:
        """Re-read the directory: manifests are the truth; repair leftovers and the sidecar if writable."""
        self._check_open()
        self._background.wait()
        self._catalog.on_coordinator(self._control, self._books.scan)

    def stored_state(self) -> dict[str, Any] | None:
        """The sidecar as found on storage at the last refresh (None if missing or unreadable).

        Unlike :meth:`state_dict`, this reflects the policy of whoever wrote
        the directory: ``stored_state()["policy"]["config"]`` rebuilds it
        with :func:`ckptman.policy.policy_from_config`.
        """
        stored = self._catalog.stored
        return stored.to_dict() if stored else None

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
            if self._books.lease is not None:
                self._release.detach()
                self._books.lease.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------
    def _first_verified(self, step: int | None, load: Callable[[Manifest], T], *, pin: bool = True) -> T:
        """``load`` the asked-for checkpoint; for the latest, fall back past corrupted ones with a warning.

        ``pin``: protect it from retention as the checkpoint this run resumed from (restores do; publishing does not).
        """
        self._check_open()
        candidates = [self._catalog.manifest(step)] if step is not None else self._catalog.newest_first()
        if not candidates:
            self._catalog.manifest(None)  # raises: nothing committed

        def still_committed(manifest: Manifest) -> bool:
            return self._storage.exists(commit.manifest_path(manifest.name))

        manifest, result = restore.first_loadable(
            candidates, load, still_committed, fall_back=step is None, directory=self.directory
        )
        if pin:
            self._catalog.pin_resumed(manifest.step)
        return result

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError(f"the manager for {self.directory} is closed; create a new CheckpointManager")
        if self._control.world_size == 1:
            # Across ranks a failure is raised where every rank waits for the save, so all raise at the same call.
            self._background.raise_if_failed()

    def _check_writable(self, hint: str = "") -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(
                f"the manager for {self.directory} was opened with read_only=True; it cannot write" + (f"; {hint}" if hint else "")
            )
        if self._books.lease is not None:
            self._books.lease.raise_if_lost()

    def _decide(
        self, step: object, metrics: Mapping[str, object] | None, force: bool, epoch: object
    ) -> CheckpointRecord | None:
        self._check_writable()
        return self._decider.decide(self._control, step, metrics, force, epoch)
