"""Many files at once on an async backend's event loop (ckptman.loopio), on moto, SeaweedFS and fake-gcs.

Directory files that fit one request go up as one PUT each and come back as
one streamed GET each, all as coroutines on fsspec's loop; larger ones keep
the threaded multipart uploads and ranged reads. What must hold whichever
path a file takes: the bytes round-trip, every file is checked against the
manifest, a request that fails midway is retried from the start (never
appended to), a missing or changed file is a CorruptCheckpointError naming
it, an interrupt leaves nothing still transferring once it has been raised,
and a batch of ``max_concurrency`` requests really is on the wire at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from conftest import Backend, read_tree, sigint_once, write_tree
from netproxy import match

from ckptman import CheckpointManager, CorruptCheckpointError, RetryPolicy, loopio
from ckptman.errors import StorageError
from ckptman.prefetch import RANGE, split
from ckptman.storage import sized_connection_pool

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.02)
SMALL = 300 * 1024


@pytest.fixture(params=["s3", "seaweedfs"])
def s3_like(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


@pytest.fixture(params=["s3", "seaweedfs", "gcs"])
def remote(request: pytest.FixtureRequest) -> Backend:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


def blobs(count: int, size: int = SMALL) -> dict[str, bytes]:
    return {f"part/{i:03d}.bin": os.urandom(size) for i in range(count)}


def stored_path(backend: Backend, mgr: CheckpointManager, step: int, rel: str) -> tuple[Any, str]:
    fs = fsspec.filesystem(backend.url.split("://")[0], skip_instance_cache=True, **backend.storage_options)
    return fs, f"{backend.path}/{mgr.checkpoint_path(step).rsplit('/', 1)[1]}/{rel}"


def test_small_and_large_files_round_trip_with_both_paths(remote: Backend, tmp_path: Path) -> None:
    files = {**blobs(24), "big/shard.bin": os.urandom(RANGE + 3 * 2**20), "empty.bin": b""}
    with CheckpointManager(remote.url, storage_options=remote.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        assert mgr.verify(1).ok
        restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
    assert read_tree(restored) == files


def test_a_get_cut_midway_is_retried_into_a_fresh_file(flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path) -> None:
    files = blobs(8)
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        s3_proxy.fail_next(1, "reset_mid", match(method="GET", path_contains="part/003.bin"))
        restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
    assert s3_proxy.stats.faults["reset_mid"] == 1
    assert read_tree(restored) == files  # the half body that arrived first was not kept


def test_a_put_failing_once_is_retried_and_the_checkpoint_verifies(flaky_s3_backend: Backend, s3_proxy: Any) -> None:
    files = blobs(8)
    s3_proxy.fail_next(2, "500", match(method="PUT", path_contains="part/005.bin"))
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        assert s3_proxy.stats.faults["500"] == 2
        assert mgr.verify(1).ok


def test_a_put_failing_on_every_attempt_raises_naming_the_file_and_commits_nothing(
    flaky_s3_backend: Backend, s3_proxy: Any
) -> None:
    s3_proxy.configure(fail_rate=1.0, faults=("500",), match=match(method="PUT", path_contains="part/002.bin"))
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with pytest.raises(StorageError, match="part/002.bin"), mgr.save_directory(1, force=True) as folder:
            write_tree(folder, blobs(8))
        assert mgr.all_steps() == []


@pytest.mark.parametrize("change", ["missing", "grew", "shrank"])
def test_a_changed_small_file_fails_verification_naming_it(remote: Backend, tmp_path: Path, change: str) -> None:
    files = blobs(6)
    with CheckpointManager(remote.url, storage_options=remote.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        fs, path = stored_path(remote, mgr, 1, "part/004.bin")
        if change == "missing":
            fs.rm_file(path)
        else:
            data = files["part/004.bin"]
            fs.pipe_file(path, data + b"x" if change == "grew" else data[:-1])
        expected = "missing" if change == "missing" else "size mismatch"
        with pytest.raises(CorruptCheckpointError, match=rf"part/004\.bin.*{expected}"):
            mgr.restore_directory(1, local_dir=tmp_path / "back")
    assert not list((tmp_path / "back").rglob("*.bin"))  # nothing of a corrupted checkpoint is left behind


LARGE = 2 * RANGE + 5 * 2**20  # three ranges, the last one short


def large_state_checkpoint(mgr: CheckpointManager) -> dict[str, Any]:
    state = {"w": torch.arange(LARGE // 4, dtype=torch.float32)}
    assert mgr.save(1, state, force=True)
    return state


def test_a_large_file_comes_back_over_concurrent_ranges_each_retried_on_its_own(
    flaky_s3_backend: Backend, s3_proxy: Any
) -> None:
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        state = large_state_checkpoint(mgr)
        fs, path = stored_path(flaky_s3_backend, mgr, 1, "state.pt")
        ranges = [f"bytes={a}-{b - 1}" for a, b in split(fs.info(path)["size"])]
        s3_proxy.reset_stats()
        s3_proxy.fail_next(1, "reset_mid", match(method="GET", path_contains="state.pt", header=("range", ranges[1])))
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    asked = [r.headers.get("range") for r in s3_proxy.records if r.method == "GET" and "state.pt" in r.target]
    assert len(ranges) == 3 and sorted(asked) == sorted([*ranges, ranges[1]])  # each range once, the cut one again
    assert s3_proxy.stats.faults["reset_mid"] == 1


@pytest.mark.parametrize("change", ["shrank", "grew", "same size, other bytes"])
def test_a_changed_large_file_fails_verification(s3_like: Backend, change: str) -> None:
    with CheckpointManager(s3_like.url, storage_options=s3_like.storage_options, retry=FAST) as mgr:
        large_state_checkpoint(mgr)
        fs, path = stored_path(s3_like, mgr, 1, "state.pt")
        data = fs.cat_file(path)
        changed = {"shrank": data[: -RANGE], "grew": data + b"x", "same size, other bytes": data[:-1] + bytes([data[-1] ^ 1])}
        fs.pipe_file(path, changed[change])
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch" if change.startswith("same") else "size mismatch"):
            mgr.restore(1)


def first_payload_request_seen(s3_proxy: Any, method: str) -> bool:
    return any(r.method == method and "/part/" in r.target for r in s3_proxy.records)


def test_an_interrupted_restore_stops_every_download_before_it_raises(
    flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path
) -> None:
    target = tmp_path / "back"
    options = flaky_s3_backend.storage_options
    with CheckpointManager(flaky_s3_backend.url, storage_options=options, retry=FAST, max_concurrency=2) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, blobs(16, 64 * 1024))  # 0.25 s each on the throttled link, two at a time
        s3_proxy.configure(bandwidth=256 * 1024)
        with pytest.raises(KeyboardInterrupt), sigint_once(lambda: first_payload_request_seen(s3_proxy, "GET")):
            mgr.restore_directory(1, local_dir=target)
        requests = len(s3_proxy.records)
        time.sleep(1.5)  # a download still running would now have created some of the files not yet started
        assert not list(target.rglob("*.bin"))
        assert len(s3_proxy.records) == requests
        s3_proxy.heal()


MiB = 2**20


def test_retried_files_count_once_towards_the_progress_total(
    flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file sent or fetched again after a failure midway adds nothing to the total until it passes where it got."""
    files = {**blobs(4, 15 * MiB), "big.bin": os.urandom(40 * MiB)}  # batched files, and one multipart / ranged
    total = sum(map(len, files.values())) >> 20
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        s3_proxy.fail_next(1, "500", match(method="PUT", path_contains="part/001.bin"))
        s3_proxy.fail_next(1, "500", match(method="PUT", path_contains="big.bin"))
        with caplog.at_level(logging.INFO, logger="ckptman"), mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        s3_proxy.fail_next(1, "reset_mid", match(method="GET", path_contains="part/002.bin"))
        s3_proxy.fail_next(1, "reset_mid", match(method="GET", path_contains="big.bin"))
        with caplog.at_level(logging.INFO, logger="ckptman"):
            restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
    assert s3_proxy.stats.faults["500"] == 2 and s3_proxy.stats.faults["reset_mid"] == 2
    assert read_tree(restored) == files
    assert f"upload 5 files: {total} MiB in" in caplog.text
    assert f"download 5 files: {total} MiB in" in caplog.text


