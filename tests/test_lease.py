"""Single writer per directory: the lease on local disk, memory://, S3 (moto and SeaweedFS) and GCS (fake-gcs-server)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager, DirectoryLockedError, LeaseLostError, LeaseWarning, PolicyConfigError
from ckptman.lease import LEASE_NAME, Lease
from ckptman.storage import Storage

REMOTE_LEASED = ["s3", "seaweedfs", "gcs"]
LEASED = ["local", "memory", *REMOTE_LEASED]


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


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
def test_unreadable_lease_counts_as_stale(backend: Any) -> None:
    open_manager(backend).close()
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/{LEASE_NAME}", b"\x00garbage")
    with pytest.warns(LeaseWarning, match="unreadable"):
        open_manager(backend).close()


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
def test_live_holder_keeps_renewing(backend: Any) -> None:
    with open_manager(backend, lease_timeout=0.6) as holder:
        first = lease_of(backend)["renewed"]
        time.sleep(1.5)  # longer than lease_timeout: only renewal keeps it fresh
        assert lease_of(backend)["renewed"] > first
        with pytest.raises(DirectoryLockedError):
            open_manager(backend, lease_timeout=0.6)
        assert holder.save(1, {"w": torch.ones(1)})


@pytest.mark.parametrize("backend", LEASED, indirect=True)
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


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
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


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
def test_a_newcomer_with_a_short_timeout_cannot_take_a_live_lease(backend: Any) -> None:
    with open_manager(backend, lease_timeout=60):
        time.sleep(1.2)
        with pytest.raises(DirectoryLockedError):
            open_manager(backend, lease_timeout=1)


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
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


# -- compare-and-swap: takeover races and paused writers ---------------------------------------------

RACERS = 8


def stale_lease(backend: Any) -> None:
    """A directory whose lease was left by a writer on another host that stopped renewing long ago."""
    open_manager(backend).close()
    long_ago = time.time() - 3600
    write_lease(backend, {"id": "dead", "host": "gpu-node-7", "pid": 4242, "since": long_ago, "renewed": long_ago, "timeout": 60})


def race_for_the_lease(backend: Any, outcomes: Any, start: Any, done: Any) -> None:
    """One racer: wait for the others, try to take the lease, report, hold a won lease until all reported."""
    lease = Lease(Storage(backend.url, backend.storage_options), 60)
    start.wait()
    try:
        lease.acquire()
    except DirectoryLockedError:
        outcomes.put(("refused", None))
        return
    except BaseException as exc:  # noqa: BLE001 - the test reports it
        outcomes.put(("unexpected", repr(exc)))
        return
    outcomes.put(("won", lease.holder.id))
    done.wait(60)
    lease.release()


@pytest.mark.filterwarnings("ignore::ckptman.LeaseWarning")
@pytest.mark.parametrize("backend", LEASED, indirect=True)
def test_of_managers_racing_to_take_over_a_stale_lease_exactly_one_wins(backend: Any) -> None:
    """The racers are managers' leases, each on its own Storage, released by one barrier so that they
    all judge the same stale lease object (a whole manager's start-up would spread them out). On
    local disk they are processes (forked: threads of one process hardly overlap on local I/O); on
    the remote stores and memory:// they are threads, whose requests overlap on the event loop."""
    import multiprocessing
    import queue
    import sys
    import threading

    stale_lease(backend)
    switch_interval = sys.getswitchinterval()
    if backend.name == "local":
        context = multiprocessing.get_context("fork")
        outcomes: Any = context.Queue()
        start: Any = context.Barrier(RACERS)
        done: Any = context.Event()
        racers: list[Any] = [context.Process(target=race_for_the_lease, args=(backend, outcomes, start, done)) for _ in range(RACERS)]
    else:
        outcomes, start, done = queue.Queue(), threading.Barrier(RACERS), threading.Event()
        racers = [threading.Thread(target=race_for_the_lease, args=(backend, outcomes, start, done)) for _ in range(RACERS)]
        sys.setswitchinterval(1e-6)  # interleave the threads' Python code as finely as processes would
    for racer in racers:
        racer.start()
    try:
        results = [outcomes.get(timeout=60) for _ in racers]
        assert not [detail for kind, detail in results if kind == "unexpected"], results
        winners = [detail for kind, detail in results if kind == "won"]
        assert len(winners) == 1, f"{len(winners)} of {RACERS} managers took over the same stale lease"
        assert lease_of(backend)["id"] == winners[0]
    finally:
        sys.setswitchinterval(switch_interval)
        done.set()
        for racer in racers:
            racer.join(60)
    with open_manager(backend) as mgr:  # the winner released it on its way out
        assert mgr.save(1, {"w": torch.ones(1)})


def start_writer(backend: Any, lease_timeout: float, **config: Any) -> Any:
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "lease_child.py")
    spec = {"url": backend.url, "storage_options": backend.storage_options, "lease_timeout": lease_timeout, **config}
    child = subprocess.Popen(
        [sys.executable, script, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child


def expect_line(child: Any, prefix: str, timeout: float = 60) -> str:
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], 0.5)
        if ready:
            line = child.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line:
                break
    child.kill()
    raise AssertionError(f"the writer process never printed {prefix!r} (exit code {child.poll()})")


