"""The worker side of tests/test_distributed.py: one process per rank of a gloo job.

The parent test starts ``world`` processes (multiprocessing, spawn context)
with :func:`entry` as target. Each joins a gloo process group over
``tcp://127.0.0.1:<port>``, runs the scenario named in its config (a function
of this module, see ``SCENARIOS``) and writes what it observed to
``<result_dir>/rank<r>.json``. The parent asserts on those files, so every
check about "all ranks agree" is made by the parent comparing the ranks' files.

Observations are written after every step (``Ctx.note``), so when a rank
hangs or is killed, the parent still sees how far it got. Errors are recorded
as ``[type name, message]``, with the fields of ckptman's structured errors
(``failed_ranks``, ``kind``, ...) under ``fields``; a scenario's unexpected
exception as ``fatal``.

Nothing here is imported by ckptman: fault injection (a rank failing or
SIGKILLing itself mid-save) patches ckptman's functions in this process only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

SCENARIOS: dict[str, Callable[[Ctx], None]] = {}


def scenario(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


class Ctx:
    """What a scenario needs: rank, world size, the directory, and a notebook for observations."""

    def __init__(self, rank: int, world: int, config: dict[str, Any]) -> None:
        self.rank = rank
        self.world = world
        self.config = config
        self.url: str = config["url"]
        self.options: dict[str, Any] = config.get("storage_options") or {}
        self.params: dict[str, Any] = config.get("params") or {}
        self.obs: dict[str, Any] = {"rank": rank, "world": world, "pid": os.getpid()}
        self._path = os.path.join(config["result_dir"], f"rank{rank}.json")
        self.writes: list[list[str]] = []

    def note(self, key: str, value: Any) -> Any:
        self.obs[key] = value
        self.dump()
        return value

    def attempt(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; note ``{"ok": result}`` or ``{"error": [type, message]}`` under ``key``."""
        try:
            result = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - observed, asserted by the parent (DCP raises BaseExceptions)
            fields = {name: jsonable(getattr(exc, name)) for name in ERROR_FIELDS if hasattr(exc, name)}
            self.note(key, {"error": [type(exc).__name__, str(exc)], "fields": fields})
            return None
        self.note(key, {"ok": jsonable(result)})
        return result

    def dump(self) -> None:
        self.obs["writes"] = self.writes
        tmp = f"{self._path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.obs, f, indent=1, sort_keys=True, default=repr)
        os.replace(tmp, self._path)

    def listing(self, rel: str) -> list[str]:
        """Files below ``<directory>/<rel>`` on storage, read fresh ([] when the folder does not exist)."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(f"{self.url}/{rel}", **self.options)
        fs.invalidate_cache()
        try:
            return sorted(p[len(root.rstrip("/")) + 1 :] for p in fs.find(root))
        except FileNotFoundError:
            return []

    def kill(self, rank: int) -> None:
        """SIGKILL another rank of this job (its pid is in the observations it wrote at start)."""
        with open(os.path.join(self.config["result_dir"], f"rank{rank}.json")) as f:
            pid = json.load(f)["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def manager(self, **kwargs: Any) -> Any:
        from ckptman import CheckpointManager

        return CheckpointManager(self.url, storage_options=self.options, **kwargs)


ERROR_FIELDS = ("step", "failed_ranks", "kind", "use")


def jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)


def summary(mgr: Any) -> dict[str, Any]:
    """The decisions a rank sees: identical on every rank."""
    return {
        "all_steps": mgr.all_steps(),
        "latest_step": mgr.latest_step(),
        "best_step": best_step(mgr),
        "metrics": {str(s): mgr.metrics(s) for s in mgr.all_steps()},
        "kept": {str(s): list(r) for s, r in mgr.kept_reasons().items()},
    }


def best_step(mgr: Any) -> int | None:
    try:
        return mgr.best_step()
    except Exception:  # noqa: BLE001 - a manager that tracks no metric
        return None


def record_storage_writes(ctx: Ctx) -> None:
    """Wrap every mutating Storage method of this process: what each rank writes or deletes, in order."""
    from ckptman import storage

    for method in ("write_file", "write_atomic", "create_exclusive", "remove", "sync_folder"):
        original = getattr(storage.Storage, method)

        def wrapped(self: Any, rel: str, *args: Any, _original: Any = original, _method: str = method, **kwargs: Any) -> Any:
            ctx.writes.append([_method, rel])
            return _original(self, rel, *args, **kwargs)

        setattr(storage.Storage, method, wrapped)

    write_many = storage.Storage.write_many

    def many(self: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
        ctx.writes.extend(["write_file", rel] for rel, _ in items)  # payload files stored together, one PUT each
        return write_many(self, items, *args, **kwargs)

    storage.Storage.write_many = many  # type: ignore[method-assign]


def fail_uploads(after: int, then: Callable[[], None] | None = None, delay: float = 0.0) -> None:
    """This rank's next directory upload stores ``after`` files, then calls ``then`` (e.g. :func:`leave`) or raises OSError."""
    from ckptman import transfer

    original = transfer.Transfers.upload_files

    def upload_files(self: Any, storage: Any, items: Any) -> Any:
        transfer.Transfers.upload_files = original  # once
        done = original(self, storage, list(items)[:after]) if after else ()
        time.sleep(delay)
        if then is not None:
            then()
        raise OSError(f"injected: no space left on device after {len(done)} files")

    transfer.Transfers.upload_files = upload_files  # type: ignore[method-assign]


