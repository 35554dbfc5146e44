"""A tiny Hugging Face Trainer run for tests/test_transformers.py, importable or run as a child process.

``python tests/transformers_child.py '<json config>'`` trains ``tiny_model()`` with a
``CkptmanCallback`` on ``config["url"]`` (``storage_options``, ``output_dir``,
``max_steps``) and prints one line per commit, so the parent knows what was
committed before it SIGKILLs this process:

    committed <step> <completed epochs>
    finished

Under ``torchrun`` with ``config["resume"]`` set, every rank trains with
``resume_from_checkpoint=True`` (when something is committed) and prints
``rank <rank> start <global step> end <global step> writable <bool>``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import transformers

from ckptman.transformers import CkptmanCallback

STEPS_PER_EPOCH = 2  # 8 samples, batch size 4
# The evaluation score by global step (lower is better): improves, then worsens; step 4 is the best.
SCORE = {2: 3.0, 4: 1.0, 6: 2.0, 8: 4.0, 10: 5.0, 12: 6.0, 14: 7.0, 16: 8.0}


class TinyData(torch.utils.data.Dataset):
    """8 fixed token sequences with labels."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (8, 6), generator=generator)
        self.labels = torch.randint(0, 2, (8,), generator=generator)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def tiny_model() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=16
    )
    return transformers.BertForSequenceClassification(config)


def make_trainer(output_dir: str, callbacks: list[transformers.TrainerCallback], **arguments: Any) -> transformers.Trainer:
    """Eval (``eval_score`` from ``SCORE``) and save every 2 steps unless ``arguments`` say otherwise."""
    options: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "eval_strategy": "steps",
        "save_strategy": "steps",
        "eval_steps": 2,
        "save_steps": 2,
        "logging_strategy": "no",
        "learning_rate": 0.1,
        "disable_tqdm": True,
        **arguments,
    }
    args = transformers.TrainingArguments(output_dir=output_dir, use_cpu=True, report_to=[], **options)
    holder: list[transformers.Trainer] = []

    def score(_: Any) -> dict[str, float]:
        return {"score": SCORE[holder[0].state.global_step]}

    trainer = transformers.Trainer(
        model=tiny_model(), args=args, train_dataset=TinyData(), eval_dataset=TinyData(), compute_metrics=score, callbacks=callbacks
    )
    holder.append(trainer)
    return trainer


class Reporter(transformers.TrainerCallback):
    """Prints each commit (after the ckptman callback's on_save) and pauses, so the kill lands between commits."""

    def __init__(self, callback: CkptmanCallback) -> None:
        self.callback = callback

    def on_save(self, args: Any, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        mgr = self.callback.manager
        latest = mgr.latest_step()
        print(f"committed {latest} {mgr.record(latest).epoch if latest is not None else None}", flush=True)
        time.sleep(0.5)


class StartProbe(transformers.TrainerCallback):
    def on_train_begin(self, args: Any, state: transformers.TrainerState, control: Any, **kwargs: Any) -> None:
        self.start = state.global_step


def ranks_main(config: dict[str, Any]) -> None:
    """One rank of a multi-process run: the Trainer's own resume spelling on every rank."""
    callback = CkptmanCallback(config["url"], storage_options=config["storage_options"])
    probe = StartProbe()
    trainer = make_trainer(config["output_dir"], [callback, probe], max_steps=config["max_steps"], save_total_limit=2)
    resume = callback.manager.latest_step() is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    rank = trainer.args.process_index
    print(f"rank {rank} start {probe.start} end {trainer.state.global_step} writable {callback._main}", flush=True)


def main(config: dict[str, Any]) -> None:
    callback = CkptmanCallback(config["url"], storage_options=config["storage_options"], lease_timeout=2.0)
    trainer = make_trainer(
        config["output_dir"],
        [callback, Reporter(callback)],
        max_steps=config["max_steps"],
        metric_for_best_model="score",
        greater_is_better=False,
        save_total_limit=1,
    )
    trainer.train(resume_from_checkpoint=callback.latest_checkpoint())
    print("finished", flush=True)


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    ranks_main(settings) if settings.get("ranks") else main(settings)
