"""CkptmanCallback with the real Hugging Face Trainer on local disk and moto S3: triggers, best, resume, SIGKILL.

Each epoch is 2 optimizer steps; the evaluation's ``eval_score`` by step is
``transformers_child.SCORE`` (3, 1, 2, 4, ... at steps 2, 4, 6, 8, ...; lower is
better), so the best checkpoint is step 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from adapter_child import child_env, require_framework, run_until_commits

require_framework("transformers", "accelerate", extra="transformers", adapter="Hugging Face")  # the Trainer needs accelerate

import safetensors.torch
import torch
import transformers
from conftest import Backend
from transformers_child import make_trainer

from ckptman import (
    CheckpointManager,
    CheckpointWarning,
    LeaseWarning,
    PolicyConfigError,
)
from ckptman.transformers import CkptmanCallback, StagingFolderMissingError

CHILD = Path(__file__).with_name("transformers_child.py")
BEST = {"metric_for_best_model": "score", "greater_is_better": False, "save_total_limit": 1}


class StartRecorder(transformers.TrainerCallback):
    """The global step training (re)starts from, what the directory keeps then, and after each commit."""

    def __init__(self, callback: CkptmanCallback) -> None:
        self.callback = callback
        self.start: int | None = None
        self.kept_at_start: dict[int, tuple[str, ...]] = {}
        self.kept_after_save: dict[int, list[int]] = {}

    def on_save(self, args: Any, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        self.kept_after_save[state.global_step] = self.callback.manager.all_steps()  # runs after the adapter's on_save

    def on_train_begin(self, args: Any, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        self.start = state.global_step
        self.kept_at_start = self.callback.manager.kept_reasons()


def reader(backend: Backend) -> CheckpointManager:
    """Another process's view of the directory: read-only, no lease, the adapter's best metric."""
    return CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True, best="eval_score", mode="min")


def train(
    backend: Backend, output_dir: Path, resume: bool = False, **arguments: Any
) -> tuple[CkptmanCallback, StartRecorder, transformers.Trainer]:
    """One run as a user writes it: resume from ckptman's latest verified checkpoint (none: from scratch);
    ``resume=True`` spells it the Trainer's way, ``resume_from_checkpoint=True``."""
    callback = CkptmanCallback(backend.url, storage_options=backend.storage_options)
    recorder = StartRecorder(callback)
    trainer = make_trainer(str(output_dir), [callback, recorder], **arguments)
    trainer.train(resume_from_checkpoint=True if resume else callback.latest_checkpoint())
    return callback, recorder, trainer


def restore_downloads() -> set[Path]:
    """Temporary folders ``restore_directory`` downloaded remote checkpoints into."""
    return set(Path(tempfile.gettempdir()).glob("ckptman-restore-*"))


