"""``CkptmanCheckpoint``: Lightning's ``ModelCheckpoint`` with ckptman underneath.

A subclass, so ``trainer.checkpoint_callback`` and everything reading it keep
working. Lightning still decides *where* in the loop a save is considered (its
``on_train_batch_end`` / ``on_train_epoch_end`` / ``on_validation_end``, the
sanity-check and ``fast_dev_run`` skips); at each such point one
``mgr.save(trainer.global_step, <Lightning's checkpoint dict>, metrics=...,
epoch=<completed epochs>)`` commits at most one checkpoint, and the manager's
triggers, best tracking and retention decide the rest. "last" is retention's
latest, never a second copy; nothing is a symlink.

Resume is hooked in two places, both inside Lightning's public extension points:

* ``setup()`` wraps ``trainer.strategy.checkpoint_io`` (it runs before Lightning
  loads ``ckpt_path``) so that a checkpoint URL of this directory, or the
  "last" token below, is loaded through ``mgr.restore()`` — verified against its
  manifest, with the storage options — and any other path goes to the wrapped IO.
* ``ckpt_path="last"`` is resolved by Lightning through
  ``ModelCheckpoint._find_last_checkpoints`` and then checked with a plain
  ``get_filesystem(path).exists(path)``, which cannot see a remote directory that
  needs storage options (Lightning #18261). The override returns a small local
  token file instead; loading it restores ckptman's latest verified checkpoint
  (falling back past corrupted ones). With nothing committed it returns no
  candidate and silences Lightning's "no last checkpoint" warning: a first run
  with ``ckpt_path="last"`` is expected.
* ``ckpt_path="best"`` reads ``best_model_path``, which is the best checkpoint's URL.

``best_model_path``, ``best_model_score``, ``best_k_models``,
``kth_best_model_path`` and ``last_model_path`` are computed from the manager's
catalog on every read, so they are right after a restart; what Lightning stored
in its callback state is ignored.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import ModelCheckpoint  # type: ignore[assignment]
    from pytorch_lightning.plugins.io import CheckpointIO  # type: ignore[assignment]
    from pytorch_lightning.utilities.rank_zero import rank_zero_only  # type: ignore[no-redef]

from ckptman.adapting import remove_dead_branch
from ckptman.distributed import THIS_PROCESS
from ckptman.errors import PolicyConfigError
from ckptman.manager import CheckpointManager

__all__ = ["CkptmanCheckpoint"]

_LAST_TOKEN_PREFIX = "ckptman-last-"
_NO_LAST_WARNING = r'.*ckpt_path="last"\) is set, but there is no last checkpoint available'


class CkptmanCheckpoint(ModelCheckpoint):
    """Drop-in for ``ModelCheckpoint`` that commits through ckptman to any fsspec URL.

    ``save_top_k`` with a ``monitor`` keeps the ``save_top_k`` best (``-1``: all);
    without one (Lightning allows -1, 0 and 1 there) -1 keeps all, else the newest.
    ``keep_last`` (newest N) and ``keep_every`` (every N-th step) add to that; the
    latest checkpoint, the best ones and the one a run resumed from are never deleted.
    ``save_on_exception`` and ``save_weights_only`` behave as in Lightning.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: datetime.timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        async_save: bool = False,
        lease_timeout: float = 60.0,
        save_weights_only: bool = False,
        save_on_exception: bool = False,
    ) -> None:
        if not isinstance(dirpath, (str, os.PathLike)) or not os.fspath(dirpath):
            raise PolicyConfigError(f"dirpath must be a path or fsspec URL, got {dirpath!r}")
        if save_last == "link":
            raise PolicyConfigError("save_last='link' makes a symlink; ckptman's last is the latest checkpoint: use True")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise PolicyConfigError(f"save_top_k must be an int >= -1, got {save_top_k!r}")
        self._url = os.fspath(dirpath)
        super().__init__(
            dirpath=None,  # Lightning's own path handling (realpath, ls, exists) is not used
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=save_last,
            save_weights_only=save_weights_only,
            save_on_exception=save_on_exception,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval,
            save_on_train_epoch_end=save_on_train_epoch_end,
        )
        self.dirpath = self._url
        self._manager_args: dict[str, Any] = {
            "storage_options": storage_options,
            "save_interval_steps": self._every_n_train_steps or None,
            "save_interval_epochs": self._every_n_epochs or None,
            "save_interval_seconds": train_time_interval.total_seconds() if train_time_interval else None,
            "keep_last": _keep_last(monitor, save_top_k, keep_last),
            "keep_every": keep_every,
            "best": monitor if save_top_k != 0 else None,
            "mode": mode if monitor and save_top_k != 0 else None,
            "keep_best": max(save_top_k, 1),
            "async_save": async_save,
            "lease_timeout": lease_timeout,
            "process_group": THIS_PROCESS,
        }
        self._mgr: CheckpointManager | None = None
        self._open = False
        self._last_token: str | None = None
        self._warning_filter: tuple[Any, ...] | None = None

    # -- the manager ---------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The manager of ``dirpath``; writable on global rank 0, read-only elsewhere."""
        return self._mgr if self._mgr is not None else self._reopen()

    def _reopen(self) -> CheckpointManager:
        read_only = rank_zero_only.rank != 0
        self._mgr = CheckpointManager(self._url, read_only=read_only, **self._manager_args)
        self._open = True
        return self._mgr

    # -- paths and scores from the catalog ----------------------------------------
    @property  # type: ignore[override]
    def best_model_path(self) -> str:
        mgr = self.manager
        step = mgr.best_step() if self.monitor else mgr.latest_step()
        return mgr.checkpoint_path(step) if step is not None else ""

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        """Lightning's own assignments (``__init__``, ``load_state_dict``) are ignored: storage is the truth."""

    @property  # type: ignore[override]
    def best_model_score(self) -> torch.Tensor | None:
        step = self.manager.best_step() if self.monitor else None
        return torch.tensor(self.manager.metrics(step)[self.monitor]) if step is not None else None

    @best_model_score.setter
    def best_model_score(self, value: Any) -> None:
        """Ignored, as ``best_model_path``."""

    @property  # type: ignore[override]
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """The kept top-k checkpoints' URLs and scores (empty without a monitor)."""
        return {self.manager.checkpoint_path(step): torch.tensor(score) for step, score in self._top_k()}

    @best_k_models.setter
    def best_k_models(self, value: Any) -> None:
        """Ignored, as ``best_model_path``."""

    @property  # type: ignore[override]
    def kth_best_model_path(self) -> str:
        top = self._top_k()
        return self.manager.checkpoint_path(top[-1][0]) if top else ""

    @kth_best_model_path.setter
    def kth_best_model_path(self, value: str) -> None:
        """Ignored, as ``best_model_path``."""

    @property  # type: ignore[override]
    def last_model_path(self) -> str:
        step = self.manager.latest_step() if self.save_last else None
        return self.manager.checkpoint_path(step) if step is not None else ""

    @last_model_path.setter
    def last_model_path(self, value: str) -> None:
        """Ignored, as ``best_model_path``."""

    def _top_k(self) -> list[tuple[int, float]]:
        """(step, score) of the committed checkpoints ranked by the monitor, best first, ``save_top_k`` long."""
        if not self.monitor or self.save_top_k == 0:
            return []
        mgr = self.manager
        scored = [(s, mgr.metrics(s)[self.monitor]) for s in mgr.all_steps() if self.monitor in mgr.metrics(s)]
        scored.sort(key=lambda item: item[1], reverse=self.mode == "max")
        return scored if self.save_top_k == -1 else scored[: self.save_top_k]

    # -- saving ----------------------------------------------------------------------
    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """One ``mgr.save`` per save point: it is the top-k candidate and "last" at once."""
        if self.save_top_k == 0 and not self.save_last:
            return
        metrics = {}
        if self.monitor is not None and self.monitor in monitor_candidates:
            metrics[self.monitor] = float(monitor_candidates[self.monitor])
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        step = trainer.global_step
        if trainer.is_global_zero:
            self.manager.save(step, checkpoint, metrics=metrics or None, epoch=_completed_epochs(trainer))
        trainer.strategy.barrier("ckptman-save")
        self._last_global_step_saved = step
        self._last_checkpoint_saved = self._url

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """Nothing to write: "last" is the latest committed checkpoint."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """``save_on_exception`` and friends land here: force a commit of the current step."""
        if trainer.is_global_zero:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            self.manager.save(trainer.global_step, checkpoint, epoch=_completed_epochs(trainer), force=True)
        self._last_global_step_saved = trainer.global_step

    # -- resuming --------------------------------------------------------------------
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """A local token for ckptman's latest checkpoint (see the module docstring); none when nothing is committed."""
        if self.manager.latest_step() is None:
            warnings.filterwarnings("ignore", message=_NO_LAST_WARNING)
            self._warning_filter = warnings.filters[0]
            return set()
        fd, self._last_token = tempfile.mkstemp(prefix=_LAST_TOKEN_PREFIX, suffix=".ckpt")
        with os.fdopen(fd, "w") as token:
            token.write(self.manager.directory)
        return {self._last_token}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        filters = cast("list[Any]", warnings.filters)
        if self._warning_filter is not None and self._warning_filter in filters:
            filters.remove(self._warning_filter)
        self._warning_filter = None
        if self._open:
            self.manager.refresh()
        else:
            self._reopen()
        if not isinstance(trainer.strategy.checkpoint_io, _CkptmanIO):
            trainer.strategy.checkpoint_io = _CkptmanIO(trainer.strategy.checkpoint_io, self)

    def load_checkpoint(self, path: str, map_location: Any, weights_only: bool | None) -> dict[str, Any] | None:
        """Lightning's checkpoint dict for ``path`` if it names one of ours (verified), else None."""
        only = True if weights_only is None else weights_only
        if self._last_token is not None and os.path.abspath(path) == self._last_token:
            self._drop_token()
            checkpoint = self.manager.restore(map_location=map_location, weights_only=only)
            self._remove_dead_branch(int(checkpoint["global_step"]))
            return checkpoint
        for step in self.manager.all_steps():
            if os.fspath(path).rstrip("/") == self.manager.checkpoint_path(step).rstrip("/"):
                return self.manager.restore(step, map_location=map_location, weights_only=only)
        return None

    def _remove_dead_branch(self, resumed: int) -> None:
        if rank_zero_only.rank == 0:  # read-only elsewhere; rank 0 deletes
            remove_dead_branch(self.manager, resumed, stacklevel=2)

    def _drop_token(self) -> None:
        if self._last_token is not None:
            _remove_if_present(self._last_token)
            self._last_token = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's stored paths and scores are not adopted: they come from the catalog."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves in flight are committed before ``fit`` returns."""
        if self._mgr is not None and trainer.is_global_zero:
            self._mgr.wait_until_finished()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """After ``save_on_exception``'s commit, close: Lightning calls no callback ``teardown`` on this path."""
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self._close()

    def _close(self) -> None:
        """Release the directory's lease (after saves in flight); the catalog stays readable for the path attributes."""
        self._drop_token()
        if self._mgr is not None:
            self._mgr.close()
            self._open = False


class _CkptmanIO(CheckpointIO):
    """Loads this callback's checkpoints through ckptman; everything else goes to the wrapped IO."""

    def __init__(self, wrapped: CheckpointIO, callback: CkptmanCheckpoint) -> None:
        self.wrapped = wrapped
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.wrapped.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        loaded = self.callback.load_checkpoint(os.fspath(path), map_location, weights_only)
        if loaded is not None:
            return loaded
        return self.wrapped.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()


def _keep_last(monitor: str | None, save_top_k: int, keep_last: int | None) -> int | None:
    """The newest ``keep_last``; else: -1 keeps all, a monitor keeps the best (and the latest), none keeps the latest."""
    if keep_last is not None:
        return keep_last
    if save_top_k == -1:
        return None
    return 1


def _completed_epochs(trainer: pl.Trainer) -> int:
    """Epochs completed at this save point: the current one counts once its last batch ran."""
    last_batch = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
    return trainer.current_epoch + (1 if last_batch else 0)


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