LEAVE_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def leave(ctx: Ctx, how: str) -> None:
    """Die ("kill": SIGKILL) or freeze ("stop": SIGSTOP, a rank that stops answering) right here, noting when."""
    ctx.note("left_at", time.time())
    os.kill(os.getpid(), LEAVE_SIGNALS[how])


def fail_dcp_writes() -> None:
    """This rank's next DCP write raises (as a full disk would, inside torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    original = FsspecWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        FsspecWriter.write_data = original  # once
        raise OSError("injected: DCP write failed on this rank")

    FsspecWriter.write_data = write_data  # type: ignore[method-assign]


def replicated(step: int) -> dict[str, Any]:
    """DDP-style state: the same on every rank."""
    import torch

    return {"w": torch.full((4,), float(step)), "step": step}


def write_shards(folder: str, rank: int, step: int) -> list[str]:
    """What DeepSpeed writes from each rank (model-parallel and ZeRO shards), plus a nested file."""
    import torch

    names = [f"mp_rank_{rank:02d}_model_states.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"meta/rank{rank}.json"]
    torch.save({"rank": rank, "step": step, "w": torch.full((3,), float(100 * step + rank))}, os.path.join(folder, names[0]))
    torch.save({"rank": rank, "exp_avg": torch.full((2,), float(rank))}, os.path.join(folder, names[1]))
    os.makedirs(os.path.join(folder, "meta"), exist_ok=True)
    with open(os.path.join(folder, names[2]), "w") as f:
        json.dump({"rank": rank, "step": step}, f)
    return names


def read_shard(folder: str, rank: int) -> Any:
    import torch

    return torch.load(os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt"), weights_only=True)


# --------------------------------------------------------------------------- #
# Scenarios
# --------------------------------------------------------------------------- #

# Rank 0's metric per step, and what every other rank passes: they disagree on purpose.
# With rank 0's values the saved steps are 2, 4, 5, 6, 8 and the best is 5;
# with the other ranks' values 3 (a new best) would be saved, 5 not, and 8 would be best.
LOSS_RANK0 = {2: 3.0, 3: 4.0, 4: 2.0, 5: 1.0, 6: 5.0, 8: 6.0}
LOSS_OTHERS = {2: 1.0, 3: 0.1, 4: 7.0, 5: 9.0, 6: 0.01, 8: 0.001}


def loss(ctx: Ctx, step: int) -> dict[str, float]:
    return {"loss": (LOSS_RANK0 if ctx.rank == 0 else LOSS_OTHERS)[step]}


@scenario
def triggers(ctx: Ctx) -> None:
    """Epoch and wall-clock triggers: rank 0's clock and epoch decide on every rank."""
    import time

    mgr = ctx.manager(save_interval_seconds=0.6, save_interval_epochs=1)
    saved = {}
    if ctx.rank == 0:
        time.sleep(0.8)  # only rank 0's clock has run past the interval; rank 1 is waiting in save()
    saved[1] = mgr.save(1, replicated(1))
    saved[2] = mgr.save(2, replicated(2), epoch=1 if ctx.rank == 0 else 7)  # rank 0 says epoch 1 is complete
    saved[3] = mgr.save(3, replicated(3), epoch=1)  # epoch 1 is recorded, the clock restarted at the commit
    ctx.note("saved", saved)
    ctx.note("epochs", {step: mgr.record(step).epoch for step in mgr.all_steps()})
    mgr.close()


