"""A tiny training run that shows ckptman end to end (``ckptman demo``).

It trains a 2-layer MLP on synthetic regression data, evaluates every
``EVAL_EVERY`` steps, saves on an interval or on a new best validation loss,
applies retention, and resumes deterministically when run again on the same
directory. Printing the summary table is the CLI's job; this module returns
the rows.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptman.errors import CheckpointError
from ckptman.manager import CheckpointManager

SEED = 0
FEATURES = 8
HIDDEN = 32
TRAIN_SIZE = 512
VAL_SIZE = 256
BATCH = 32
LR = 1e-2
EVAL_EVERY = 10
METRIC = "val/loss"
# One place for the policy, so the printed description can never drift from it.
POLICY: dict[str, Any] = {
    "save_interval_steps": 20,
    "keep_last": 3,
    "keep_every": 100,
    "best": METRIC,
    "keep_best": 2,
}


@dataclass(frozen=True)
class KeptRow:
    """One committed checkpoint at the end of the run, for the summary table."""

    step: int
    size: int
    val_loss: float | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class DemoResult:
    directory: str
    resumed_from: int | None
    first_step: int
    last_step: int
    saved: int
    deleted: int
    kept: tuple[KeptRow, ...]


def describe_policy() -> list[str]:
    """The policy in words, printed before training so the table that follows makes sense."""
    p = POLICY
    return [
        (
            f"save every {p['save_interval_steps']} steps; evaluate every {EVAL_EVERY} "
            f"(a new top-{p['keep_best']} {METRIC} is saved off-interval too)"
        ),
        (
            f"keep: latest, last {p['keep_last']}, every {p['keep_every']}th step, "
            f"best {p['keep_best']} by {METRIC} (lower is better)"
        ),
    ]


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed synthetic data: the same tensors on every run, from a seeded generator."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(TRAIN_SIZE + VAL_SIZE, FEATURES, generator=gen)
    w = torch.randn(FEATURES, 1, generator=gen)
    y = torch.sin(x @ w / FEATURES**0.5) + 0.1 * torch.randn(TRAIN_SIZE + VAL_SIZE, 1, generator=gen)
    return x[:TRAIN_SIZE], y[:TRAIN_SIZE], x[TRAIN_SIZE:], y[TRAIN_SIZE:]


def make_model() -> nn.Module:
    """Seeded initialisation without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def _state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_rng: torch.Generator) -> dict[str, Any]:
    # Generator state is a uint8 tensor, so the whole dict loads with weights_only=True.
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"data": data_rng.get_state()},
    }


def _resume(
    mgr: CheckpointManager, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, data_rng: torch.Generator
) -> None:
    """Load the latest checkpoint (``step``) into the live objects, checking it is one of ours."""
    try:
        state = mgr.restore()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{mgr.checkpoint_path(step)} is not a ckptman demo checkpoint: {exc}") from exc
    missing = {"step", "model", "optimizer", "rng"} - set(state if isinstance(state, Mapping) else ())
    if missing or state["step"] != step:
        raise CheckpointError(
            f"{mgr.checkpoint_path(step)} is not a ckptman demo checkpoint "
            f"(missing {sorted(missing)} or step mismatch); use an empty directory"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data_rng.set_state(state["rng"]["data"])


def run_demo(
    directory: str,
    storage_options: Mapping[str, Any] | None = None,
    steps: int = 200,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Train ``steps`` more steps in ``directory``, resuming from its latest checkpoint if any."""
    x_train, y_train, x_val, y_val = make_data()
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data_rng = torch.Generator().manual_seed(SEED + 1)
    loss_fn = nn.MSELoss()

    with CheckpointManager(directory, storage_options=storage_options, **POLICY) as mgr:
        echo(f"ckptman demo in {mgr.directory}")
        for line in describe_policy():
            echo(f"  {line}")
        before = set(mgr.all_steps())
        resumed = mgr.latest_step()
        if resumed is not None:
            _resume(mgr, resumed, model, optimizer, data_rng)
        start = resumed or 0
        end = start + steps
        plan = f"training steps {start + 1}..{end}" if steps else "no training steps requested"
        echo(f"resumed from step {resumed}; {plan}" if resumed is not None else f"new run; {plan}")
        if steps:
            echo(f"{'step':>6}  {'train loss':>10}  {METRIC:>9}  checkpoint")

        saved: set[int] = set()
        for step in range(start + 1, end + 1):
            model.train()
            # Batches come only from data_rng, whose state is checkpointed: resuming is bit-exact.
            idx = torch.randint(0, TRAIN_SIZE, (BATCH,), generator=data_rng)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            if step % EVAL_EVERY and step != end:
                continue
            model.eval()
            with torch.no_grad():
                val_loss = loss_fn(model(x_val), y_val).item()
            # The last step is always saved so the next run continues exactly here.
            due = mgr.should_save(step)
            wrote = mgr.save(step, _state(step, model, optimizer, data_rng), metrics={METRIC: val_loss}, force=step == end)
            note = ""
            if wrote:
                saved.add(step)
                why = (["interval"] if due else []) + _best_reasons(mgr, step)
                note = f"saved ({', '.join(why) or 'final step'})"
            echo(f"{step:>6}  {loss.item():>10.4f}  {val_loss:>9.4f}  {note}".rstrip())

        after = mgr.all_steps()
        kept_reasons = mgr.kept_reasons()
        rows = tuple(
            KeptRow(s, mgr.record(s).size, mgr.metrics(s).get(METRIC), kept_reasons.get(s, ())) for s in after
        )
        return DemoResult(
            directory=mgr.directory,
            resumed_from=resumed,
            first_step=start + 1,
            last_step=end,
            saved=len(saved),
            deleted=len((before | saved) - set(after)),
            kept=rows,
        )


def _best_reasons(mgr: CheckpointManager, step: int) -> list[str]:
    """The best-rank reasons of a just-saved step: why an off-interval step was saved."""
    return [reason for reason in mgr.kept_reasons().get(step, ()) if reason.startswith("best ")]