def connections_of(proxy: Any, method: str) -> set[int]:
    return {r.connection for r in proxy.records if r.method == method and ".bin" in r.target}


def test_a_full_batch_is_on_the_wire_at_once_each_request_on_its_own_connection(
    s3_backend: Backend, s3_proxy: Any, tmp_path: Path
) -> None:
    """max_concurrency=16 means 16 requests in flight: botocore's default pool of 10 connections queued six."""
    s3_proxy.configure(latency=0.1)  # every request holds its connection while all 16 start
    options = {**s3_backend.storage_options, "client_kwargs": {"endpoint_url": s3_proxy.url}}
    files = blobs(16, 1000)
    with CheckpointManager(s3_backend.url, storage_options=options, max_concurrency=16, retry=FAST) as mgr:
        s3_proxy.reset_stats()
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        uploads = connections_of(s3_proxy, "PUT")
        s3_proxy.reset_stats()
        restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
        downloads = connections_of(s3_proxy, "GET")
    assert read_tree(restored) == files
    assert len(uploads) == 16 and len(downloads) == 16


def test_a_connection_pool_the_user_sized_stands(s3_backend: Backend, s3_proxy: Any) -> None:
    s3_proxy.configure(latency=0.05)
    options = {
        **s3_backend.storage_options,
        "client_kwargs": {"endpoint_url": s3_proxy.url},
        "config_kwargs": {"max_pool_connections": 3},
    }
    with CheckpointManager(s3_backend.url, storage_options=options, max_concurrency=16, retry=FAST) as mgr:
        s3_proxy.reset_stats()
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, blobs(12, 1000))
        assert 1 <= len(connections_of(s3_proxy, "PUT")) <= 3
        assert mgr.verify(1).ok