@scenario
def plain(ctx: Ctx) -> None:
    """Replicated (DDP) saves: decisions, best and retention from rank 0; only rank 0 writes."""
    from ckptman import CheckpointManager

    record_storage_writes(ctx)
    mgr = ctx.manager(save_interval_steps=2, keep_last=2, best="loss", mode="min", keep_best=1)
    ctx.note("opened", True)
    ctx.attempt("second_writer", lambda: ctx.manager().close())

    saved = {}
    for step in (2, 3, 4, 5, 6):
        saved[step] = mgr.save(step, replicated(step), metrics=loss(ctx, step))
    saved[7] = mgr.save(7, replicated(7))  # not due, no metrics
    saved[8] = mgr.save(8, replicated(8), metrics=loss(ctx, 8))
    ctx.note("saved", saved)
    ctx.note("after_saves", summary(mgr))
    ctx.attempt("restore_5", lambda: mgr.restore(5))
    ctx.attempt("restore_latest", lambda: mgr.restore())  # the resume point (pinned) is 8 again
    ctx.attempt("restore_gone", lambda: mgr.restore(2))

    mgr.report(8, {"loss": 0.5 if ctx.rank == 0 else 50.0})
    ctx.note("after_report", summary(mgr))
    mgr.delete(6)
    ctx.note("after_delete", summary(mgr))
    ctx.attempt("save_old_step", lambda: mgr.save(7, replicated(7), force=True))
    ctx.attempt("save_existing_step", lambda: mgr.save(8, replicated(8), force=True))
    ctx.note("save_10", mgr.save(10, replicated(10), force=True))

    ro = ctx.manager(read_only=True, best="loss", mode="min")
    ctx.note("read_only_while_open", {"all_steps": ro.all_steps(), "best_step": ro.best_step()})
    ctx.attempt("read_only_restore", lambda: ro.restore())
    ctx.attempt("read_only_save", lambda: ro.save(11, replicated(11), force=True))
    ro.close()

    mgr.refresh()
    ctx.note("after_refresh", summary(mgr))
    mgr.close()
    ctx.attempt("closed_save", lambda: mgr.save(12, replicated(12), force=True))

    reopened = CheckpointManager(ctx.url, storage_options=ctx.options, best="loss", mode="min", keep_last=2)
    ctx.note("reopened", summary(reopened))
    reopened.close()


@scenario
def publish(ctx: Ctx) -> None:
    """publish() on a collective manager: rank 0 writes once, every rank gets the URL or the same error."""
    record_storage_writes(ctx)
    mgr = ctx.manager()
    mgr.save(1, replicated(1))
    ctx.writes.clear()
    ctx.attempt("url", lambda: mgr.publish(keys=["w"]))
    ctx.attempt("missing", lambda: mgr.publish(keys=["w", "ema"]))
    ctx.note("published_writes", list(ctx.writes))
    mgr.close()


@scenario
def directory(ctx: Ctx) -> None:
    """save_directory with per-rank shard files; a clash of names; a rank failing mid-upload."""
    record_storage_writes(ctx)
    mgr = ctx.manager(keep_last=2, save_interval_steps=100)
    for step in (1, 2, 3):
        with mgr.save_directory(step, force=True) as folder:
            assert folder is not None
            ctx.note(f"local_{step}", folder)
            write_shards(folder, ctx.rank, step)
        ctx.note(f"staging_removed_{step}", not os.path.exists(folder))
    ctx.note("after_saves", summary(mgr))

    with mgr.save_directory(4) as nothing:  # not due (every 100 steps), no metrics
        ctx.note("not_due", nothing)

    def restored(step: int) -> dict[str, Any]:
        local = tempfile.mkdtemp(prefix=f"dist-restore-{ctx.rank}-")
        folder = mgr.restore_directory(step, local_dir=local)
        files = sorted(
            os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/") for d, _, fs in os.walk(folder) for f in fs
        )
        return {"files": files, "mine": read_shard(folder, ctx.rank)}

    ctx.attempt("restore_3", lambda: restored(3))

    def clash() -> None:
        with mgr.save_directory(4, force=True) as folder:
            Path(folder, "same.bin").write_bytes(bytes([ctx.rank]) * 10)

    ctx.attempt("clash_4", clash)
    ctx.note("after_clash", summary(mgr))

    if ctx.rank == ctx.params.get("failing_rank", 1):
        fail_uploads(after=1)

    def save(step: int) -> bool:
        with mgr.save_directory(step, force=True) as folder:
            write_shards(folder, ctx.rank, step)
        return True

    ctx.attempt("failing_5", lambda: save(5))
    ctx.note("after_failure", summary(mgr))
    ctx.attempt("retry_5", lambda: save(5))
    ctx.note("after_retry", summary(mgr))
    mgr.close()


