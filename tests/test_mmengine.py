"""CkptmanCheckpointHook with the real mmengine on local disk and moto S3: triggers, best, resume, SIGKILL.

Each epoch is 4 iterations; ``val_loss`` by completed epochs is ``mmengine_child.VAL_LOSS``
(3, 1, 2, 4, ...), so the best checkpoint is the one of epoch 2 (step 8). The
mmengine ``work_dir`` is local; the run folder is ``out_dir/<basename of work_dir>``
on the backend, as with the seed hook.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from adapter_child import require_framework, run_until_commits

require_framework("mmengine", extra="mmengine", adapter="mmengine")

import torch
from conftest import Backend
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import _load_checkpoint
from mmengine_child import ProgressProbe, make_runner, quiet

from ckptman import (
    CheckpointManager,
    CheckpointWarning,
    InvalidStepError,
    LeaseWarning,
    PolicyConfigError,
)
from ckptman.mmengine import SCHEME, CkptmanCheckpointHook

CHILD = Path(__file__).with_name("mmengine_child.py")
BEST = {"save_best": "val_loss", "max_keep_ckpts": 1}


@pytest.fixture(autouse=True)
def _quiet_mmengine() -> None:
    quiet()


def hook_args(backend: Backend, **kwargs: Any) -> dict[str, Any]:
    return {"out_dir": backend.url, "storage_options": backend.storage_options, **kwargs}


def reader(backend: Backend, work_dir: Path) -> CheckpointManager:
    """Another process's view of the run folder: read-only, no lease."""
    return CheckpointManager(f"{backend.url}/{work_dir.name}", storage_options=backend.storage_options, read_only=True)


def train(work_dir: Path, hook: dict[str, Any], **kwargs: Any) -> tuple[Any, ProgressProbe, CkptmanCheckpointHook]:
    probe = ProgressProbe()
    runner = make_runner(str(work_dir), hook, probe=probe, **kwargs)
    runner.train()
    ours = next(h for h in runner.hooks if isinstance(h, CkptmanCheckpointHook))
    return runner, probe, ours


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
@pytest.mark.parametrize("flexible", [False, True], ids=["Runner", "FlexibleRunner"])
def test_epoch_interval_best_publish_then_resume(backend: Backend, tmp_path: Path, flexible: bool) -> None:
    work_dir = tmp_path / "exp"
    hook = hook_args(backend, interval=2, published_keys=["meta", "state_dict"], **BEST)
    runner, probe, ours = train(work_dir, hook, max_epochs=5, flexible=flexible)
    assert probe.start == (0, 0)
    mgr = reader(backend, work_dir)
    # Saved at epochs 2 and 4 (interval), 5 (save_last); the best (epoch 2, step 8) stays, no best_*.pth copy.
    assert mgr.all_steps() == [8, 20]
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [2, 5]
    assert mgr.metrics(8) == {"val_loss": 1.0}
    assert ours.best_ckpt_path == mgr.checkpoint_path(8) == runner.message_hub.get_info("best_ckpt")
    assert runner.message_hub.get_info("best_score") == 1.0
    assert ours.last_ckpt == mgr.checkpoint_path(20)
    assert (work_dir / "last_checkpoint").read_text() == SCHEME + mgr.directory
    fs, root = backend.fs(fresh=True)
    assert not [p for p in fs.find(root) if os.path.basename(p).startswith(("best_", "epoch_"))]
    # published_keys: the last and the best, trimmed to those keys, loadable with weights_only=True.
    published = sorted(p for p in fs.find(root) if "/published/" in p)
    assert len(published) == 2
    with fs.open(published[0], "rb") as f:
        assert set(torch.load(f, weights_only=True)) == {"meta", "state_dict"}

    # A new runner with resume=True continues at epoch 5 / iteration 20; best and paths come from storage.
    runner, probe, ours = train(work_dir, hook, max_epochs=7, flexible=flexible)
    assert probe.start == (5, 20)
    assert probe.kept_at_start[20] == ("latest", "last 1", "resumed from")
    assert probe.kept_at_start[8] == ("best val_loss #1",)
    assert runner.message_hub.get_info("best_score") == 1.0
    mgr = reader(backend, work_dir)
    assert mgr.all_steps() == [8, 28]  # 24 (epoch 6) and then 28 (save_last) replaced the resumed-from 20
    assert mgr.verify().ok


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_iteration_interval_keep_last_and_resume(backend: Backend, tmp_path: Path) -> None:
    work_dir = tmp_path / "iters"
    hook = hook_args(backend, interval=3, by_epoch=False, max_keep_ckpts=2, save_last=False)
    _, probe, _ = train(work_dir, hook, max_iters=12)
    mgr = reader(backend, work_dir)
    assert mgr.all_steps() == [9, 12]  # saved at 3, 6, 9, 12; the newest 2
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [0, 0]  # an iteration-based loop has no epochs

    _, probe, _ = train(work_dir, hook, max_iters=18)
    assert probe.start == (0, 12)
    assert reader(backend, work_dir).all_steps() == [15, 18]


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_sigkill_after_second_commit_then_resume(backend: Backend, tmp_path: Path) -> None:
    work_dir = tmp_path / "killed"
    hook = hook_args(backend, interval=1, lease_timeout=2.0, **BEST)
    config = {"work_dir": str(work_dir), "hook": hook, "max_epochs": 6}
    assert run_until_commits(CHILD, config, 2, tmp_path) == [(4, 1), (8, 2)]
    time.sleep(2.5)  # the killed child's lease (2 s) expires
    before = reader(backend, work_dir)
    # Killed right after committing step 8, before epoch 2's validation: the best so far is step 4 (3.0).
    assert before.all_steps() == [4, 8] and before.verify().ok
    assert before.metrics(4) == {"val_loss": 3.0} and before.metrics(8) == {}

    with pytest.warns(LeaseWarning, match="stale lease"):
        runner, probe, _ = train(work_dir, {k: v for k, v in hook.items() if k != "lease_timeout"}, max_epochs=6)
    assert probe.start == (2, 8)  # the committed epoch and iteration, not from scratch
    assert probe.kept_at_start == {4: ("best val_loss #1",), 8: ("latest", "last 1", "resumed from")}
    # Epoch 3 validates at 2.0, a new best; the later ones are worse.
    assert runner.iter == 24 and runner.message_hub.get_info("best_score") == 2.0
    mgr = reader(backend, work_dir)
    assert mgr.all_steps() == [12, 24] and mgr.verify().ok  # the best (12) and the latest


