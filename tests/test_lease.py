"""Single writer per directory: the lease on local disk, memory://, S3 (If-None-Match) and GCS (ifGenerationMatch=0)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager, DirectoryLockedError, LeaseLostError, LeaseWarning, PolicyConfigError
from ckptman.lease import LEASE_NAME

LEASED = ["local", "memory", "s3", "gcs"]


def open_manager(backend: Any, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(backend.url, storage_options=backend.storage_options, **kwargs)


def lease_of(backend: Any) -> dict[str, Any]:
    fs, root = backend.fs()
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{root}/{LEASE_NAME}"))


def write_lease(backend: Any, holder: dict[str, Any]) -> None:
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/{LEASE_NAME}", json.dumps(holder).encode())
    fs.invalidate_cache()


@pytest.mark.parametrize("backend", LEASED, indirect=True)
def test_second_writer_is_refused_with_the_holder_named(backend: Any) -> None:
    with open_manager(backend) as first:
        first.save(1, {"w": torch.ones(2)})
        with pytest.raises(DirectoryLockedError) as raised:
            open_manager(backend)
        message = str(raised.value)
        assert f"host {socket.gethostname()} pid {os.getpid()} since" in message
        assert "read_only=True" in message
        with open_manager(backend, read_only=True) as reader:  # readers never need the lease
            assert reader.all_steps() == [1]
        first.save(2, {"w": torch.ones(2)})  # the refused writer changed nothing
    with open_manager(backend) as second:  # released on close
        assert second.all_steps() == [1, 2]
        second.save(3, {"w": torch.ones(2)})


@pytest.mark.parametrize("backend", LEASED, indirect=True)
def test_stale_lease_of_a_stopped_writer_is_taken_over_with_a_warning(backend: Any) -> None:
    open_manager(backend).close()  # create the directory
    write_lease(backend, {"id": "dead", "host": "gpu-node-7", "pid": 4242, "since": time.time() - 100, "renewed": time.time() - 30})
    with pytest.raises(DirectoryLockedError, match="gpu-node-7 pid 4242"):
        open_manager(backend, lease_timeout=60)
    with pytest.warns(LeaseWarning, match="taking over the stale lease .* gpu-node-7 pid 4242"):
        mgr = open_manager(backend, lease_timeout=10)
    with mgr:
        assert lease_of(backend)["pid"] == os.getpid()
        assert mgr.save(1, {"w": torch.ones(1)})


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_unreadable_lease_counts_as_stale(backend: Any) -> None:
    open_manager(backend).close()
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/{LEASE_NAME}", b"\x00garbage")
    with pytest.warns(LeaseWarning, match="unreadable"):
        open_manager(backend).close()


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_live_holder_keeps_renewing(backend: Any) -> None:
    with open_manager(backend, lease_timeout=0.6) as holder:
        first = lease_of(backend)["renewed"]
        time.sleep(1.5)  # longer than lease_timeout: only renewal keeps it fresh
        assert lease_of(backend)["renewed"] > first
        with pytest.raises(DirectoryLockedError):
            open_manager(backend, lease_timeout=0.6)
        assert holder.save(1, {"w": torch.ones(1)})


@pytest.mark.parametrize("backend", ["local", "memory", "s3"], indirect=True)
def test_writer_that_lost_its_lease_commits_nothing(backend: Any) -> None:
    with open_manager(backend) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        write_lease(backend, {"id": "other", "host": "h2", "pid": 7, "since": time.time(), "renewed": time.time()})
        with pytest.raises(LeaseLostError, match="host h2 pid 7"):
            mgr.save(2, {"w": torch.ones(1)})
        assert mgr.all_steps() == [1]
    assert lease_of(backend)["id"] == "other", "close() must not delete a lease it no longer holds"
    with open_manager(backend, read_only=True) as reader:
        assert reader.all_steps() == [1]


@pytest.mark.parametrize("timeout", [0, -1, "60", True])
def test_invalid_lease_timeout(tmp_path: Any, timeout: Any) -> None:
    with pytest.raises(PolicyConfigError, match="lease_timeout"):
        CheckpointManager(str(tmp_path / "run"), lease_timeout=timeout)
    assert not os.path.exists(tmp_path / "run" / LEASE_NAME)


def test_lease_is_released_when_the_manager_is_garbage_collected(tmp_path: Any) -> None:
    import gc

    CheckpointManager(str(tmp_path / "run")).save(1, {"w": torch.ones(1)})
    gc.collect()
    deadline = time.time() + 5
    while os.path.exists(tmp_path / "run" / LEASE_NAME) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(tmp_path / "run" / LEASE_NAME)
    CheckpointManager(str(tmp_path / "run")).close()


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(backend: Any) -> None:
    import subprocess
    import sys

    open_manager(backend).close()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    now = time.time()
    write_lease(backend, {"id": "dead", "host": socket.gethostname(), "pid": dead_pid, "since": now, "renewed": now, "timeout": 600})
    with pytest.warns(LeaseWarning, match=f"pid {dead_pid}"):
        open_manager(backend).close()


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_a_newcomer_with_a_short_timeout_cannot_take_a_live_lease(backend: Any) -> None:
    with open_manager(backend, lease_timeout=60):
        time.sleep(1.2)
        with pytest.raises(DirectoryLockedError):
            open_manager(backend, lease_timeout=1)


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_a_writer_that_lost_its_lease_deletes_and_reports_nothing(backend: Any) -> None:
    with open_manager(backend) as mgr:
        mgr.save(1, {"w": torch.ones(1)})
        write_lease(backend, {"id": "other", "host": "h2", "pid": 7, "since": time.time(), "renewed": time.time()})
        with pytest.raises(LeaseLostError):
            mgr.delete(1)
        with pytest.raises(LeaseLostError):
            mgr.report(1, {"loss": 1.0})
        with pytest.raises(LeaseLostError):  # remembered: no further I/O needed to refuse
            mgr.save(2, {"w": torch.ones(1)})
        with pytest.raises(LeaseLostError):  # refresh() would clean up the new writer's folders
            mgr.refresh()
    with open_manager(backend, read_only=True) as reader:
        assert reader.all_steps() == [1] and reader.metrics(1) == {}
