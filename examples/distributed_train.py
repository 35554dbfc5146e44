"""Distributed training with ckptman: a DDP model on CPU (gloo), launched by torchrun.

    torchrun --nproc-per-node 2 examples/distributed_train.py --dir /tmp/ckpt
    torchrun --nproc-per-node 2 examples/distributed_train.py --dir /tmp/ckpt   # resumes

Every rank builds the same CheckpointManager with the same arguments and calls
the same methods in the same order; ckptman decides on rank 0 and tells the
others. Each rank evaluates on its own validation shard and passes its own
``val/loss``: rank 0's value is the one that counts, on every rank.

``--sharded`` saves through torch.distributed.checkpoint (DCP) instead of one
replicated ``state.pt``: the state dicts come from
``torch.distributed.checkpoint.state_dict.get_state_dict``, which works the same
for DDP and FSDP models, and a restart may use another world size.
``--async-save`` writes checkpoints on a background thread.
Without torchrun (``python examples/distributed_train.py --dir ...``) it runs as
one process; the code is the same.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckptman import CheckpointManager


def batch(rank: int, step: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data for ``step``: a pure function of both, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(1_000_003 * rank + step)
    x = torch.randn(size, 8, generator=g)
    y = (x * torch.linspace(-1, 1, 8)).sum(dim=1, keepdim=True).sin() + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (path or fsspec URL)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per invocation")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--sharded", action="store_true", help="save through torch.distributed.checkpoint")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    say = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    net = DistributedDataParallel(model) if distributed else model
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # The same arguments on every rank. The process group is found by itself.
    mgr = CheckpointManager(
        args.dir,
        save_interval_steps=args.save_every,
        keep_last=2,
        best="val/loss",
        mode="min",
        async_save=args.async_save,
    )
    say(f"{world} rank(s); checkpoints in {mgr.directory}: {mgr.all_steps() or 'none yet'}")

    start = 0
    if mgr.latest_step() is not None:  # the same answer on every rank
        if args.sharded:
            from torch.distributed.checkpoint.state_dict import (
                get_state_dict,
                set_state_dict,
            )

            model_sd, optim_sd = get_state_dict(model, optim)
            state = mgr.restore(sharded=True, state={"model": model_sd, "optim": optim_sd, "step": 0})
            set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = mgr.restore()  # every rank reads the same state.pt (verified against its manifest)
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optim"])
        start = int(state["step"])
        say(f"resumed from step {start}")
    say("  step  train loss  val/loss (rank 0 | others)  checkpoint")

    for step in range(start + 1, start + args.steps + 1):
        x, y = batch(rank, step)
        loss = torch.nn.functional.mse_loss(net(x), y)
        optim.zero_grad()
        loss.backward()  # DDP averages the gradients: the model stays replicated
        optim.step()

        metrics = None
        if step % args.eval_every == 0:
            with torch.no_grad():
                vx, vy = batch(rank, -step, size=256)  # each rank's own validation shard
                metrics = {"val/loss": torch.nn.functional.mse_loss(model(vx), vy).item()}

        last = step == start + args.steps
        if args.sharded:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optim)
            state = {"model": model_sd, "optim": optim_sd, "step": step}
        else:
            state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}
        # Every rank calls save() with its own metrics; rank 0's decide, for everyone.
        saved = mgr.save(step, state, metrics=metrics, force=last, sharded=args.sharded)

        if metrics is not None or saved:
            vals = [metrics["val/loss"]] if metrics else []
            if distributed and metrics:
                gathered: list = [None] * world
                dist.all_gather_object(gathered, metrics["val/loss"])
                vals = gathered
            shown = f"{vals[0]:.4f} | {' '.join(f'{v:.4f}' for v in vals[1:]) or '-'}" if vals else ""
            why = ""
            if saved:
                why = "saved (last step)" if last else "saved (interval)" if mgr.should_save(step) else "saved (new best)"
            say(f"{step:6d}  {loss.item():10.4f}  {shown:>26}  {why}")

    mgr.wait_until_finished()
    view = (mgr.all_steps(), mgr.best_step())
    views = [None] * world
    if distributed:
        dist.all_gather_object(views, view)
    else:
        views = [view]
    assert all(v == views[0] for v in views), views
    say(f"every rank sees steps {view[0]}, best {view[1]} (val/loss {mgr.metrics(view[1])['val/loss']:.4f})")
    for step, reasons in sorted(mgr.kept_reasons().items()):
        say(f"  {mgr.checkpoint_path(step)}  kept: {', '.join(reasons)}")
    mgr.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