@scenario
def raise_in_block(ctx: Ctx) -> None:
    """User code raising inside save_directory's block on one rank only."""
    mgr = ctx.manager()
    with mgr.save_directory(1, force=True) as folder:
        write_shards(folder, ctx.rank, 1)
    ctx.note("committed_1", summary(mgr))

    def save() -> None:
        with mgr.save_directory(2, force=True) as folder:
            write_shards(folder, ctx.rank, 2)
            if ctx.rank == 1:
                raise ValueError("injected: rank 1 failed inside the block")

    ctx.attempt("save_2", save)
    ctx.note("after_failure", summary(mgr))

    def next_save() -> None:  # training goes on: the next checkpoint
        with mgr.save_directory(3, force=True) as folder:
            write_shards(folder, ctx.rank, 3)

    ctx.attempt("save_3", next_save)
    ctx.note("after_next", summary(mgr))
    ctx.attempt("verify", lambda: {r.name: list(r.problems) for r in mgr.verify().results})
    ctx.config["broken"] = True  # no final barrier: a rank still waiting in a collective fails once the other leaves
    ctx.attempt("close", mgr.close)


@scenario
def kill(ctx: Ctx) -> None:
    """A rank SIGKILLs (or SIGSTOPs) itself in the middle of the save of step 3 (in the block, or mid-upload)."""
    victim, where, how = ctx.params["victim"], ctx.params["where"], ctx.params.get("how", "kill")
    mgr = ctx.manager(dist_timeout=ctx.params.get("dist_timeout"))
    for step in (1, 2):
        with mgr.save_directory(step, force=True) as folder:
            write_shards(folder, ctx.rank, step)
    ctx.note("committed", summary(mgr))
    if ctx.rank == victim and where == "upload":
        fail_uploads(after=1, then=lambda: leave(ctx, how))

    def save() -> None:
        with mgr.save_directory(3, force=True) as folder:
            write_shards(folder, ctx.rank, 3)
            if ctx.rank == victim and where == "block":
                leave(ctx, how)

    start = time.monotonic()
    ctx.attempt("save_3", save)
    ctx.note("seconds_to_error", time.monotonic() - start)
    ctx.note("error_at", time.time())
    if how == "stop":
        ctx.kill(victim)  # a frozen rank never comes back
    ctx.attempt("close", mgr.close)
    ctx.config["broken"] = True


