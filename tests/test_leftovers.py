"""Leftovers of deleted and interrupted saves are cleaned up, and only an interrupted save is warned about.

SeaweedFS keeps listing a prefix as a folder after its last object is deleted
(by retention, say); local disk keeps an emptied folder. Neither is an
interrupted save: a warning for them on every reopen would cry wolf.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager
from test_manager import listing, manager, write

INCOMPLETE = "removing incomplete checkpoint folder"


def emptied(backend: Any, folder: str) -> None:
    """A folder whose only file was written and deleted again: what retention leaves on some stores."""
    write(backend, f"{folder}/state.pt", b"x")
    fs, root = backend.fs()
    fs.rm(f"{root}/{folder}/state.pt")
    fs.invalidate_cache()


def incomplete_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and INCOMPLETE in r.getMessage()]


def test_reopening_after_retention_deleted_checkpoints_warns_of_nothing(backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    with manager(backend, keep_last=1) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"w": torch.ones(2) * step}, force=True)
    with caplog.at_level(logging.DEBUG, logger="ckptman"):
        with manager(backend, keep_last=1) as mgr:
            assert mgr.all_steps() == [4]
    assert incomplete_warnings(caplog) == []
    assert listing(backend) == {"step_00000004", "latest", "ckptman.json"}, "emptied folders must not linger"


def test_only_a_folder_with_payload_and_no_manifest_is_warned_about(backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    with manager(backend) as mgr:
        mgr.save(10, {"w": torch.ones(2)}, force=True)
    emptied(backend, "step_00000020")
    write(backend, "step_00000030/state.pt", b"half written")
    with caplog.at_level(logging.DEBUG, logger="ckptman"):
        with manager(backend) as mgr:
            assert mgr.all_steps() == [10]
    warned = incomplete_warnings(caplog)
    assert len(warned) == 1 and "step_00000030" in warned[0], warned
    assert listing(backend) == {"step_00000010", "latest", "ckptman.json"}


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_an_emptied_nested_folder_is_removed_whole(backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    with manager(backend) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, force=True)
    os.makedirs(os.path.join(backend.url, "step_00000002", "shards", "rank0"))
    with caplog.at_level(logging.WARNING, logger="ckptman"):
        CheckpointManager(backend.url).close()
    assert incomplete_warnings(caplog) == []
    assert not os.path.exists(os.path.join(backend.url, "step_00000002"))