def local_checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*")) if output_dir.exists() else []


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_step_saves_best_kept_best_loaded_then_resume(backend: Backend, tmp_path: Path) -> None:
    out = tmp_path / "out"
    downloads_before = restore_downloads()
    _, recorder, trainer = train(backend, out, max_steps=8, load_best_model_at_end=True, **BEST)
    assert recorder.start == 0
    mgr = reader(backend)
    # Saved at 2, 4, 6, 8; save_total_limit=1 keeps the newest, and the best (step 4) is never deleted.
    assert mgr.all_steps() == [4, 8] and mgr.best_step() == 4
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [2, 4]
    assert mgr.metrics(4)["eval_score"] == 1.0 and "eval_loss" in mgr.metrics(4)
    assert local_checkpoints(out) == []  # staging folders removed
    assert mgr.verify().ok

    # load_best_model_at_end: the model holds step 4's weights although no local folder is left.
    best = safetensors.torch.load_file(os.path.join(mgr.restore_directory(4, tmp_path / "best"), "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(best[k], state[k]) for k in best)
    assert trainer.state.best_model_checkpoint == mgr.checkpoint_path(4)

    # A restart resumes from the committed step 8, not from scratch; the resumed-from one is protected.
    _, recorder, trainer = train(backend, out, max_steps=12, **BEST)
    assert recorder.start == 8 and "resumed from" in recorder.kept_at_start[8]
    assert recorder.kept_after_save == {10: [4, 10], 12: [4, 12]}  # protected until a newer one is committed (the core's rule)
    assert trainer.state.global_step == 12
    mgr = reader(backend)
    assert mgr.all_steps() == [4, 12] and mgr.best_step() == 4 and mgr.verify().ok
    assert restore_downloads() == downloads_before  # resume and load-best downloads are removed at the end


def test_epoch_saves_keep_all_and_start_from_scratch(local_backend: Backend, tmp_path: Path) -> None:
    _, recorder, _ = train(local_backend, tmp_path / "out", num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch")
    assert recorder.start == 0  # nothing committed: latest_checkpoint() was None
    mgr = reader(local_backend)
    assert mgr.all_steps() == [2, 4, 6]  # no save_total_limit: all kept
    assert [mgr.record(s).epoch for s in mgr.all_steps()] == [1, 2, 3]
    assert [mgr.metrics(s)["eval_score"] for s in mgr.all_steps()] == [3.0, 1.0, 2.0]
    assert mgr.verify().ok


def run_child_until_commits(backend: Backend, commits: int, tmp_path: Path) -> list[tuple[int, int]]:
    """Train in a subprocess; SIGKILL it once it reported ``commits`` commits. Returns (step, epoch) of each."""
    config = {"url": backend.url, "storage_options": backend.storage_options, "output_dir": str(tmp_path / "out"), "max_steps": 12}
    return run_until_commits(CHILD, config, commits, tmp_path)


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_sigkill_after_second_commit_then_resume(backend: Backend, tmp_path: Path) -> None:
    assert run_child_until_commits(backend, 2, tmp_path) == [(2, 1), (4, 2)]
    out = tmp_path / "out"
    # What a kill during the Trainer's own write leaves: a newer, half-written local folder.
    (out / "checkpoint-6").mkdir(parents=True, exist_ok=True)
    (out / "checkpoint-6" / "config.json").write_text("{}")
    assert transformers.trainer_utils.get_last_checkpoint(str(out)).endswith("checkpoint-6")  # HF would resume from it
    time.sleep(2.5)  # the killed child's lease (2 s) expires
    assert reader(backend).all_steps() == [4] and reader(backend).verify().ok  # step 2 rotated out (save_total_limit=1)

    with pytest.warns(LeaseWarning, match="stale lease"), pytest.warns(CheckpointWarning, match="checkpoint-6: ckptman never committed it"):
        _, recorder, trainer = train(backend, out, resume=True, max_steps=12, **BEST)  # the Trainer's own spelling
    assert recorder.start == 4  # the committed step, not the half-written local folder, not from scratch
    assert "resumed from" in recorder.kept_at_start[4]
    assert trainer.state.global_step == 12
    mgr = reader(backend)
    assert mgr.all_steps() == [4, 12] and mgr.best_step() == 4 and mgr.metrics(4)["eval_score"] == 1.0
    assert mgr.verify().ok
    assert local_checkpoints(out) == []  # the staged checkpoint-4 is removed at the end


def test_resume_from_checkpoint_true_with_a_local_directory_stages_hard_links(local_backend: Backend, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(local_backend, out, max_steps=4, **BEST)
    callback = CkptmanCallback(local_backend.url)
    trainer = make_trainer(str(out), [callback], max_steps=6, **BEST)
    staged = out / "checkpoint-4"
    committed = Path(reader(local_backend).checkpoint_path(4)) / "model.safetensors"
    assert (staged / "model.safetensors").stat().st_ino == committed.stat().st_ino  # no second copy
    assert callback.latest_checkpoint() == str(staged)  # the same folder for the explicit spelling
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6 and local_checkpoints(out) == []
    assert reader(local_backend).all_steps() == [4, 6]
    # Read after training: a read-only view; the lease released at the end is not taken again.
    assert callback.manager.all_steps() == [4, 6]
    with CheckpointManager(local_backend.url) as writer:
        assert writer.latest_step() == 6


def test_resume_falls_back_past_a_corrupted_latest_and_removes_it(local_backend: Backend, tmp_path: Path) -> None:
    train(local_backend, tmp_path / "out", max_steps=8, **BEST)  # steps 4 (best), 8 (latest)
    weights = Path(reader(local_backend).checkpoint_path(8)) / "model.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)  # same size, wrong bytes
    with pytest.warns(CheckpointWarning) as caught:
        _, recorder, trainer = train(local_backend, tmp_path / "out", max_steps=8, **BEST)
    assert any("failed verification" in str(w.message) for w in caught)
    assert recorder.start == 4 and trainer.state.global_step == 8  # steps 5-8 trained again, committed anew
    mgr = reader(local_backend)
    assert mgr.all_steps() == [4, 8] and mgr.verify().ok


def test_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="directory"):
        CkptmanCallback("")
    with pytest.raises(PolicyConfigError, match="Trainer"):
        CkptmanCallback(str(tmp_path / "ck")).latest_checkpoint()
    callback = CkptmanCallback(str(tmp_path / "ck"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    state = transformers.TrainerState(global_step=3)
    callback.on_init_end(args, state, transformers.TrainerControl())
    with pytest.raises(StagingFolderMissingError, match="checkpoint-3"):
        callback.on_save(args, state, transformers.TrainerControl())


def test_save_strategy_best_with_greater_is_better(local_backend: Backend, tmp_path: Path) -> None:
    arguments = {"metric_for_best_model": "score", "greater_is_better": True, "save_strategy": "best"}
    train(local_backend, tmp_path / "out", max_steps=8, **arguments)
    # Scores 3, 1, 2, 4 at steps 2..8: with greater better only steps 2 and 8 are new bests, so only they are saved.
    mgr = CheckpointManager(local_backend.url, read_only=True, best="eval_score", mode="max")
    assert mgr.all_steps() == [2, 8] and mgr.best_step() == 8 and mgr.verify().ok


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_two_ranks_only_rank_zero_writes_and_both_resume_from_the_same_step(backend: Backend, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): on_save runs on both; rank 0 commits; a rerun resumes both at the committed step."""
    config = {"url": backend.url, "storage_options": backend.storage_options, "output_dir": str(tmp_path / "out"), "ranks": True}
    first = run_ranks({**config, "max_steps": 4}, tmp_path)
    assert first == {0: (0, 4, True), 1: (0, 4, False)}
    assert reader(backend).all_steps() == [2, 4]
    second = run_ranks({**config, "max_steps": 8}, tmp_path)
    assert second == {0: (4, 8, True), 1: (4, 8, False)}  # both ranks started from the committed step 4
    mgr = reader(backend)
    assert mgr.all_steps() == [6, 8] and mgr.verify().ok  # save_total_limit=2 (no best metric here)
    assert local_checkpoints(tmp_path / "out") == []


def run_ranks(config: dict[str, Any], tmp_path: Path) -> dict[int, tuple[int, int, bool]]:
    """``torchrun --nproc_per_node 2`` of the child; each rank's (start step, end step, writable)."""
    env = child_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*command, str(CHILD), json.dumps(config)], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {}
    for line in done.stdout.splitlines():
        if line.startswith("rank "):
            _, rank, _, start, _, end, _, writable = line.split()
            ranks[int(rank)] = (int(start), int(end), writable == "True")
    return ranks