def dtensor_state(mesh: Any, scale: float, zeros: bool = False) -> dict[str, Any]:
    """A sharded weight (Shard(0)) and a replicated bias, plus a plain value; ``zeros``: a restore target."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full_w = torch.arange(48, dtype=torch.float32).reshape(12, 4) * scale
    full_b = torch.arange(6, dtype=torch.float32) * scale
    if zeros:
        full_w, full_b = torch.zeros_like(full_w), torch.zeros_like(full_b)
    return {
        "model": {"w": distribute_tensor(full_w, mesh, [Shard(0)]), "b": distribute_tensor(full_b, mesh, [Replicate()])},
        "extra": {"scale": 0.0 if zeros else scale},
    }


def local_view(state: dict[str, Any]) -> dict[str, Any]:
    return {"w": state["model"]["w"].to_local(), "b": state["model"]["b"].to_local(), "scale": state["extra"]["scale"]}


@scenario
def sharded(ctx: Ctx) -> None:
    """DCP saves of DTensors through ckptman; restore in place; a rank failing inside DCP."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (ctx.world,))
    mgr = ctx.manager(keep_last=2, best="loss", mode="min", keep_best=1)
    for step, scale in ((10, 1.0), (20, 2.0), (30, 3.0)):
        ok = mgr.save(step, dtensor_state(mesh, scale), sharded=True, metrics={"loss": scale if ctx.rank == 0 else -scale})
        ctx.note(f"saved_{step}", ok)
    ctx.note("after_saves", summary(mgr))
    ctx.attempt("verify", lambda: [(r.name, r.ok) for r in mgr.verify().results])

    def restore(step: int | None) -> dict[str, Any]:
        target = dtensor_state(mesh, 0.0, zeros=True)
        out = mgr.restore(step, sharded=True, state=target)
        assert out is target
        return local_view(target)

    ctx.attempt("restore_latest", lambda: restore(None))
    ctx.attempt("restore_10", lambda: restore(10))
    ctx.attempt("restore_plain", lambda: mgr.restore(30))
    ctx.attempt("restore_no_target", lambda: mgr.restore(30, sharded=True))

    if ctx.rank == ctx.world - 1:
        fail_dcp_writes()
    ctx.attempt("failing_40", lambda: mgr.save(40, dtensor_state(mesh, 4.0), sharded=True, force=True))
    ctx.note("after_failure", summary(mgr))
    ctx.note("debris_40", ctx.listing("step_00000040"))
    ctx.attempt("retry_40", lambda: mgr.save(40, dtensor_state(mesh, 4.0), sharded=True, force=True))
    ctx.note("after_retry", summary(mgr))
    mgr.close()


@scenario
def reshard(ctx: Ctx) -> None:
    """A restarted job with another world size: DCP reshards the latest sharded checkpoint."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (ctx.world,))
    mgr = ctx.manager(keep_last=2, best="loss", mode="min", keep_best=1)
    ctx.note("resumed", summary(mgr))
    target = dtensor_state(mesh, 0.0, zeros=True)
    ctx.attempt("restore_latest", lambda: local_view(mgr.restore(sharded=True, state=target)))
    ctx.attempt("save_50", lambda: mgr.save(50, dtensor_state(mesh, 5.0), sharded=True, metrics={"loss": 0.5}))
    target = dtensor_state(mesh, 0.0, zeros=True)
    ctx.attempt("restore_50", lambda: local_view(mgr.restore(50, sharded=True, state=target)))
    ctx.note("after_save", summary(mgr))
    mgr.close()


@scenario
def async_saves(ctx: Ctx) -> None:
    """async_save=True: plain, directory and sharded saves in the background on every rank; a background failure."""
    import torch

    mgr = ctx.manager(async_save=True, keep_last=3, best="loss", mode="min", keep_best=1, save_interval_steps=2)
    state = replicated(0)
    saved = {}
    for step in (2, 3, 4, 5, 6):
        state["w"].fill_(float(step))  # the loop moves on while the save runs
        state["step"] = step
        saved[step] = mgr.save(step, state, metrics=loss(ctx, step))
    state["w"].fill_(-1.0)
    ctx.note("saved", saved)
    mgr.wait_until_finished()
    ctx.note("after_saves", summary(mgr))
    ctx.attempt("restore_5", lambda: mgr.restore(5))

    with mgr.save_directory(8, force=True) as folder:
        write_shards(folder, ctx.rank, 8)
    mgr.wait_until_finished()
    ctx.attempt("restore_8", lambda: read_shard(mgr.restore_directory(8, local_dir=tempfile.mkdtemp()), ctx.rank))

    if ctx.rank == 1:
        fail_uploads(after=1, delay=0.2)
    with mgr.save_directory(9, force=True) as folder:
        write_shards(folder, ctx.rank, 9)
    ctx.attempt("wait_failed_9", mgr.wait_until_finished)
    ctx.attempt("wait_again", mgr.wait_until_finished)  # raised once
    ctx.note("after_failure", summary(mgr))
    ctx.attempt("save_10", lambda: mgr.save(10, replicated(10), force=True) and mgr.wait_until_finished())
    ctx.note("after_recovery", summary(mgr))
    mgr.close()
    ctx.note("final", summary(mgr))
    del torch
    async_sharded(ctx, f"{ctx.url}_sharded")


def async_sharded(ctx: Ctx, url: str) -> None:
    """async_save=True with sharded=True: DTensors snapshotted on every rank, written by DCP in the background."""
    from torch.distributed.device_mesh import init_device_mesh

    from ckptman import CheckpointManager

    mesh = init_device_mesh("cpu", (ctx.world,))
    mgr = CheckpointManager(url, storage_options=ctx.options, async_save=True)
    state = dtensor_state(mesh, 1.0)
    ctx.attempt("sharded_save", lambda: mgr.save(1, state, sharded=True, force=True))
    state["model"]["w"].to_local().fill_(-7.0)  # the loop moves on
    ctx.attempt("sharded_wait", mgr.wait_until_finished)
    ctx.note("sharded_after_save", summary(mgr))
    target = dtensor_state(mesh, 0.0, zeros=True)
    ctx.attempt("sharded_restore", lambda: local_view(mgr.restore(1, sharded=True, state=target)))
    ctx.attempt("sharded_close", mgr.close)


@scenario
def async_failure_next_call(ctx: Ctx) -> None:
    """A background failure is raised "by the next call": does every rank raise it in the same call?

    Rank 1's background save of step 2 fails a second after the block; rank 1 calls save(3)
    at once (its save still running), rank 0 three seconds later (its save already failed).
    Then rank 0 leaves: a rank still waiting in a collective fails with a gloo error.
    """
    mgr = ctx.manager(async_save=True, best="loss", mode="min")
    with mgr.save_directory(1, force=True) as folder:
        write_shards(folder, ctx.rank, 1)
    mgr.wait_until_finished()
    if ctx.rank == 1:
        fail_uploads(after=1, delay=1.0)
    with mgr.save_directory(2, force=True) as folder:
        write_shards(folder, ctx.rank, 2)
    if ctx.rank == 0:
        time.sleep(3.0)  # rank 0's training step is slower: its background save has finished (failed)
    ctx.attempt("save_3", lambda: mgr.save(3, replicated(3), metrics={"loss": 1.0}))
    if ctx.rank == 0:
        time.sleep(2.0)
    ctx.config["broken"] = True  # no final barrier: rank 0 leaves now
    ctx.attempt("close", mgr.close)


@scenario
def metrics_on_rank0_only(ctx: Ctx) -> None:
    """Metrics known on rank 0 only (evaluation ran there), None elsewhere: rank 0's count everywhere."""
    mgr = ctx.manager(best="loss", mode="min", save_interval_steps=10)
    ctx.attempt("save_1", lambda: mgr.save(1, replicated(1), metrics={"loss": 1.0} if ctx.rank == 0 else None))
    ctx.note("after_save", summary(mgr))
    ctx.config["broken"] = True
    ctx.attempt("close", mgr.close)


