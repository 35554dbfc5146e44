"""CkptmanCheckpoint with the real Lightning on local disk and moto S3: triggers, top-k/best, resume, SIGKILL.

Each epoch is 4 optimizer steps; ``val_loss`` by epoch is ``lightning_child.VAL_LOSS``
(3, 1, 2, 4, 5, ...), so the best checkpoint is the one of epoch 2 (step 8) and the
second best the one of epoch 3 (step 12).
"""

from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from adapter_child import require_framework, run_until_commits

require_framework(("lightning.pytorch", "pytorch_lightning"), extra="lightning", adapter="Lightning")

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]
from conftest import Backend
from lightning_child import (
    BATCHES_PER_EPOCH,
    ReportingCheckpoint,
    TinyModule,
    make_trainer,
)

from ckptman import (
    CheckpointManager,
    CheckpointWarning,
    LeaseWarning,
    PolicyConfigError,
)
from ckptman.lightning import CkptmanCheckpoint

CHILD = Path(__file__).with_name("lightning_child.py")
TOP_K = {"monitor": "val_loss", "save_top_k": 2, "save_last": True}


class StartRecorder(pl.Callback):
    """Where training (re)starts: the restored global step and epoch, and what the directory keeps then."""

    def __init__(self, checkpoint: CkptmanCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.start: tuple[int, int] | None = None
        self.kept_at_start: dict[int, tuple[str, ...]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = (trainer.global_step, trainer.current_epoch)
        self.kept_at_start = self.checkpoint.manager.kept_reasons()


def reader(backend: Backend) -> CheckpointManager:
    """Another process's view of the directory: read-only, no lease."""
    return CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True)


def fit(
    backend: Backend, max_epochs: int, ckpt_path: str | None = "last", cls: type[CkptmanCheckpoint] = CkptmanCheckpoint, **kwargs: Any
) -> tuple[CkptmanCheckpoint, StartRecorder, pl.Trainer]:
    callback = cls(backend.url, storage_options=backend.storage_options, **kwargs)
    recorder = StartRecorder(callback)
    trainer = make_trainer([callback, recorder], max_epochs)
    trainer.fit(TinyModule(), ckpt_path=ckpt_path)
    return callback, recorder, trainer


def assert_top_k_after(callback: CkptmanCheckpoint, mgr: CheckpointManager, latest: int) -> None:
    """Best step 8 (1.0), second best 12 (2.0), last = ``latest``; nothing else kept; everything verifies."""
    assert mgr.all_steps() == [8, 12, latest]
    assert callback.best_model_path == mgr.checkpoint_path(8)
    assert float(callback.best_model_score) == 1.0
    assert {p: float(v) for p, v in callback.best_k_models.items()} == {mgr.checkpoint_path(8): 1.0, mgr.checkpoint_path(12): 2.0}
    assert callback.kth_best_model_path == mgr.checkpoint_path(12)
    assert callback.last_model_path == mgr.checkpoint_path(latest)
    assert mgr.verify().ok


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_epoch_trigger_top_k_then_resume_last_and_best(backend: Backend) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, recorder, _ = fit(backend, 5, **TOP_K)
    assert recorder.start == (0, 0)
    assert not [w for w in caught if "last checkpoint" in str(w.message)], "nothing committed: no warning"
    mgr = reader(backend)
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [2, 3, 5]
    assert_top_k_after(callback, mgr, latest=20)
    # "last" is the latest checkpoint, not a copy: no .ckpt file, no symlink.
    fs, root = backend.fs(fresh=True)
    assert not [p for p in fs.ls(root, detail=False) if p.endswith(".ckpt")]

    # A new callback, as after a restart: the paths come from storage, and "last" resumes from step 20, epoch 5.
    callback, recorder, trainer = fit(backend, 7, **TOP_K)
    assert recorder.start == (20, 5)
    assert recorder.kept_at_start[20] == ("latest", "last 1", "resumed from")
    assert trainer.global_step == 28
    assert_top_k_after(callback, reader(backend), latest=28)

    # "best" loads step 8 (epoch 2 done): max_epochs=2 trains nothing further.
    callback, recorder, trainer = fit(backend, 2, ckpt_path="best", **TOP_K)
    assert recorder.start is None and trainer.global_step == 8
    assert callback.best_model_path == reader(backend).checkpoint_path(8)


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_step_trigger_keep_last_and_resume_mid_run(backend: Backend) -> None:
    options: dict[str, Any] = {"every_n_train_steps": 3, "keep_last": 2, "keep_every": 6, "async_save": True}
    callback, _, _ = fit(backend, 3, **options)
    mgr = reader(backend)
    assert mgr.all_steps() == [6, 9, 12]  # saved at 3, 6, 9, 12; the newest 2 and every 6th
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [1, 2, 3]
    assert callback.best_model_path == mgr.checkpoint_path(12) and callback.best_model_score is None
    assert callback.last_model_path == ""  # save_last not set, as in ModelCheckpoint

    callback, recorder, trainer = fit(backend, 4, **options)
    assert recorder.start is not None and recorder.start[0] == 12
    assert trainer.global_step == 16
    assert reader(backend).all_steps() == [6, 12, 15]
    assert reader(backend).verify().ok


def run_child_until_commits(backend: Backend, commits: int, tmp_path: Path) -> list[tuple[int, int]]:
    """Train in a subprocess; SIGKILL it once it reported ``commits`` commits. Returns (step, epoch) of each."""
    config = {
        "url": backend.url,
        "storage_options": backend.storage_options,
        "max_epochs": 6,
        "callback": {**TOP_K, "lease_timeout": 2.0},
    }
    return run_until_commits(CHILD, config, commits, tmp_path)


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_sigkill_after_second_commit_then_resume_last(backend: Backend, tmp_path: Path) -> None:
    assert run_child_until_commits(backend, 2, tmp_path) == [(4, 1), (8, 2)]
    time.sleep(2.5)  # the killed child's lease (2 s) expires
    before = reader(backend)
    assert before.all_steps() == [4, 8] and before.verify().ok

    with pytest.warns(LeaseWarning, match="stale lease"):
        callback, recorder, trainer = fit(backend, 6, cls=ReportingCheckpoint, **TOP_K)  # same callback state key
    assert recorder.start == (8, 2)  # the committed step and epoch, not from scratch
    assert "resumed from" in recorder.kept_at_start[8]
    assert trainer.global_step == 6 * BATCHES_PER_EPOCH
    assert_top_k_after(callback, reader(backend), latest=24)


def test_resume_falls_back_past_a_corrupted_latest_and_removes_it(local_backend: Backend) -> None:
    fit(local_backend, 3, **TOP_K)  # steps 8 (best), 12 (second best and latest)
    state = Path(reader(local_backend).checkpoint_path(12)) / "state.pt"
    state.write_bytes(b"x" * state.stat().st_size)  # same size, wrong bytes
    with pytest.warns(CheckpointWarning) as caught:
        _, recorder, trainer = fit(local_backend, 3, **TOP_K)
    assert any("failed verification" in str(w.message) for w in caught)
    assert recorder.start == (8, 2)
    mgr = reader(local_backend)
    assert mgr.all_steps() == [8, 12] and trainer.global_step == 12  # epoch 3 trained again, committed anew
    assert mgr.verify().ok


def test_bad_arguments_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="symlink"):
        CkptmanCheckpoint(str(tmp_path), save_last="link")  # type: ignore[arg-type]
    with pytest.raises(PolicyConfigError, match="dirpath"):
        CkptmanCheckpoint("")
    with pytest.raises(PolicyConfigError, match="save_top_k"):
        CkptmanCheckpoint(str(tmp_path), monitor="val_loss", save_top_k=-2)


