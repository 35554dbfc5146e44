"""``CkptmanCallback``: Hugging Face Trainer checkpoints committed through ckptman.

``Trainer(..., callbacks=[CkptmanCallback("s3://bucket/run", storage_options=...)])``.

The Trainer keeps writing its ``checkpoint-N`` folder in ``args.output_dir``
(model, optimizer, scheduler, RNG, ``trainer_state.json``); that folder is only
staging. In ``on_save`` (after the folder is complete) the main process commits
it with ``mgr.save_directory(global_step, metrics=..., epoch=..., force=True)``
and removes it. The files are hard-linked into the manager's staging folder
(copied only across file systems), so the bytes are written once locally and
uploaded once. The Trainer decides *when* to save (``save_strategy``); ckptman
decides what to keep: ``save_total_limit`` → ``keep_last``,
``metric_for_best_model``/``greater_is_better`` → the tracked best, never deleted.

Resume: ``trainer.train(resume_from_checkpoint=True)`` is resolved by the Trainer
with ``get_last_checkpoint(args.output_dir)``, the highest local ``checkpoint-N``,
unchecked (HF #35782), before any callback event of ``train()``. So in
``on_init_end`` (the main process of each node first, the others after it) the
callback removes every local ``checkpoint-N`` it did not stage itself (they are
saves ckptman never committed: it removes its staging folders once committed)
and stages ckptman's latest *verified* checkpoint there as ``checkpoint-<step>``
(hard links on local disk, a download otherwise), removed at the end of training.
``stage_for_resume=False`` skips that (e.g. for a Trainer that only evaluates);
``cb.latest_checkpoint()`` returns the same folder (None when nothing is
committed, which ``train`` takes as "from scratch", where ``True`` raises):
``trainer.train(resume_from_checkpoint=cb.latest_checkpoint())``.

Best model at the end: the Trainer's own ``_load_best_model`` runs before
``on_train_end`` but needs the local ``checkpoint-N`` folder, which is gone. So
``on_save`` clears ``state.best_model_checkpoint`` (the Trainer then skips its
load instead of warning "Could not locate the best model"), and ``on_train_end``
restores ckptman's best checkpoint and loads its weights as the Trainer does
(``model.safetensors`` or ``pytorch_model.bin``, ``strict=False``); afterwards
``state.best_model_checkpoint`` is the best checkpoint's URL.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
import transformers

from ckptman.adapting import remove_dead_branch
from ckptman.distributed import THIS_PROCESS
from ckptman.errors import CheckpointError, CheckpointWarning, PolicyConfigError
from ckptman.manager import CheckpointManager

__all__ = ["CkptmanCallback", "StagingFolderMissingError"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_FOLDER = re.compile(rf"^{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-(\d+)$")  # as get_last_checkpoint
_STAGED_MARK = ".ckptman-staged"  # in a checkpoint-N folder this callback staged for resume_from_checkpoint=True


class StagingFolderMissingError(CheckpointError, FileNotFoundError):
    """``on_save`` found no ``checkpoint-N`` folder where the Trainer writes it."""


class CkptmanCallback(transformers.TrainerCallback):
    """Commits every ``checkpoint-N`` the Trainer writes to a ckptman directory (any fsspec URL).

    ``keep_last`` overrides ``save_total_limit``; ``keep_every`` keeps every N-th
    step in addition. The latest checkpoint, the best one and the one a run resumed
    from are never deleted. ``stage_for_resume=False`` skips staging the latest
    checkpoint into ``output_dir`` for ``train(resume_from_checkpoint=True)``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        lease_timeout: float = 60.0,
        stage_for_resume: bool = True,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise PolicyConfigError(f"directory must be a path or fsspec URL, got {directory!r}")
        self._url = os.fspath(directory)
        self._storage_options = dict(storage_options or {})
        self._keep_last = keep_last
        self._keep_every = keep_every
        self._lease_timeout = lease_timeout
        self._mgr: CheckpointManager | None = None
        self._main = True
        self._manager_args: dict[str, Any] = {}
        self._downloads: list[str] = []
        self._stage_for_resume = bool(stage_for_resume)
        self._staged: str | None = None  # output_dir/checkpoint-<step> staged in on_init_end
        self._trained = False  # on_train_end ran: the lease is released, reads reopen read-only

    # -- the manager ---------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The manager of ``directory``: writable on the main process during training (from ``on_init_end``
        to ``on_train_end``, which releases the lease), read-only elsewhere and afterwards."""
        if self._mgr is None:
            if not self._manager_args:
                raise PolicyConfigError("CkptmanCallback has no TrainingArguments yet: pass it to Trainer(callbacks=[...])")
            writable = self._main and not self._trained
            self._mgr = CheckpointManager(self._url, read_only=not writable, **self._manager_args)
        return self._mgr

    def on_init_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        """TrainingArguments become the manager's policy; opened here so ``latest_checkpoint()`` works before ``train``."""
        self._main = bool(state.is_world_process_zero)
        self._trained = False
        self._manager_args = {"storage_options": self._storage_options, **_policy(args, self._keep_last, self._keep_every)}
        self._manager_args.update(lease_timeout=self._lease_timeout, process_group=THIS_PROCESS)
        self.manager  # noqa: B018  (fail at construction on a bad URL or a locked directory)
        if self._stage_for_resume:
            with args.main_process_first(local=True, desc="ckptman: staging the latest checkpoint for resume_from_checkpoint=True"):
                if state.is_local_process_zero:
                    self._stage_latest(str(args.output_dir))

    # -- saving ----------------------------------------------------------------------
    def on_save(self, args: transformers.TrainingArguments, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        """Commit the folder the Trainer just completed (main process), then remove it."""
        state.best_model_checkpoint = None  # the local folder goes away: the best is loaded in on_train_end
        if not state.is_world_process_zero:
            return
        folder = os.path.join(str(args.output_dir), f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise StagingFolderMissingError(f"on_save: the Trainer's checkpoint folder {folder} does not exist")
        metrics = _eval_metrics(state)
        with self.manager.save_directory(state.global_step, metrics=metrics or None, force=True, epoch=_completed_epochs(state)) as staging:
            if staging is not None:  # always, with force=True
                _link_tree(folder, staging)
        shutil.rmtree(folder, ignore_errors=True)

    # -- resuming --------------------------------------------------------------------
    def latest_checkpoint(self) -> str | None:
        """A local folder with the latest verified checkpoint, for ``train(resume_from_checkpoint=...)``; None if none.

        Newer checkpoints that fail verification are deleted with a warning (a dead
        branch: training from the older step would reach their steps again). It is
        the folder staged in ``output_dir`` for ``resume_from_checkpoint=True`` when
        that is still the latest; else, on local disk, the checkpoint itself (read it
        only), and remote ones are downloaded to a temporary folder, removed at the
        end of training.
        """
        mgr = self.manager
        mgr.refresh()
        latest = mgr.latest_step()
        if latest is None:
            return None
        if self._staged is not None and self._staged.endswith(f"-{latest}") and os.path.isdir(self._staged):
            return self._staged
        folder, _, downloaded = self._restore_latest()
        if downloaded:
            self._downloads.append(folder)
        return folder

    def _stage_latest(self, output_dir: str) -> None:
        """``output_dir`` gets ckptman's latest verified checkpoint as its only ``checkpoint-N`` (see the module docstring)."""
        mgr = self.manager
        mgr.refresh()
        for folder in _local_checkpoints(output_dir):
            if not os.path.exists(os.path.join(folder, _STAGED_MARK)) and _step_of(folder) not in mgr.all_steps():
                warnings.warn(
                    f"removing {folder}: ckptman never committed it (a save interrupted before the callback's on_save), "
                    "so resume_from_checkpoint=True must not load it",
                    CheckpointWarning,
                    stacklevel=4,
                )
            shutil.rmtree(folder)
        if mgr.latest_step() is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".ckptman-staging-", dir=output_dir)  # not a checkpoint-N until complete
        folder, step, downloaded = self._restore_latest()
        if downloaded:
            shutil.rmtree(staging)
            shutil.move(folder, staging)
        else:
            _link_tree(folder, staging)
        open(os.path.join(staging, _STAGED_MARK), "w").close()
        self._staged = os.path.join(output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}")
        os.replace(staging, self._staged)

    def _restore_latest(self) -> tuple[str, int, bool]:
        """The latest verified checkpoint as a local folder, the Trainer step it resumes at, and whether the
        folder is a download (else the checkpoint itself, on local disk). Newer checkpoints that failed
        verification are deleted (main process): training from the older step would reach their steps again."""
        mgr = self.manager
        folder = mgr.restore_directory()
        step = _trainer_step(folder)
        if self._main:
            remove_dead_branch(mgr, step, stacklevel=3)
        return folder, step, _downloaded(mgr, folder)

    # -- the end -----------------------------------------------------------------------
    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        """Load the best weights (``load_best_model_at_end``), drop downloads, release the lease."""
        try:
            mgr = self.manager
            if not self._main:
                mgr.refresh()
            best = mgr.best_step() if args.metric_for_best_model else None
            if args.load_best_model_at_end and best is not None and kwargs.get("model") is not None:
                _load_weights(kwargs["model"], mgr, best)
                state.best_model_checkpoint = mgr.checkpoint_path(best)
        finally:
            for folder in [*self._downloads, *([self._staged] if self._staged else [])]:
                shutil.rmtree(folder, ignore_errors=True)
            self._downloads, self._staged = [], None
            if self._mgr is not None:
                self._mgr.close()
                self._mgr = None
            self._trained = True


def _policy(args: transformers.TrainingArguments, keep_last: int | None, keep_every: int | None) -> dict[str, Any]:
    """``save_total_limit`` → keep_last; ``metric_for_best_model`` (``eval_``-prefixed as HF does) → best + mode."""
    metric = args.metric_for_best_model
    policy: dict[str, Any] = {"keep_last": keep_last if keep_last is not None else args.save_total_limit, "keep_every": keep_every}
    if metric:
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
        policy.update(best=name, mode="max" if greater else "min")
    return policy


def _eval_metrics(state: transformers.TrainerState) -> dict[str, float]:
    """The numeric ``eval_*`` values logged at this very step (the Trainer evaluates before it saves).

    An older evaluation is not attached: its score would make this checkpoint a false best.
    """
    for entry in reversed(state.log_history):
        if entry.get("step") != state.global_step:
            break
        values = {k: float(v) for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if values:
            return {k: v for k, v in values.items() if math.isfinite(v)}
    return {}


def _completed_epochs(state: transformers.TrainerState) -> int | None:
    """Epochs completed at this save: ``state.epoch`` is fractional mid-epoch and whole at an epoch's end."""
    return None if state.epoch is None else math.floor(state.epoch + 1e-9)


def _link_tree(source: str, target: str) -> None:
    """Hard-link every file of ``source`` into ``target`` (copy across file systems): no second local write."""
    for root, _dirs, files in os.walk(source):
        dest = os.path.join(target, os.path.relpath(root, source))
        os.makedirs(dest, exist_ok=True)
        for name in files:
            src, dst = os.path.join(root, name), os.path.join(dest, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _load_weights(model: torch.nn.Module, mgr: CheckpointManager, step: int) -> None:
    """Load a committed checkpoint's model weights as ``Trainer._load_best_model`` does for a plain model."""
    folder = mgr.restore_directory(step)
    downloaded = _downloaded(mgr, folder)
    try:
        for name in _WEIGHT_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                if name.endswith(".safetensors"):
                    weights = safetensors.torch.load_file(path, device="cpu")
                else:
                    weights = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(weights, False)
                return
        raise CheckpointError(f"{mgr.checkpoint_path(step)} holds none of {', '.join(_WEIGHT_FILES)}: cannot load the best model")
    finally:
        if downloaded:
            shutil.rmtree(folder, ignore_errors=True)


def _local_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders ``get_last_checkpoint`` would choose from."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if _CHECKPOINT_FOLDER.match(name)]
    return [os.path.join(output_dir, name) for name in names if os.path.isdir(os.path.join(output_dir, name))]


def _step_of(folder: str) -> int:
    return int(os.path.basename(folder).rsplit("-", 1)[1])


def _trainer_step(folder: str) -> int:
    """The global step a checkpoint folder resumes at, from the Trainer's own state file."""
    return int(transformers.TrainerState.load_from_json(os.path.join(folder, _TRAINER_STATE)).global_step)


def _downloaded(mgr: CheckpointManager, folder: str) -> bool:
    """Whether ``restore_directory`` made a copy (remote directory) rather than returning the checkpoint in place."""
    return all(folder != mgr.checkpoint_path(step) for step in mgr.all_steps())