@scenario
def locked(ctx: Ctx) -> None:
    """Another job holds the directory's lease: every rank is refused; read-only managers work on every rank."""
    ctx.attempt("writable", lambda: ctx.manager().close())
    ro = ctx.manager(read_only=True, best="loss", mode="min")
    ctx.note("read_only", summary(ro))
    ctx.attempt("restore", lambda: ro.restore())
    ctx.attempt("restore_directory", lambda: sorted(os.listdir(ro.restore_directory(2, local_dir=tempfile.mkdtemp()))))
    ctx.attempt("verify", lambda: ro.verify().ok)
    ctx.attempt("save", lambda: ro.save(99, replicated(99), force=True))
    ctx.attempt("report", lambda: ro.report(2, {"loss": 0.0}))
    ctx.attempt("delete", lambda: ro.delete(2))
    ro.close()


def process_groups() -> int:
    """How many process groups this process has created (the default group included)."""
    from torch.distributed import distributed_c10d

    return len(distributed_c10d._world.pg_map)


def go_on_together(ctx: Ctx) -> None:
    """What training does next on every rank: a collective on the default group, then a group made by all ranks
    (their group counters must still agree, which a group created on one rank alone would break)."""
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(total)
    ctx.note("all_reduce", total.item())
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=20))
    box = [f"from rank {ctx.rank}"]
    dist.broadcast_object_list(box, src=0, group=group)
    ctx.note("new_group_broadcast", box[0])


