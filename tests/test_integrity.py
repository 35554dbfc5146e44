"""Verified restores: checksums, fallback to the newest checkpoint that verifies, verify() and `ckptman verify`."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager, CheckpointWarning, CorruptCheckpointError, UnsafeCheckpointError
from ckptman.cli import main


@pytest.fixture
def opened() -> Any:
    managers: list[CheckpointManager] = []

    def open_manager(backend: Any, **kwargs: Any) -> CheckpointManager:
        mgr = CheckpointManager(backend.url, storage_options=backend.storage_options, **kwargs)
        managers.append(mgr)
        return mgr

    yield open_manager
    for mgr in managers:
        mgr.close()


def tensor_state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def damage(backend: Any, rel: str, how: str) -> None:
    fs, root = backend.fs()
    path = f"{root}/{rel}"
    if how == "delete":
        fs.rm(path)
    else:
        data = bytearray(fs.cat_file(path))
        if how == "flip":
            data[len(data) // 2] ^= 0x01
        else:  # truncate
            data = data[: len(data) // 2]
        fs.pipe_file(path, bytes(data))
    fs.invalidate_cache()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_latest_falls_back_to_newest_checkpoint_that_verifies(backend: Any, opened: Any, how: str) -> None:
    mgr = opened(backend)
    for step in (1, 2, 3):
        mgr.save(step, tensor_state(step))
    damage(backend, "step_00000003/state.pt", how)
    reader = opened(backend, read_only=True)
    with pytest.warns(CheckpointWarning, match="restored step_00000002 instead of newer.*step_00000003"):
        restored = reader.restore()
    assert restored["step"] == 2 and torch.equal(restored["w"], tensor_state(2)["w"])
    with pytest.raises(CorruptCheckpointError, match="step_00000003/state.pt"):
        reader.restore(3)  # an explicit step never falls back
    assert reader.all_steps() == [1, 2, 3], "verification deletes nothing"


def test_restore_directory_falls_back_and_leaves_no_mixed_files(backend: Any, opened: Any, tmp_path: Any) -> None:
    mgr = opened(backend)
    for step in (1, 2):
        with mgr.save_directory(step) as folder:
            for shard in ("a.bin", "b.bin"):
                with open(os.path.join(folder, shard), "wb") as f:
                    f.write(bytes([step]) * 1000)
    damage(backend, "step_00000002/b.bin", "flip")
    target = tmp_path / "restored"
    with pytest.warns(CheckpointWarning, match="step_00000002"):
        folder = opened(backend, read_only=True).restore_directory(local_dir=target)
    assert sorted(os.listdir(folder)) == ["a.bin", "b.bin"]
    for shard in ("a.bin", "b.bin"):
        with open(os.path.join(folder, shard), "rb") as f:
            assert f.read() == bytes([1]) * 1000


def test_no_checkpoint_verifies(backend: Any, opened: Any) -> None:
    mgr = opened(backend)
    mgr.save(1, tensor_state(1))
    damage(backend, "step_00000001/state.pt", "flip")
    with pytest.raises(CorruptCheckpointError, match="no committed checkpoint .* verifies"):
        opened(backend, read_only=True).restore()


def test_verify_reports_each_checkpoint(backend: Any, opened: Any) -> None:
    mgr = opened(backend)
    for step in (1, 2, 3):
        mgr.save(step, tensor_state(step))
    assert mgr.verify().ok and [r.step for r in mgr.verify().results] == [1, 2, 3]
    damage(backend, "step_00000002/state.pt", "truncate")
    report = mgr.verify()
    assert not report.ok
    assert [(r.step, r.ok) for r in report.results] == [(1, True), (2, False), (3, True)]
    assert "size mismatch" in report.failures[0].problems[0]
    assert mgr.verify(3).ok and not mgr.verify(2).ok


def test_cli_verify_exit_codes(local_backend: Any, opened: Any, capsys: Any) -> None:
    mgr = opened(local_backend)
    mgr.save(1, tensor_state(1))
    mgr.save(2, tensor_state(2))
    assert main(["verify", local_backend.url]) == 0
    assert "2 of 2 checkpoints verified" in capsys.readouterr().out
    damage(local_backend, "step_00000001/state.pt", "flip")
    assert main(["verify", local_backend.url]) == 1
    out = capsys.readouterr().out
    assert "step_00000001 (step 1): FAILED" in out and "checksum mismatch" in out
    assert main(["verify", local_backend.url, "--step", "2"]) == 0


def test_unsafe_pickles_are_refused_by_default(local_backend: Any, opened: Any) -> None:
    mgr = opened(local_backend)
    mgr.save(1, {"w": torch.ones(2), "callback": UserObject()})
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        mgr.restore()
    assert isinstance(mgr.restore(weights_only=False)["callback"], UserObject)


class UserObject:
    """A class torch's weights-only unpickler does not allow."""