def wait_until_stopped(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


@pytest.mark.filterwarnings("ignore::ckptman.LeaseWarning")
@pytest.mark.parametrize("pause", ["idle", "renewal"])
@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
def test_a_writer_paused_past_its_lease_and_resumed_commits_nothing(backend: Any, pause: str) -> None:
    """SIGSTOP between saves, or inside a renewal between reading the lease and replacing it (the
    moment an unconditional renewal would overwrite the successor's lease): the resumed writer
    raises LeaseLostError on its next call and the successor keeps the directory."""
    import signal

    timeout = 1.5
    child = start_writer(backend, timeout, pause=pause, after_resume=timeout)
    try:
        expect_line(child, "ready")
        if pause == "idle":
            os.kill(child.pid, signal.SIGSTOP)
        else:
            expect_line(child, "paused")
        wait_until_stopped(child.pid)
        time.sleep(timeout * 1.5)  # the frozen writer's lease goes stale
        with open_manager(backend, lease_timeout=timeout) as successor:
            assert successor.save(2, {"w": torch.ones(2)}, force=True)
            os.kill(child.pid, signal.SIGCONT)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert expect_line(child, "outcome") == "outcome LeaseLostError"
            assert child.wait(30) == 0
            assert lease_of(backend)["pid"] == os.getpid(), "the resumed writer overwrote or deleted its successor's lease"
            assert successor.save(4, {"w": torch.ones(2)}, force=True)
            assert successor.all_steps() == [1, 2, 4]
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()


@pytest.mark.parametrize("backend", ["local", *REMOTE_LEASED], indirect=True)
def test_a_directory_whose_writer_was_killed_opens_again_at_once(backend: Any) -> None:
    import signal

    child = start_writer(backend, 600)
    try:
        expect_line(child, "ready")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with pytest.warns(LeaseWarning, match=f"pid {child.pid}"):
        mgr = open_manager(backend)
    with mgr:
        assert mgr.all_steps() == [1]
        assert mgr.save(2, {"w": torch.ones(2)}, force=True)


IGNORED_CONDITIONS = "does not make a replace conditional"


def test_a_store_that_ignores_if_match_is_found_and_named_in_the_log(
    flaky_s3_backend: Any, s3_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy strips If-Match from requests, as an S3-compatible store that ignores it would."""
    import logging

    with caplog.at_level(logging.WARNING, logger="ckptman"):
        open_manager(flaky_s3_backend).close()
    assert not [r for r in caplog.records if IGNORED_CONDITIONS in r.getMessage()]
    s3_proxy.configure(drop_request_headers=["If-Match"])
    with caplog.at_level(logging.WARNING, logger="ckptman"):
        with open_manager(flaky_s3_backend) as mgr:
            assert mgr.save(1, {"w": torch.ones(1)})  # the lease still works as a plain read and write
    assert [r for r in caplog.records if IGNORED_CONDITIONS in r.getMessage()]


@pytest.mark.parametrize(
    "error",
    [
        FileExistsError("At least one of the pre-conditions you specified did not hold"),  # s3fs, If-None-Match named
        OSError(22, "At least one of the pre-conditions you specified did not hold"),  # s3fs, no <Condition>
        FileExistsError("http://127.0.0.1/upload/storage/v1/b/bucket/o"),  # gcsfs: every 412
    ],
)
def test_every_honest_412_means_the_condition_failed(error: BaseException) -> None:
    from ckptman.conditional import precondition_failed

    assert precondition_failed(error)


def test_other_errors_are_not_read_as_a_failed_condition() -> None:
    from ckptman.conditional import precondition_failed

    assert not precondition_failed(OSError(22, "Invalid argument"))
    assert not precondition_failed(PermissionError("Access Denied"))