@scenario
def one_rank(ctx: Ctx) -> None:
    """A hook that runs on rank 0 only: a THIS_PROCESS manager saves and restores there; rank 1 never calls ckptman.

    Then the job goes on together, and a collective manager of every rank opens the same directory.
    """
    groups = process_groups()
    if ctx.rank == 0:
        from ckptman import THIS_PROCESS

        record_storage_writes(ctx)
        start = time.monotonic()
        mgr = ctx.manager(process_group=THIS_PROCESS, keep_last=2, best="loss", mode="min")
        ctx.note("opened", summary(mgr))
        ctx.note("saved", {step: mgr.save(step, replicated(step), metrics={"loss": float(step % 3)}) for step in (1, 2, 3)})
        with mgr.save_directory(4, force=True) as folder:
            write_shards(folder, ctx.rank, 4)
        ctx.note("after_saves", summary(mgr))
        ctx.attempt("restore_3", lambda: mgr.restore(3))
        ctx.attempt("restore_4", lambda: read_shard(mgr.restore_directory(4, local_dir=tempfile.mkdtemp()), ctx.rank))
        ctx.attempt("verify", lambda: mgr.verify().ok)
        ctx.attempt("sharded_save", lambda: mgr.save(5, replicated(5), sharded=True, force=True))
        ctx.attempt("sharded_restore", lambda: mgr.restore(sharded=True, state=replicated(0)))
        mgr.close()
        ctx.note("seconds", time.monotonic() - start)
    ctx.note("groups_created", process_groups() - groups)
    ctx.note("ckptman_imported", "ckptman" in sys.modules)
    go_on_together(ctx)
    mgr = ctx.manager(keep_last=2, best="loss", mode="min", dist_timeout=20)  # the lease was released on close
    ctx.note("collective", summary(mgr))
    ctx.attempt("collective_restore", lambda: mgr.restore(3))
    mgr.close()


@scenario
def one_rank_mistake(ctx: Ctx) -> None:
    """The mistake: a collective manager (process_group=None) constructed on rank 0 only, then one used on rank 0 only.

    Constructed twice: with dist_timeout=None (ckptman's join timeout, shortened to ``join_timeout`` here) and
    with ``dist_timeout``. Rank 1 waits at a barrier meanwhile, as a framework's other ranks do while rank 0 saves.
    """
    import torch.distributed as dist

    timeout = ctx.params["dist_timeout"]
    if ctx.rank == 0:
        from ckptman import THIS_PROCESS, distributed

        distributed.JOIN_TIMEOUT = timedelta(seconds=ctx.params["join_timeout"])
        groups = process_groups()
        for key, dist_timeout in (("default", None), ("dist_timeout", timeout)):
            start = time.monotonic()
            ctx.attempt(f"constructed_on_rank_0_{key}", lambda t=dist_timeout: ctx.manager(dist_timeout=t))
            ctx.note(f"seconds_to_error_{key}", time.monotonic() - start)
        ctx.note("groups_created", process_groups() - groups)
        with ctx.manager(process_group=THIS_PROCESS) as mgr:  # the fix the error names, in the same job
            ctx.note("fixed", mgr.save(1, replicated(1), force=True))
    dist.barrier()
    go_on_together(ctx)
    mgr = ctx.manager(dist_timeout=timeout)  # every rank constructs it...
    if ctx.rank == 0:  # ...but only rank 0 calls it: from there an absent rank looks like a slow one
        start = time.monotonic()
        ctx.attempt("used_on_rank_0", lambda: mgr.save(2, replicated(2), force=True))
        ctx.note("seconds_to_peer_error", time.monotonic() - start)
    mgr.close()
    dist.barrier()


# --------------------------------------------------------------------------- #
# Process entry
# --------------------------------------------------------------------------- #


def entry(rank: int, world: int, config: dict[str, Any]) -> None:
    """Target of each spawned process: join the group, run the scenario, write the observations."""
    os.environ.update(config.get("env") or {})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ctx = Ctx(rank, world, config)
    ctx.dump()
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{config['port']}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=config.get("timeout", 60)),
        )
        ctx.note("joined", True)
        SCENARIOS[config["scenario"]](ctx)
        ctx.note("finished", True)
        if not config.get("broken"):
            dist.barrier()  # nobody leaves while another rank still talks to it
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        ctx.note("fatal", {"error": [type(exc).__name__, str(exc)], "traceback": traceback.format_exc()})
        code = 1
    finally:
        ctx.dump()
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip interpreter teardown: a broken process group can block in its destructor.
    os._exit(code)