class CommitLog(CkptmanCheckpoint):
    """Records the step of every commit (the directory keeps only what retention leaves)."""

    commits: list[int]

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self.commits = [*getattr(self, "commits", []), self.manager.latest_step()]


def test_time_trigger_saves_by_wall_clock(local_backend: Backend) -> None:
    callback, _, _ = fit(local_backend, 2, cls=CommitLog, train_time_interval=datetime.timedelta(microseconds=1))
    assert isinstance(callback, CommitLog)
    assert callback.commits == list(range(1, 2 * BATCHES_PER_EPOCH + 1))  # due after every step
    mgr = reader(local_backend)
    assert mgr.all_steps() == [8] and mgr.record(8).epoch == 2  # no monitor, save_top_k=1: the newest


class FailsAtStep6(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == 6:
            raise RuntimeError("boom at step 6")
        return super().training_step(batch, batch_idx)


def test_save_on_exception_commits_the_step_it_failed_at(local_backend: Backend) -> None:
    callback = CkptmanCheckpoint(local_backend.url, save_on_exception=True, keep_last=3)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([callback], 3).fit(FailsAtStep6(), ckpt_path="last")
    mgr = reader(local_backend)
    assert mgr.all_steps() == [4, 6] and mgr.verify().ok
    # The failed run released the lease: the next one resumes from step 6 at once.
    _, recorder, trainer = fit(local_backend, 3, keep_last=3)
    assert recorder.start == (6, 1) and trainer.global_step == 12