def test_resume_falls_back_past_a_corrupted_latest_and_removes_it(local_backend: Backend, tmp_path: Path) -> None:
    work_dir = tmp_path / "corrupt"
    hook = hook_args(local_backend, interval=1, max_keep_ckpts=2)
    train(work_dir, hook, max_epochs=3)  # steps 8 and 12 kept
    mgr = reader(local_backend, work_dir)
    state = Path(mgr.checkpoint_path(12)) / "state.pt"
    state.write_bytes(b"x" * state.stat().st_size)  # same size, wrong bytes
    with pytest.warns(CheckpointWarning) as caught:
        _, probe, _ = train(work_dir, hook, max_epochs=3)
    assert any("failed verification" in str(w.message) for w in caught)
    assert any("deleting" in str(w.message) for w in caught)
    assert probe.start == (2, 8)
    mgr = reader(local_backend, work_dir)
    assert mgr.all_steps() == [8, 12] and mgr.verify().ok  # epoch 3 trained again, committed anew


def test_several_best_metrics_with_rules_and_auto(local_backend: Backend, tmp_path: Path) -> None:
    # val_loss is best at epoch 2; acc (= -val_loss, greater is better) too; message_hub gets per-key entries.
    work_dir = tmp_path / "multi"
    hook = hook_args(local_backend, save_best=["val_loss", "acc"], rule=["less", "greater"], max_keep_ckpts=1)
    runner, _, ours = train(work_dir, hook, max_epochs=4)
    mgr = reader(local_backend, work_dir)
    assert mgr.all_steps() == [8, 16]  # no interval: the best by validation, and the last epoch
    assert runner.message_hub.get_info("best_score_acc") == -1.0
    assert ours.best_ckpt_path_dict == {"val_loss": mgr.checkpoint_path(8), "acc": mgr.checkpoint_path(8)}

    work_dir = tmp_path / "auto"
    runner, _, ours = train(work_dir, hook_args(local_backend, save_best="auto", max_keep_ckpts=1), max_epochs=4)
    assert reader(local_backend, work_dir).all_steps() == [8, 16]
    assert ours.key_indicators == ["val_loss"] and runner.message_hub.get_info("best_score") == 1.0


