"""Asynchronous saves, parallel transfers and progress reporting."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager, StepExistsError


class Gate:
    """Pickling blocks until the test opens the gate: holds a background save mid-write."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __deepcopy__(self, memo: Any) -> "Gate":
        return self  # the snapshot keeps the same gate

    def __reduce__(self) -> Any:
        self.entered.set()
        assert self.opened.wait(30), "test never opened the gate"
        return (int, (0,))


class Unpicklable:
    """Snapshots fine (deepcopy), fails only when serialised: a failure in the background writer."""

    def __deepcopy__(self, memo: Any) -> "Unpicklable":
        return self

    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


@pytest.fixture
def open_manager() -> Any:
    managers: list[CheckpointManager] = []

    def make(backend: Any, **kwargs: Any) -> CheckpointManager:
        mgr = CheckpointManager(backend.url, storage_options=backend.storage_options, async_save=True, **kwargs)
        managers.append(mgr)
        return mgr

    yield make
    for mgr in managers:
        try:
            mgr.close()
        except Exception:  # noqa: BLE001 - a test may leave a failed save behind on purpose
            pass


def listing(backend: Any) -> set[str]:
    fs, root = backend.fs()
    fs.invalidate_cache()
    return {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}


def test_snapshot_lets_the_loop_mutate_state_right_after_save(backend: Any, open_manager: Any) -> None:
    mgr = open_manager(backend)
    weights = torch.arange(1000, dtype=torch.float32)
    state = {"w": weights, "nested": [weights[:10], {"step": 1}]}
    assert mgr.save(1, state) is True
    weights.add_(1000)  # the next optimizer step, while the save runs
    state["nested"][1]["step"] = 99
    mgr.wait_until_finished()
    restored = mgr.restore(1)
    assert torch.equal(restored["w"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(restored["nested"][0], torch.arange(10, dtype=torch.float32))
    assert restored["nested"][1]["step"] == 1


def test_nothing_moves_before_the_commit_and_one_save_at_a_time(backend: Any, open_manager: Any) -> None:
    mgr = open_manager(backend, keep_last=1)
    mgr.save(1, {"w": torch.ones(2)})
    mgr.wait_until_finished()
    gate = Gate()
    assert mgr.save(2, {"w": torch.ones(2), "gate": gate}) is True
    assert gate.entered.wait(10)
    assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
    fs, root = backend.fs()
    assert fs.cat_file(f"{root}/latest") == b"step_00000001", "latest moves only after the commit"
    assert "step_00000001" in listing(backend), "retention runs only after the commit"
    with pytest.raises(StepExistsError, match="being saved in the background"):
        mgr.save(2, {"w": torch.ones(2)})

    second_returned = threading.Event()
    worker = threading.Thread(target=lambda: (mgr.save(3, {"w": torch.ones(2)}), second_returned.set()))
    worker.start()
    assert not second_returned.wait(0.5), "a second save must wait for the one in flight"
    gate.opened.set()
    worker.join(30)
    assert second_returned.is_set()
    mgr.wait_until_finished()
    assert mgr.all_steps() == [3] and mgr.latest_step() == 3


def test_background_error_surfaces_once_on_the_next_call(backend: Any, open_manager: Any) -> None:
    mgr = open_manager(backend)
    mgr.save(1, {"w": torch.ones(2)})
    assert mgr.save(2, {"w": torch.ones(2), "bad": Unpicklable()}) is True  # accepted: fails in the background
    with pytest.raises(RuntimeError, match="cannot pickle this") as raised:
        mgr.wait_until_finished()
    assert any("background save of step 2" in note for note in getattr(raised.value, "__notes__", []))
    mgr.wait_until_finished()  # raised once, not forever
    assert mgr.all_steps() == [1]
    assert not any(name.startswith("step_00000002") for name in listing(backend)), "nothing of the failed save is visible"
    assert mgr.save(2, {"w": torch.ones(2)})
    mgr.close()
    assert CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True).all_steps() == [1, 2]


def test_background_error_is_raised_by_the_next_save(local_backend: Any, open_manager: Any) -> None:
    mgr = open_manager(local_backend)
    mgr.save(1, {"bad": Unpicklable()})
    deadline = time.time() + 10
    while mgr._background.inflight is not None and time.time() < deadline:  # let it fail
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        mgr.save(2, {"w": torch.ones(1)})
    assert mgr.save(2, {"w": torch.ones(1)})


def test_close_waits_for_the_save_in_flight(backend: Any, open_manager: Any) -> None:
    mgr = open_manager(backend)
    mgr.save(5, {"w": torch.randn(512, 512)})
    mgr.close()
    reader = CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True)
    assert reader.all_steps() == [5] and reader.verify().ok