class TestSizedConnectionPool:
    """storage.sized_connection_pool: the options ckptman opens the filesystem with, without I/O."""

    def test_an_s3_pool_holds_the_transfers_and_the_commit_beside_them(self) -> None:
        options = {"key": "k", "config_kwargs": {"read_timeout": 5}}
        sized = sized_connection_pool("s3://bucket/run", options, 16)
        assert sized == {"key": "k", "config_kwargs": {"read_timeout": 5, "max_pool_connections": 20}}
        assert options == {"key": "k", "config_kwargs": {"read_timeout": 5}}, "the caller's options are not changed"
        assert sized_connection_pool("s3a://bucket/run", {}, 1) == {"config_kwargs": {"max_pool_connections": 10}}

    def test_what_the_user_chose_stands(self) -> None:
        chosen = {"config_kwargs": {"max_pool_connections": 3}}
        assert sized_connection_pool("s3://bucket/run", chosen, 16) == chosen
        whole_config = {"client_kwargs": {"config": object()}}  # a botocore Config of their own
        assert sized_connection_pool("s3://bucket/run", whole_config, 16) == whole_config

    @pytest.mark.parametrize("url", ["gs://bucket/run", "memory://run", "/tmp/run", "file:///tmp/run"])
    def test_other_backends_are_left_alone(self, url: str) -> None:
        assert sized_connection_pool(url, {"token": "anon"}, 16) == {"token": "anon"}


class TestBounded:
    """loopio.bounded: the batch scheduler itself, without I/O."""

    def test_results_come_back_in_order_with_at_most_limit_running(self) -> None:
        running, most = 0, 0

        def job(i: int) -> Any:
            async def run() -> int:
                nonlocal running, most
                running += 1
                most = max(most, running)
                await asyncio.sleep(0.01 * (5 - i % 5))
                running -= 1
                return i

            return run

        assert asyncio.run(loopio.bounded([job(i) for i in range(12)], 3)) == list(range(12))
        assert most == 3

    def test_the_first_failure_cancels_the_rest_and_is_raised_after_they_end(self) -> None:
        ended: list[str] = []

        async def fail() -> None:
            await asyncio.sleep(0.01)
            raise ValueError("first")

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                ended.append("slow")

        started = time.monotonic()
        with pytest.raises(ValueError, match="first"):
            asyncio.run(loopio.bounded([slow, fail, slow], 3))
        assert time.monotonic() - started < 5
        assert ended == ["slow", "slow"]


class TestCallAsync:
    def test_transient_errors_are_retried_and_permanent_ones_raised_at_once(self) -> None:
        policy = RetryPolicy(attempts=3, initial_backoff=0.001, max_backoff=0.001)
        calls: list[int] = []

        async def flaky() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionResetError("reset")
            return "ok"

        assert asyncio.run(policy.call_async(flaky, "read x")) == "ok" and len(calls) == 3

        async def missing() -> None:
            calls.append(1)
            raise FileNotFoundError("x")

        calls.clear()
        with pytest.raises(FileNotFoundError):
            asyncio.run(policy.call_async(missing, "read x"))
        assert len(calls) == 1
