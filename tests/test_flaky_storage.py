"""Transient storage errors are retried with bounded backoff; a save that finally fails leaves nothing and loses nothing.

The S3 tests go through a real loopback HTTP proxy (tests/netproxy.py) in
front of the moto server that fails chosen requests, with s3fs's and
botocore's own retries turned down so that ckptman's retry layer is what
is tested.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import torch
from netproxy import match

from ckptman import CheckpointManager, RetryPolicy, StorageError
from ckptman.errors import PolicyConfigError
from ckptman.retry import is_transient

FAST = RetryPolicy(attempts=8, initial_backoff=0.01, max_backoff=0.05)


def state(step: int) -> dict[str, Any]:
    return {"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(step)), "step": step}


def open_manager(backend: Any, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(backend.url, storage_options=backend.storage_options, retry=FAST, **kwargs)


class TestClassification:
    @pytest.mark.parametrize(
        "error",
        [
            OSError(errno.EREMOTEIO, "InternalError"),  # s3fs: HTTP 500
            OSError(errno.EBUSY, "SlowDown"),  # s3fs: HTTP 503
            ConnectionResetError(),
            TimeoutError(),
        ],
    )
    def test_transient(self, error: BaseException) -> None:
        assert is_transient(error)

    @pytest.mark.parametrize("error", [FileNotFoundError(), PermissionError(), ValueError("bad"), OSError(errno.ENOSPC, "full")])
    def test_permanent(self, error: BaseException) -> None:
        assert not is_transient(error)

    def test_by_status_and_by_cause(self) -> None:
        class HttpError(Exception):
            def __init__(self, code: int) -> None:
                self.code = code

        assert is_transient(HttpError(503)) and is_transient(HttpError(429)) and not is_transient(HttpError(404))
        try:
            try:
                raise ConnectionResetError("peer reset")
            except ConnectionResetError as inner:
                raise RuntimeError("wrapped") from inner
        except RuntimeError as wrapped:
            assert is_transient(wrapped)

    def test_backoff_is_bounded_and_exponential(self) -> None:
        policy = RetryPolicy(attempts=10, initial_backoff=1.0, max_backoff=5.0, multiplier=2.0)
        for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
            assert ceiling / 2 <= policy.backoff(retry) <= ceiling

    def test_gives_up_after_attempts_and_never_retries_permanent_errors(self) -> None:
        calls: list[int] = []
        slept: list[float] = []

        def flaky() -> None:
            calls.append(1)
            raise ConnectionResetError("reset")

        with pytest.raises(ConnectionResetError):
            RetryPolicy(attempts=3, initial_backoff=0.5).call(flaky, "op", sleep=slept.append)
        assert len(calls) == 3 and len(slept) == 2

        def missing() -> None:
            calls.append(1)
            raise FileNotFoundError("gone")

        calls.clear()
        with pytest.raises(FileNotFoundError):
            RetryPolicy(attempts=3).call(missing, "op", sleep=slept.append)
        assert len(calls) == 1

    @pytest.mark.parametrize("bad", [{"attempts": 0}, {"attempts": 1.5}, {"initial_backoff": -1}, {"max_backoff": "1"}])
    def test_invalid_policy(self, bad: dict[str, Any]) -> None:
        with pytest.raises(PolicyConfigError, match="RetryPolicy"):
            RetryPolicy(**bad)


def test_saves_and_restores_survive_a_third_of_requests_failing(flaky_s3_backend: Any, s3_proxy: Any) -> None:
    mgr = open_manager(flaky_s3_backend, keep_last=2, best="loss")
    s3_proxy.configure(fail_rate=0.3, faults=("500", "503", "reset", "reset_mid"), seed=7)
    for step in range(1, 6):
        assert mgr.save(step, state(step), metrics={"loss": 1.0 / step})
    with mgr.save_directory(6) as folder:
        for shard in range(4):
            torch.save(state(100 + shard), f"{folder}/shard_{shard}.pt")
    restored = mgr.restore(5)
    report = mgr.verify()
    s3_proxy.heal()
    mgr.close()
    assert s3_proxy.stats.injected >= 10, s3_proxy.stats
    assert torch.equal(restored["w"], state(5)["w"])
    assert report.ok
    reader = open_manager(flaky_s3_backend, read_only=True, best="loss")
    assert reader.all_steps() == [5, 6] and reader.best_step() == 5


def test_a_stalled_request_times_out_and_is_retried(flaky_s3_backend: Any, s3_proxy: Any) -> None:
    with open_manager(flaky_s3_backend) as mgr:
        s3_proxy.fail_next(1, "stall", match(method="PUT", path_contains="state.pt"))
        assert mgr.save(1, state(1))
        assert s3_proxy.stats.faults["stall"] == 1
        assert torch.equal(mgr.restore()["w"], state(1)["w"])


def test_a_save_that_finally_fails_raises_leaves_nothing_and_deletes_nothing(flaky_s3_backend: Any, s3_proxy: Any) -> None:
    mgr = open_manager(flaky_s3_backend, keep_last=1)
    mgr.save(1, state(1))
    s3_proxy.configure(fail_rate=1.0, faults=("503",), match=match(method="PUT", path_contains="step_00000002"))
    with pytest.raises(StorageError, match="step_00000002/state.pt"):
        mgr.save(2, state(2))
    s3_proxy.heal()
    assert mgr.all_steps() == [1]
    fs, root = flaky_s3_backend.fs()
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/step_00000002"), "nothing of the failed save is visible"
    assert torch.equal(mgr.restore()["w"], state(1)["w"])
    assert mgr.save(2, state(2)), "the same step saves once storage recovers"
    mgr.close()


def test_retries_are_bounded(flaky_s3_backend: Any, s3_proxy: Any) -> None:
    mgr = open_manager(flaky_s3_backend)
    mgr.save(1, state(1))
    s3_proxy.reset_stats()
    s3_proxy.configure(fail_rate=1.0, faults=("500",), match=match(path_contains="step_00000001/state.pt"))
    reader = CheckpointManager(
        flaky_s3_backend.url,
        storage_options=flaky_s3_backend.storage_options,
        read_only=True,
        retry=RetryPolicy(attempts=3, initial_backoff=0.01),
    )
    with pytest.raises(StorageError, match="could not read"):
        reader.restore(1)
    attempts = [r for r in s3_proxy.records if "step_00000001/state.pt" in r.target]
    assert len(attempts) == 3, [(r.method, r.fault) for r in attempts]
    s3_proxy.heal()
    mgr.close()