def test_checkpoint_loads_with_weights_only_through_load_from(local_backend: Backend, tmp_path: Path) -> None:
    work_dir = tmp_path / "weights"
    train(work_dir, hook_args(local_backend, interval=1, max_keep_ckpts=1), max_epochs=2)
    mgr = reader(local_backend, work_dir)
    # The stored dict loads with torch's default weights_only=True (mmengine's own fails there: #1655) ...
    stored = mgr.restore()
    assert stored["meta"]["iter"] == 8 and stored["meta"]["epoch"] == 2
    # ... and ckptman:// decodes it back to mmengine's objects for any mmengine loader.
    loaded = _load_checkpoint(SCHEME + mgr.directory + "?step=8")
    assert type(loaded["message_hub"]["log_scalars"]["train/loss"]).__name__ == "HistoryBuffer"
    assert set(loaded) >= {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    # load_from (not resume) with a ckptman:// URL: the weights only, training from iteration 0.
    _, probe, _ = train(tmp_path / "fresh", hook_args(local_backend, interval=1), max_epochs=1, resume=False, load_from=SCHEME + mgr.directory)
    assert probe.start == (0, 0)


def test_bad_arguments_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="storage_options"):
        HOOKS.build({'type': "CkptmanCheckpointHook", 'backend_args': {"backend": "petrel"}})
    with pytest.raises(PolicyConfigError, match="storage_options"):
        CkptmanCheckpointHook(file_client_args={"backend": "disk"})
    with pytest.raises(PolicyConfigError, match="max_keep_ckpts"):
        CkptmanCheckpointHook(max_keep_ckpts="3")  # type: ignore[arg-type]
    with pytest.raises(InvalidStepError, match=r"\?step="):
        _load_checkpoint(f"{SCHEME}{tmp_path}?step=last")
    with pytest.raises(ValueError, match="rule"):
        CkptmanCheckpointHook(save_best="mse")  # the seed's own check: no rule can be inferred for 'mse'
    assert isinstance(HOOKS.build({'type': "CkptmanCheckpointHook", 'interval': 1, 'filename_tmpl': "ep_{}.pth"}), CkptmanCheckpointHook)


def test_best_saved_after_validation_records_the_completed_epoch(local_backend: Backend, tmp_path: Path) -> None:
    # FlexibleRunner.save_checkpoint overwrites the meta it is given (epoch + 1 after validation); the hook's wins,
    # so a resume from a best saved after validation does not skip an epoch.
    work_dir = tmp_path / "flex"
    train(work_dir, hook_args(local_backend, save_best="val_loss"), max_epochs=2, flexible=True)
    mgr = reader(local_backend, work_dir)
    assert mgr.all_steps() == [4, 8]  # 4: best after epoch 1's validation; 8: save_last
    assert mgr.restore(4)["meta"]["epoch"] == 1 and mgr.restore(4)["meta"]["iter"] == 4
    assert mgr.record(4).epoch == 1


def test_a_fresh_work_dir_resumes_from_the_remote_run_folder(s3_backend: Backend, tmp_path: Path) -> None:
    # A new machine: same experiment name (work_dir basename), no local last_checkpoint file.
    hook = hook_args(s3_backend, interval=1, max_keep_ckpts=1)
    train(tmp_path / "node-a" / "exp", hook, max_epochs=2)
    _, probe, _ = train(tmp_path / "node-b" / "exp", hook, max_epochs=3)  # Runner: its before_run precedes resume
    assert probe.start == (2, 8)
    # FlexibleRunner resumes before any hook runs: the run folder is named in resume=.
    folder = reader(s3_backend, tmp_path / "exp").directory
    _, probe, _ = train(tmp_path / "node-c" / "exp", hook, max_epochs=4, flexible=True, resume=SCHEME + folder)
    assert probe.start == (3, 12)
    assert reader(s3_backend, tmp_path / "exp").all_steps() == [16]


def test_save_begin_and_save_last_follow_the_seed_hook(local_backend: Backend, tmp_path: Path) -> None:
    work_dir = tmp_path / "begin"
    train(work_dir, hook_args(local_backend, interval=3, by_epoch=False, save_begin=5), max_iters=12)
    assert reader(local_backend, work_dir).all_steps() == [5, 8, 11, 12]  # from iteration 5 every 3, and the last
