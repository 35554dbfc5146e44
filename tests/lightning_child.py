"""A tiny Lightning training run for tests/test_lightning.py, importable or run as a child process.

``python tests/lightning_child.py '<json config>'`` trains ``TinyModule`` with a
``CkptmanCheckpoint`` on ``config["url"]`` (``storage_options``, ``max_epochs``,
``callback`` keyword arguments) and prints one line per commit, so the parent
knows what was committed before it SIGKILLs this process:

    committed <step> <completed epochs>
    finished
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ckptman.lightning import CkptmanCheckpoint

BATCHES_PER_EPOCH = 4
# The validation metric by epoch: improves, then worsens (epoch 1 is the best, epoch 2 the second best).
VAL_LOSS = [3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0]


class TinyModule(pl.LightningModule):
    """A linear layer on fixed data; ``val_loss`` follows ``VAL_LOSS`` so tests know the best epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(8 * BATCHES_PER_EPOCH, 4, generator=generator), torch.randn(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", VAL_LOSS[self.current_epoch], on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)


def make_trainer(callbacks: list[pl.Callback], max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


class ReportingCheckpoint(CkptmanCheckpoint):
    """Prints each commit (and pauses, so the parent's kill lands between commits)."""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        before = self.manager.latest_step()
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        latest = self.manager.latest_step()
        if latest != before and latest is not None:
            print(f"committed {latest} {self.manager.record(latest).epoch}", flush=True)
            time.sleep(0.3)


def main(config: dict[str, Any]) -> None:
    callback = ReportingCheckpoint(config["url"], storage_options=config["storage_options"], **config["callback"])
    make_trainer([callback], config["max_epochs"]).fit(TinyModule(), ckpt_path="last")
    print("finished", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
