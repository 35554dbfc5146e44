"""A tiny mmengine training run for tests/test_mmengine.py, importable or run as a child process.

``python tests/mmengine_child.py '<json config>'`` trains ``TinyModel`` with a
``CkptmanCheckpointHook`` (``config["hook"]`` keyword arguments) in
``config["work_dir"]`` for ``config["max_epochs"]`` epochs with ``resume=True``,
and prints one line per commit, so the parent knows what was committed before it
SIGKILLs this process:

    committed <step> <completed epochs>
    finished
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.model import BaseModel
from mmengine.runner import FlexibleRunner, Runner
from torch import nn

from ckptman.mmengine import CkptmanCheckpointHook

BATCHES_PER_EPOCH = 4
# The validation loss by completed epochs (index = epochs - 1): improves, then worsens; epoch 2 is the best.
VAL_LOSS = [3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0]
PROGRESS: dict[str, int] = {"epoch": 0, "iter": 0}


class TinyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mode: str = "tensor") -> Any:
        out = self.layer(x)
        if mode == "loss":
            return {"loss": nn.functional.mse_loss(out, y)}
        return [out]


class ScheduledLoss(BaseMetric):
    """``val_loss`` follows ``VAL_LOSS`` by completed epochs (by validations in an iteration-based run)."""

    default_prefix = None

    def process(self, data_batch: Any, data_samples: Any) -> None:
        self.results.append(0)

    def compute_metrics(self, results: list[Any]) -> dict[str, float]:
        return {"val_loss": VAL_LOSS[PROGRESS["epoch"] - 1], "acc": -VAL_LOSS[PROGRESS["epoch"] - 1]}


class ProgressProbe(Hook):
    """Tells the metric which epoch is being validated, and records where training (re)started."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.start: tuple[int, int] | None = None
        self.kept_at_start: dict[int, tuple[str, ...]] = {}

    def before_train(self, runner: Any) -> None:
        self.start = (runner.epoch, runner.iter)
        hook = next(h for h in runner.hooks if isinstance(h, CkptmanCheckpointHook))
        self.kept_at_start = hook.manager.kept_reasons()

    def before_val_epoch(self, runner: Any) -> None:
        PROGRESS["epoch"] = runner.epoch if runner.train_loop.__class__.__name__ == "EpochBasedTrainLoop" else runner.iter // BATCHES_PER_EPOCH


class ReportingHook(CkptmanCheckpointHook):
    """Prints each commit (and pauses, so the parent's kill lands between commits)."""

    def _save(self, runner: Any, *, step: int, epoch: int, metrics: Any = None) -> None:
        before = self.manager.latest_step()
        super()._save(runner, step=step, epoch=epoch, metrics=metrics)
        latest = self.manager.latest_step()
        if latest != before and latest is not None:
            print(f"committed {latest} {self.manager.record(latest).epoch}", flush=True)
            time.sleep(0.3)


def _data() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, generator=generator), "y": torch.randn(1, generator=generator)} for _ in range(8 * BATCHES_PER_EPOCH)]


def _loader(shuffle: bool) -> dict[str, Any]:
    return {"dataset": _data(), "batch_size": 8, "sampler": {"type": "DefaultSampler", "shuffle": shuffle}, "collate_fn": {"type": "default_collate"}}


def make_runner(
    work_dir: str,
    hook: dict[str, Any],
    *,
    max_epochs: int | None = None,
    max_iters: int | None = None,
    resume: bool | str = True,
    flexible: bool = False,
    probe: ProgressProbe | None = None,
    hook_type: str = "CkptmanCheckpointHook",
    load_from: str | None = None,
) -> Runner:
    """A Runner (or FlexibleRunner) on CPU with the hook as its checkpoint hook; by epochs, or by iterations."""
    if max_iters is None:
        train_cfg = {"by_epoch": True, "max_epochs": max_epochs, "val_interval": 1}
    else:
        train_cfg = {"by_epoch": False, "max_iters": max_iters, "val_interval": BATCHES_PER_EPOCH}
    cls = FlexibleRunner if flexible else Runner
    return cls(
        model=TinyModel(),
        work_dir=work_dir,
        train_dataloader=_loader(True),
        val_dataloader=_loader(False),
        val_evaluator=[ScheduledLoss()],
        train_cfg=train_cfg,
        val_cfg={},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01}},
        param_scheduler={"type": "MultiStepLR", "milestones": [2], "by_epoch": max_iters is None},
        default_hooks={"checkpoint": dict(type=hook_type, **hook), "logger": {"type": "LoggerHook", "interval": 1000}},
        custom_hooks=[probe or ProgressProbe()],
        resume=resume,
        load_from=load_from,
        randomness={"seed": 0},
        log_level="WARNING",
        experiment_name=f"run-{time.monotonic_ns()}",
    )


def quiet() -> None:
    """mmengine logs every step at INFO; the tests read outcomes, not logs."""
    MMLogger.get_instance("mmengine").setLevel(logging.WARNING)


def main(config: dict[str, Any]) -> None:
    quiet()
    from mmengine.registry import HOOKS

    HOOKS.register_module(module=ReportingHook, force=True)
    runner = make_runner(config["work_dir"], config["hook"], max_epochs=config["max_epochs"], hook_type="ReportingHook")
    runner.train()
    print("finished", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
