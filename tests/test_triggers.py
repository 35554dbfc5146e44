"""Epoch and wall-clock save triggers on every backend: once per epoch, after an interval, recorded in the manifest."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager
from ckptman.cli import main as cli_main
from ckptman.state import SIDECAR_NAME
from test_manager import manager, read


def weights(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step))}


def test_saving_every_step_with_the_epoch_saves_once_per_epoch(backend: Any) -> None:
    steps_per_epoch = 5
    with manager(backend, save_interval_epochs=2) as mgr:
        saved = [s for s in range(0, 30) if mgr.save(s, weights(s), epoch=s // steps_per_epoch)]
        assert saved == [10, 20], "due at the first step of epochs 2 and 4, once each"
        assert [mgr.record(s).epoch for s in mgr.all_steps()] == [2, 4]


def test_an_epoch_already_recorded_is_not_saved_again_after_a_restart(backend: Any) -> None:
    with manager(backend, save_interval_epochs=1) as mgr:
        assert mgr.save(10, weights(10), epoch=1)
    with manager(backend, save_interval_epochs=1) as mgr:
        assert mgr.record(10).epoch == 1
        assert not mgr.should_save(11, epoch=1) and not mgr.save(11, weights(11), epoch=1)
        assert mgr.should_save(20, epoch=2) and mgr.save(20, weights(20), epoch=2)


def test_calling_once_at_each_epoch_end_saves_every_interval(backend: Any) -> None:
    with manager(backend, save_interval_epochs=3) as mgr:
        saved = [epoch for epoch in range(1, 10) if mgr.save(epoch * 100, weights(epoch), epoch=epoch)]
    assert saved == [3, 6, 9]


def test_an_epoch_in_flight_counts_as_recorded(backend: Any) -> None:
    with manager(backend, save_interval_epochs=1, async_save=True) as mgr:
        assert mgr.save(5, weights(5), epoch=1)
        assert not mgr.save(6, weights(6), epoch=1), "the save of epoch 1 in flight already records it"
        mgr.wait_until_finished()
        assert mgr.all_steps() == [5] and mgr.record(5).epoch == 1


def test_the_wall_clock_trigger_fires_after_the_interval_since_the_last_commit(backend: Any) -> None:
    interval = 0.6
    with manager(backend, save_interval_seconds=interval) as mgr:
        assert not mgr.save(1, weights(1)), "not due right after opening"
        time.sleep(interval * 1.2)
        assert mgr.should_save(2) and mgr.save(2, weights(2))
        assert not mgr.should_save(3) and not mgr.save(3, weights(3)), "the clock restarts at the commit"
        time.sleep(interval * 1.2)
        assert mgr.save(4, weights(4))
        assert mgr.all_steps() == [2, 4]


def test_triggers_combine_with_the_step_interval_and_best(backend: Any) -> None:
    with manager(backend, save_interval_steps=100, save_interval_epochs=1, best="loss") as mgr:
        assert mgr.save(100, weights(100))  # by steps
        assert mgr.save(101, weights(101), epoch=1)  # by epochs
        assert mgr.save(102, weights(102), metrics={"loss": 0.1})  # a new best
        assert not mgr.save(103, weights(103), epoch=1, metrics={"loss": 0.5})
        assert mgr.all_steps() == [100, 101, 102]


def test_the_sidecar_stores_the_triggers_and_ls_reads_them(backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with manager(backend, save_interval_epochs=2, save_interval_seconds=3600.0) as mgr:
        mgr.save(1, weights(1), force=True, epoch=0)
    sidecar = json.loads(read(backend, SIDECAR_NAME))
    assert sidecar["version"] == 2, "0.1.0 would refuse the new keys: it must say 'unsupported version' instead"
    assert sidecar["policy"]["config"]["save_interval_epochs"] == 2
    assert sidecar["checkpoints"][0]["epoch"] == 0
    with CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True) as reader:
        assert reader.stored_state()["policy"]["config"]["save_interval_seconds"] == 3600.0  # type: ignore[index]
    if backend.name == "local":
        assert cli_main(["ls", backend.url]) == 0
        assert "step_00000001" in capsys.readouterr().out


def test_without_new_triggers_the_sidecar_stays_what_0_1_0_writes(backend: Any) -> None:
    with manager(backend, save_interval_steps=10, keep_last=2) as mgr:
        mgr.save(10, weights(10))
    sidecar = json.loads(read(backend, SIDECAR_NAME))
    assert sidecar["version"] == 1
    assert set(sidecar["policy"]["config"]) == {
        "save_interval_steps", "save_begin", "keep_last", "keep_every", "best", "mode", "keep_best"
    }
    assert "epoch" not in sidecar["checkpoints"][0]