def test_best_decision_counts_the_save_in_flight(local_backend: Any, open_manager: Any) -> None:
    mgr = open_manager(local_backend, save_interval_steps=100, best="loss")
    gate = Gate()
    assert mgr.save(10, {"gate": gate}, metrics={"loss": 0.1})
    assert gate.entered.wait(10)
    assert mgr.save(11, {"w": torch.ones(1)}, metrics={"loss": 0.2}) is False, "0.2 is no new best after 0.1 in flight"
    gate.opened.set()
    mgr.wait_until_finished()
    assert mgr.all_steps() == [10]


def test_async_directory_save_uploads_in_the_background(backend: Any, open_manager: Any) -> None:
    mgr = open_manager(backend)
    with mgr.save_directory(7) as folder:
        for rank in range(4):
            torch.save({"shard": torch.full((100,), rank)}, os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt"))
    staging = folder
    mgr.wait_until_finished()
    assert not os.path.exists(staging), "the staging folder is removed after the upload"
    assert mgr.all_steps() == [7] and len(mgr.verify(7).results) == 1 and mgr.verify().ok
    restored = mgr.restore_directory(7)
    assert torch.equal(torch.load(os.path.join(restored, "mp_rank_03_model_states.pt"))["shard"], torch.full((100,), 3))


@pytest.mark.parametrize("concurrency", [1, 8])
def test_directory_transfers_are_parallel_and_exact(s3_backend: Any, tmp_path: Any, concurrency: int) -> None:
    files = {f"zero/shard_{i:02d}.bin": os.urandom(50_000 + i) for i in range(12)}
    with CheckpointManager(s3_backend.url, storage_options=s3_backend.storage_options, max_concurrency=concurrency) as mgr:
        with mgr.save_directory(1) as folder:
            os.makedirs(os.path.join(folder, "zero"))
            for rel, data in files.items():
                with open(os.path.join(folder, rel), "wb") as f:
                    f.write(data)
        restored = mgr.restore_directory(1, local_dir=tmp_path / "out")
        for rel, data in files.items():
            with open(os.path.join(restored, rel), "rb") as f:
                assert f.read() == data
        assert mgr.verify().ok


def test_parallel_uploads_overlap_on_a_slow_link(s3_backend: Any, s3_proxy: Any) -> None:
    """With 50 ms per request, 8 files uploaded 8 at a time take a fraction of 8 sequential round trips."""
    s3_proxy.configure(latency=0.05)
    backend = s3_backend.with_url(s3_backend.url)
    options = {**backend.storage_options, "client_kwargs": {"endpoint_url": s3_proxy.url}}
    with CheckpointManager(backend.url, storage_options=options, max_concurrency=8) as mgr:
        s3_proxy.reset_stats()
        with mgr.save_directory(1) as folder:
            for i in range(8):
                with open(os.path.join(folder, f"f{i}.bin"), "wb") as f:
                    f.write(b"x" * 1000)
    puts = [r for r in s3_proxy.records if r.method == "PUT" and ".bin" in r.target]
    assert len(puts) == 8
    assert len({r.connection for r in puts}) >= 2, "uploads should use several connections at once"


def test_progress_bar_and_log(memory_backend: Any, capsys: Any, caplog: Any) -> None:
    big = torch.zeros(17 * 2**20 // 4 * 4)  # 68 MiB: a long transfer
    with caplog.at_level(logging.INFO, logger="ckptman"):
        with CheckpointManager(memory_backend.url, progress=True) as mgr:
            mgr.save(1, {"w": big})
            with mgr.save_directory(2) as folder:
                torch.save({"w": big}, os.path.join(folder, "a.pt"))
    err = capsys.readouterr().err
    assert "save step_00000001/state.pt" in err and "upload 1 files" in err
    assert "MiB in" in caplog.text
    with CheckpointManager(memory_backend.url, progress=False) as quiet:
        quiet.save(3, {"w": torch.ones(1)})
    assert capsys.readouterr().err == ""


def test_staging_folders_of_killed_processes_are_removed(local_backend: Any) -> None:
    import subprocess
    import sys
    import tempfile

    script = (
        "import os, signal, torch, ckptman\n"
        f"mgr = ckptman.CheckpointManager({local_backend.url!r})\n"
        "with mgr.save_directory(1) as folder:\n"
        "    open(os.path.join(folder, 'shard.bin'), 'wb').write(b'x' * 100)\n"
        "    print(folder, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    staging = killed.stdout.strip()
    assert staging.startswith(tempfile.gettempdir()) and os.path.isdir(staging)
    from ckptman import LeaseWarning

    with pytest.warns(LeaseWarning, match="stopped renewing"):
        mgr = CheckpointManager(local_backend.url)  # takes over the dead writer's lease at once
    with mgr:
        assert mgr.all_steps() == []
    assert not os.path.exists(staging)
