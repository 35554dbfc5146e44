"""Distributed runs: real multi-process gloo jobs on CPU, against local disk and S3 (moto).

Each test starts a job of 2 or 3 processes (multiprocessing, spawn context)
running a scenario of tests/dist_worker.py; every rank writes what it
observed to a JSON file, and the test asserts on those files and on what a
fresh single-process manager finds on storage afterwards. A job that does not
finish within its deadline is SIGKILLed and the test fails (a hang never
blocks the suite).

Importing torch costs each spawned process a second or two, so each job
checks many things, and jobs whose outcome several tests assert on run once
per module (``sharded_jobs``, ``async_job``). The whole module takes 1.5 to
2.5 minutes on two cores.

Five tests here first failed, on bugs since fixed in ckptman: a rank raising
inside ``save_directory()``'s block, metrics passed on rank 0 only, an async
failure noticed by different calls on different ranks, a DCP failure on one
rank (a ``BaseException``), and async snapshots of DTensors.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dist_worker
import pytest
import torch
from conftest import Backend, make_backend

from ckptman import (
    THIS_PROCESS,
    CheckpointManager,
    CheckpointWarning,
    LeaseWarning,
    MissingRanksError,
    PolicyConfigError,
    ShardedOnOneRankError,
    distributed,
)
from ckptman.lease import LEASE_NAME
from ckptman.manifest import MANIFEST_NAME, Manifest

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    """The outcome of one distributed job: each rank's observations and exit code."""

    scenario: str
    results: list[dict[str, Any] | None]
    exitcodes: list[int | None]
    seconds: float
    timed_out: bool

    def rank(self, r: int) -> dict[str, Any]:
        result = self.results[r]
        assert result is not None, f"rank {r} of {self.scenario} wrote no observations (exit code {self.exitcodes[r]})"
        return result

    def all(self) -> list[dict[str, Any]]:
        return [self.rank(r) for r in range(len(self.results))]

    def assert_clean(self) -> None:
        """Every rank ran its scenario to the end and exited 0."""
        assert not self.timed_out, f"{self.scenario} hung: killed after {self.seconds:.0f}s; {self.describe()}"
        for r, result in enumerate(self.results):
            assert result is not None and "fatal" not in result, f"rank {r} failed: {(result or {}).get('fatal')}"
            assert result.get("finished"), f"rank {r} did not finish: {self.describe()}"
        assert self.exitcodes == [0] * len(self.results), self.describe()

    def same(self, key: str) -> Any:
        """The value every rank observed under ``key`` (asserting they agree)."""
        values = [result[key] for result in self.all()]
        for r, value in enumerate(values[1:], 1):
            assert value == values[0], f"{key}: rank {r} saw {value!r}, rank 0 saw {values[0]!r}"
        return values[0]

    def describe(self) -> str:
        last = [sorted(k for k in (res or {}) if k != "writes")[-3:] for res in self.results]
        return f"exit codes {self.exitcodes}; last keys per rank {last}"


def run_job(
    tmp_path: Path,
    scenario: str,
    world: int,
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    params: dict[str, Any] | None = None,
    deadline: float = 90.0,
    gloo_timeout: float = 60.0,
) -> Job:
    """Run ``dist_worker.<scenario>`` on ``world`` spawned gloo processes; kill them all after ``deadline`` seconds.

    Started again (up to twice) if the free port picked for the rendezvous was taken before rank 0 bound it.
    """
    for _ in range(3):
        job = _run_job_once(tmp_path, scenario, world, url, storage_options, params, deadline, gloo_timeout)
        if not any(
            result is not None and not result.get("joined") and "address already in use" in str(result.get("fatal")).lower()
            for result in job.results
        ):
            break
    return job


def _run_job_once(
    tmp_path: Path,
    scenario: str,
    world: int,
    url: str,
    storage_options: dict[str, Any] | None,
    params: dict[str, Any] | None,
    deadline: float,
    gloo_timeout: float,
) -> Job:
    result_dir = tmp_path / f"{scenario}-{world}-{time.monotonic_ns()}"
    result_dir.mkdir()
    env = {key: os.environ[key] for key in AWS_ENV if key in os.environ}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    config = {
        "scenario": scenario,
        "url": url,
        "storage_options": storage_options or {},
        "params": params or {},
        "port": free_port(),
        "result_dir": str(result_dir),
        "timeout": gloo_timeout,
        "env": env,
    }
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=dist_worker.entry, args=(r, world, config), daemon=True) for r in range(world)]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    timed_out = False
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - (time.monotonic() - start)))
            if proc.is_alive():
                timed_out = True
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
    seconds = time.monotonic() - start
    results: list[dict[str, Any] | None] = []
    for r in range(world):
        path = result_dir / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return Job(scenario, results, [proc.exitcode for proc in procs], seconds, timed_out)


def fresh_reader(backend: Any, **kwargs: Any) -> CheckpointManager:
    """What a later job (one process, read-only) finds on storage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True, **kwargs)


def stored_manifest(backend: Any, name: str) -> Manifest:
    fs, root = backend.fs(fresh=True)
    return Manifest.from_bytes(fs.cat_file(f"{root}/{name}/{MANIFEST_NAME}"), name)


def stored_names(backend: Any, rel: str = "") -> set[str]:
    """Names directly below the directory (or one of its folders), read fresh."""
    fs, root = backend.fs(fresh=True)
    path = f"{root}/{rel}".rstrip("/")
    fs.invalidate_cache()
    try:
        return {os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def error(observed: dict[str, Any]) -> list[str]:
    assert "error" in observed, f"expected an error, got {observed}"
    return observed["error"]


def failed_ranks(observed: dict[str, Any]) -> dict[int, str]:
    """The ``failed_ranks`` of a SaveFailedError a rank observed."""
    assert error(observed)[0] == "SaveFailedError", observed
    return {int(rank): cause for rank, cause in observed["fields"]["failed_ranks"].items()}


BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, backend_factory: Any) -> Any:
    return backend_factory(request.param)


def module_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    """A fresh run directory for a module-scoped job (shared by the tests that assert on its outcome)."""
    return make_backend(request.param, tmp_path_factory.mktemp(request.param), request)


# --------------------------------------------------------------------------- #
# Plain (replicated) saves
# --------------------------------------------------------------------------- #


def test_epoch_and_clock_triggers_are_decided_by_rank_0(tmp_path: Path, store: Any) -> None:
    job = run_job(tmp_path, "triggers", 2, store.url, store.storage_options)
    job.assert_clean()
    assert job.same("saved") == {"1": True, "2": True, "3": False}
    assert job.same("epochs") == {"1": None, "2": 1}


def test_publish_is_written_by_rank_0_and_every_rank_gets_its_url_or_error(tmp_path: Path, store: Any) -> None:
    job = run_job(tmp_path, "publish", 2, store.url, store.storage_options)
    job.assert_clean()
    url = job.same("url")["ok"]
    assert "/published/step_00000001-" in url and url.endswith(".pth")
    assert error(job.same("missing"))[0] == "MissingKeysError"
    writes = [rank["published_writes"] for rank in job.all()]
    assert writes[0] == [["write_atomic", url[len(url.rsplit("/published/", 1)[0]) + 1 :]]] and writes[1] == []


def test_plain_saves_decided_and_written_by_rank_0(tmp_path: Path, store: Any) -> None:
    job = run_job(tmp_path, "plain", 2, store.url, store.storage_options)
    job.assert_clean()

    # Rank 0's metrics decide on every rank: 3 would be a new best for rank 1, 5 is one for rank 0.
    assert job.same("saved") == {"2": True, "3": False, "4": True, "5": True, "6": True, "7": False, "8": True}
    after = job.same("after_saves")
    assert after["all_steps"] == [5, 6, 8]  # keep_last=2 plus the best (rank 0's: step 5)
    assert after["best_step"] == 5
    assert after["metrics"] == {"5": {"loss": 1.0}, "6": {"loss": 5.0}, "8": {"loss": 6.0}}
    assert after["kept"] == {"5": ["best loss #1"], "6": ["last 2"], "8": ["latest", "last 2"]}

    restored = job.same("restore_latest")["ok"]
    assert restored == {"w": [8.0] * 4, "step": 8}
    assert job.same("restore_5")["ok"] == {"w": [5.0] * 4, "step": 5}
    assert error(job.same("restore_gone"))[0] == "CheckpointNotFoundError"

    # report(): rank 0's evaluation counts; retention re-runs on rank 0 and every rank learns the result.
    assert job.same("after_report")["best_step"] == 8
    assert job.same("after_report")["all_steps"] == [6, 8]
    assert job.same("after_report")["metrics"]["8"] == {"loss": 0.5}
    assert job.same("after_delete")["all_steps"] == [8]
    assert error(job.same("save_old_step"))[0] == "InvalidStepError"
    assert error(job.same("save_existing_step"))[0] == "StepExistsError"
    assert job.same("save_10") is True
    assert job.same("after_refresh")["all_steps"] == [8, 10]

    # A second writable manager of the same job: rank 0 cannot take the lease, every rank is refused.
    assert [error(r["second_writer"])[0] for r in job.all()] == ["DirectoryLockedError"] * 2
    assert job.same("read_only_while_open") == {"all_steps": [8, 10], "best_step": 8}
    assert job.same("read_only_restore")["ok"] == {"w": [10.0] * 4, "step": 10}
    assert error(job.same("read_only_save"))[0] == "ReadOnlyError"
    assert error(job.same("closed_save"))[0] == "ManagerClosedError"
    assert job.same("reopened")["all_steps"] == [8, 10]  # the lease was released on close

    # Only rank 0 touches storage; no other rank ever writes or deletes anything.
    rank0_writes = job.rank(0)["writes"]
    assert ["create_exclusive", LEASE_NAME] in rank0_writes
    assert ["write_file", "step_00000008/state.pt"] in rank0_writes
    assert ["remove", "step_00000006"] in [w[:2] for w in rank0_writes]
    assert job.rank(1)["writes"] == []

    with fresh_reader(store, best="loss", mode="min") as reader:
        assert reader.all_steps() == [8, 10]
        assert reader.best_step() == 8
        assert reader.verify().ok
        assert [e.path for e in stored_manifest(store, "step_00000010").files] == ["state.pt"]
    assert stored_names(store) == {"step_00000008", "step_00000010", "latest", "ckptman.json"}


# --------------------------------------------------------------------------- #
# Directory saves (DeepSpeed-style: every rank writes its own shard files)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("world", [3])
def test_directory_saves_commit_every_ranks_shards(tmp_path: Path, store: Any, world: int) -> None:
    job = run_job(tmp_path, "directory", world, store.url, store.storage_options)
    job.assert_clean()
    shard_names = sorted(
        name
        for r in range(world)
        for name in (f"mp_rank_{r:02d}_model_states.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"meta/rank{r}.json")
    )
    assert job.same("after_saves")["all_steps"] == [2, 3]
    assert all(job.rank(r)["staging_removed_3"] for r in range(world))
    assert len({job.rank(r)["local_3"] for r in range(world)}) == world  # a local folder per rank
    assert job.same("not_due") is None

    restored = [job.rank(r)["restore_3"]["ok"] for r in range(world)]
    assert all(rest["files"] == shard_names for rest in restored)
    for r, rest in enumerate(restored):
        assert rest["mine"] == {"rank": r, "step": 3, "w": [300.0 + r] * 3}

    # Two ranks writing the same file name: refused on every rank, nothing committed.
    assert [error(res["clash_4"])[0] for res in job.all()] == ["FileNameClashError"] * world
    assert f"same name into step 4: same.bin (ranks {', '.join(map(str, range(world)))})" in error(job.rank(0)["clash_4"])[1]
    assert job.same("after_clash")["all_steps"] == [2, 3]

    # Rank 1 fails mid-upload (after one of its files is stored): the save fails on every rank.
    failed = [error(res["failing_5"]) for res in job.all()]
    assert failed[1][0] == "OSError"  # the failing rank raises its own error
    for r in (0, *range(2, world)):
        causes = failed_ranks(job.rank(r)["failing_5"])
        assert list(causes) == [1] and causes[1].startswith("OSError: injected: no space left"), causes
        assert job.rank(r)["failing_5"]["fields"]["step"] == 5
        assert "rank 1: OSError: injected" in failed[r][1], failed[r]
    assert job.same("after_failure")["all_steps"] == [2, 3]
    assert job.same("retry_5") == {"ok": True}
    assert job.same("after_retry")["all_steps"] == [3, 5]

    # Ranks other than 0 only wrote their own payload files, and never deleted anything.
    for r in range(1, world):
        kinds = {kind for kind, _ in job.rank(r)["writes"]}
        assert kinds == {"write_file"}, job.rank(r)["writes"]
        for _, rel in job.rank(r)["writes"]:
            base = rel.split("/", 1)[1]
            assert base == "same.bin" or base in shard_names and (f"rank_{r:02d}" in base or f"rank_{r}_" in base or f"rank{r}." in base), rel

    with fresh_reader(store) as reader:
        assert reader.all_steps() == [3, 5]
        assert reader.verify().ok
        manifest = stored_manifest(store, "step_00000005")
        assert sorted(e.path for e in manifest.files) == shard_names
        assert all(e.checksum.startswith("xxh3_128:") for e in manifest.files)
    assert stored_names(store) == {"step_00000003", "step_00000005", "latest", "ckptman.json"}


def test_rank_raising_inside_save_directory_block_fails_the_save_on_every_rank(tmp_path: Path, local_backend: Any) -> None:
    job = run_job(tmp_path, "raise_in_block", 2, local_backend.url, deadline=40)
    assert not job.timed_out, job.describe()
    assert error(job.rank(1)["save_2"])[0] == "ValueError"
    assert failed_ranks(job.rank(0)["save_2"]) == {1: "ValueError: injected: rank 1 failed inside the block"}
    assert job.same("after_failure")["all_steps"] == [1]
    assert job.same("save_3") == {"ok": None}
    assert job.same("after_next")["all_steps"] == [1, 3]
    assert job.same("verify") == {"ok": {"step_00000001": [], "step_00000003": []}}


# --------------------------------------------------------------------------- #
# A rank killed mid-save
# --------------------------------------------------------------------------- #


DIST_TIMEOUT = 8.0  # ckptman's gloo groups (dist_timeout); the default group keeps run_job's 60 s


@pytest.mark.parametrize(
    "bad", [True, 0, -5, timedelta(0), timedelta(seconds=-1), 0.0001, float("nan"), float("inf"), "60", [60]], ids=repr
)
def test_dist_timeout_is_validated_before_storage_is_touched(tmp_path: Path, bad: object) -> None:
    with pytest.raises(PolicyConfigError, match=r"dist_timeout must be .*(seconds or a datetime.timedelta|at least 1 millisecond)"):
        CheckpointManager(tmp_path / "run", dist_timeout=bad)
    assert not (tmp_path / "run").exists()


def test_dist_timeout_accepts_seconds_and_timedeltas(tmp_path: Path) -> None:
    for good in (30, 2.5, timedelta(minutes=5), None):  # a single process has no group: accepted, unused
        CheckpointManager(tmp_path / "run", dist_timeout=good).close()


@pytest.mark.parametrize(
    ("backend_name", "world", "victim", "where", "how"),
    [
        ("local", 2, 1, "block", "kill"),  # killed inside save_directory's block, after writing its shard
        ("s3", 2, 1, "upload", "kill"),  # killed after one of its files reached storage
        ("local", 3, 0, "upload", "kill"),  # the coordinator (lease holder) killed mid-upload
        ("local", 2, 1, "upload", "stop"),  # SIGSTOPped mid-upload: alive but silent, only the timeout ends the wait
    ],
    ids=["local-rank1-in-block", "s3-rank1-mid-upload", "local-rank0-mid-upload", "local-rank1-stopped-mid-upload"],
)
def test_killed_rank_fails_the_others_and_commits_nothing(
    tmp_path: Path, backend_factory: Any, backend_name: str, world: int, victim: int, where: str, how: str
) -> None:
    store = backend_factory(backend_name)
    params = {"victim": victim, "where": where, "how": how, "dist_timeout": DIST_TIMEOUT}
    job = run_job(tmp_path, "kill", world, store.url, store.storage_options, params=params, deadline=60)
    assert not job.timed_out, f"a survivor hung after the kill: {job.describe()}"
    assert job.exitcodes[victim] == -signal.SIGKILL
    for r in range(world):
        assert job.rank(r)["committed"]["all_steps"] == [1, 2]
        if r == victim:
            continue
        assert "fatal" not in job.rank(r), job.rank(r)["fatal"]
        assert "error" in job.rank(r)["save_3"], f"rank {r} did not notice the kill: {job.rank(r)['save_3']}"
        assert_peer_lost(job, r, victim, how)
        assert job.rank(r)["seconds_to_error"] < 30
        assert job.rank(r)["close"] == {"ok": None}  # closing after the failure does not hang either
        assert job.exitcodes[r] == 0

    # Nothing of step 3 is visible; the earlier checkpoints are intact.
    assert "step_00000003" not in stored_names(store) or MANIFEST_NAME not in stored_names(store, "step_00000003")
    with fresh_reader(store) as reader:
        assert reader.all_steps() == [1, 2]
        assert reader.verify().ok

    # The next job (one process here) resumes: it gets the lease (taking over a killed holder's),
    # removes the debris of step 3 and saves it again.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeaseWarning)
        with CheckpointManager(store.url, storage_options=store.storage_options) as mgr:
            assert mgr.all_steps() == [1, 2]
            assert "step_00000003" not in stored_names(store)
            assert mgr.save(3, {"w": torch.ones(2)}, force=True)
            assert mgr.all_steps() == [1, 2, 3]


def assert_peer_lost(job: Job, survivor: int, victim: int, how: str) -> None:
    """The survivor raised PeerRankError naming its rank, the world size, the save and dist_timeout:
    at once after a kill, after about dist_timeout after a stop."""
    kind, message = error(job.rank(survivor)["save_3"])
    assert kind == "PeerRankError", message
    world = len(job.results)
    assert f"rank {survivor} of {world} lost " in message and "during the save of step 3" in message, message
    if world == 2:
        assert f"lost rank {victim} " in message, message
    assert f"dist_timeout={DIST_TIMEOUT:g}s" in message and "restart all its ranks" in message, message
    waited = job.rank(survivor)["error_at"] - job.rank(victim)["left_at"]
    if how == "kill":  # gloo sees the connection close
        assert waited < DIST_TIMEOUT, f"{waited:.1f}s from the kill to the error"
    else:  # nothing closes: the timeout ends the wait
        assert DIST_TIMEOUT / 2 < waited < DIST_TIMEOUT + 10, f"{waited:.1f}s from the stop to the error"


# --------------------------------------------------------------------------- #
# One rank only: process_group=THIS_PROCESS, and the mistake of a collective manager on one rank
# --------------------------------------------------------------------------- #


def test_one_rank_manager_saves_and_restores_on_rank_0_while_rank_1_never_calls_ckptman(
    tmp_path: Path, store: Any
) -> None:
    job = run_job(tmp_path, "one_rank", 2, store.url, store.storage_options, deadline=60)
    job.assert_clean()
    rank0 = job.rank(0)
    assert rank0["saved"] == {"1": True, "2": True, "3": True}
    assert rank0["after_saves"]["all_steps"] == [3, 4] and rank0["after_saves"]["best_step"] == 3
    assert rank0["restore_3"]["ok"] == {"w": [3.0] * 4, "step": 3}
    assert rank0["restore_4"]["ok"] == {"rank": 0, "step": 4, "w": [400.0] * 3}
    assert rank0["verify"] == {"ok": True}
    for key in ("sharded_save", "sharded_restore"):
        kind, message = error(rank0[key])
        assert kind == "ShardedOnOneRankError" and "process_group=ckptman.THIS_PROCESS" in message
    assert rank0["seconds"] < 30
    assert ["create_exclusive", LEASE_NAME] in rank0["writes"]  # the lease is this process's

    # No process group was created on either rank, and rank 1 never even imported ckptman;
    # afterwards the job goes on together: the default group, a group made by all ranks, a collective manager.
    assert job.same("groups_created") == 0
    assert job.rank(1)["ckptman_imported"] is False
    assert job.same("all_reduce") == 3.0
    assert job.same("new_group_broadcast") == "from rank 0"
    assert job.same("collective")["all_steps"] == [3, 4]
    assert job.same("collective_restore")["ok"] == {"w": [3.0] * 4, "step": 3}
    with fresh_reader(store) as reader:
        assert reader.all_steps() == [3, 4] and reader.verify().ok


def test_collective_manager_on_one_rank_fails_in_bounded_time_naming_the_one_rank_option(
    tmp_path: Path, local_backend: Any
) -> None:
    params = {"join_timeout": 2.0, "dist_timeout": 3.0}
    job = run_job(tmp_path, "one_rank_mistake", 2, local_backend.url, params=params, deadline=60)
    job.assert_clean()
    rank0 = job.rank(0)
    # Constructed on rank 0 only: MissingRanksError after ckptman's join timeout (dist_timeout, else JOIN_TIMEOUT).
    for key, waited in (("default", 2.0), ("dist_timeout", 3.0)):
        kind, message = error(rank0[f"constructed_on_rank_0_{key}"])
        assert kind == "MissingRanksError", message
        assert f"only 1 of the 2 ranks of the job constructed this CheckpointManager within {waited:g}s" in message
        assert "process_group=ckptman.THIS_PROCESS" in message and "No process group was created" in message
        assert waited <= rank0[f"seconds_to_error_{key}"] < waited + 5
    assert rank0["groups_created"] == 0
    assert rank0["fixed"] is True  # the job went on: a THIS_PROCESS manager saved in it
    assert job.same("new_group_broadcast") == "from rank 0"  # the ranks' group counters still agree

    # Constructed on every rank but called on rank 0 only: indistinguishable from a slow rank until dist_timeout.
    kind, message = error(rank0["used_on_rank_0"])
    assert kind == "PeerRankError" and "process_group=ckptman.THIS_PROCESS" in message, message
    assert 3.0 <= rank0["seconds_to_peer_error"] < 3.0 + 5
    with fresh_reader(local_backend) as reader:
        assert reader.all_steps() == [1]


def test_this_process_outside_a_distributed_job_is_a_single_process_without_sharded_saves(tmp_path: Path) -> None:
    assert repr(THIS_PROCESS) == str(THIS_PROCESS) == "ckptman.THIS_PROCESS"
    with CheckpointManager(tmp_path / "run", process_group=THIS_PROCESS) as mgr:
        assert mgr.save(1, dist_worker.replicated(1))
        assert mgr.restore(1)["step"] == 1
        with pytest.raises(ShardedOnOneRankError, match=r"save\(sharded=True\) needs every rank"):
            mgr.save(2, dist_worker.replicated(2), sharded=True)  # refused before deciding: not only when due
        with pytest.raises(ShardedOnOneRankError, match=r"restore\(sharded=True\) needs every rank"):
            mgr.restore(1, sharded=True, state={})
        assert mgr.all_steps() == [1]


class _PeerArrivesAsTheWaitTimesOut:
    """A store where rank 1 completes the count just after rank 0's wait gave up."""

    def __init__(self) -> None:
        self.store = torch.distributed.HashStore()

    def add(self, key: str, amount: int) -> int:
        return self.store.add(key, amount)

    def set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self.store.add(keys[0].rsplit("/", 1)[0], 1)
        self.store.set(keys[0], "1")
        raise RuntimeError("wait timeout")


def test_join_either_all_ranks_pass_or_the_attempt_is_withdrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed import distributed_c10d

    monkeypatch.setattr(distributed, "_joined", {})
    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed_c10d, "_get_default_store", lambda: store)
    with pytest.raises(MissingRanksError, match="rank 0: only 1 of the 3 ranks"):
        distributed.join((0, 1, 2), 0, timedelta(milliseconds=50))
    assert store.add("ckptman/join/0,1,2/0", 0) == 0 and distributed._joined == {}  # withdrawn: a retry starts afresh
    store.add("ckptman/join/0,1,2/0", 2)  # ranks 1 and 2 wait for the retry
    distributed.join((0, 1, 2), 0, timedelta(milliseconds=50))
    assert distributed._joined == {(0, 1, 2): 1}

    racing = _PeerArrivesAsTheWaitTimesOut()
    monkeypatch.setattr(distributed_c10d, "_get_default_store", lambda: racing)
    distributed.join((0, 1), 0, timedelta(milliseconds=50))  # rank 1 passed: rank 0 must not fail alone
    assert racing.add("ckptman/join/0,1/0", 0) == 2 and distributed._joined[(0, 1)] == 1


# --------------------------------------------------------------------------- #
# Sharded state through torch.distributed.checkpoint (DTensor)
# --------------------------------------------------------------------------- #


def full_weights(scale: float) -> tuple[list[list[float]], list[float]]:
    w = (torch.arange(48, dtype=torch.float32).reshape(12, 4) * scale).tolist()
    b = (torch.arange(6, dtype=torch.float32) * scale).tolist()
    return w, b


def expected_local(scale: float, rank: int, world: int) -> dict[str, Any]:
    """What rank ``rank`` holds of the Shard(0) weight and the replicated bias after a restore."""
    w, b = full_weights(scale)
    rows = torch.tensor(w).chunk(world, dim=0)[rank].tolist()
    return {"w": rows, "b": b, "scale": scale}


@pytest.fixture(scope="module", params=BACKENDS)
def sharded_jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Backend, Job, Job]:
    """A 2-rank job of DCP saves and restores, then a 3-rank job restarting from its checkpoints."""
    store = module_store(request, tmp_path_factory)
    results = tmp_path_factory.mktemp("sharded-results")
    job = run_job(results, "sharded", 2, store.url, store.storage_options)
    job3 = run_job(results, "reshard", 3, store.url, store.storage_options)
    return store, job, job3


def test_sharded_dcp_round_trip_and_restart_with_another_world_size(sharded_jobs: tuple[Backend, Job, Job]) -> None:
    store, job, job3 = sharded_jobs
    job.assert_clean()
    assert [job.same(f"saved_{s}") for s in (10, 20, 30)] == [True, True, True]
    after = job.same("after_saves")
    assert after["all_steps"] == [10, 20, 30]  # keep_last=2, plus the best by rank 0's loss (step 10)
    assert after["best_step"] == 10
    assert after["metrics"]["10"] == {"loss": 1.0}
    assert job.same("verify")["ok"] == [["step_00000010", True], ["step_00000020", True], ["step_00000030", True]]
    for r in range(2):
        assert job.rank(r)["restore_latest"]["ok"] == expected_local(3.0, r, 2)
        assert job.rank(r)["restore_10"]["ok"] == expected_local(1.0, r, 2)
    assert error(job.same("restore_plain"))[0] == "WrongCheckpointKindError"
    assert job.same("restore_plain")["fields"] == {"kind": "sharded", "use": "restore(sharded=True, state=...)"}
    assert error(job.same("restore_no_target"))[0] == "StateRequiredError"

    # One rank fails inside DCP's write: the save fails on every rank, nothing is committed
    # (what is raised and what is left behind: test_sharded_save_failing_on_one_rank_leaves_nothing).
    assert all("error" in res["failing_40"] for res in job.all())
    assert job.same("after_failure")["all_steps"] == [10, 20, 30]
    assert job.same("retry_40") == {"ok": True}
    assert job.same("after_retry")["all_steps"] == [10, 30, 40]

    manifest = stored_manifest(store, "step_00000040")
    assert sorted(e.path for e in manifest.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert manifest.kind == "sharded"
    assert stored_names(store, "step_00000040") == {".metadata", "__0_0.distcp", "__1_0.distcp", MANIFEST_NAME}

    # Restart with 3 ranks: DCP reshards the 2-rank checkpoint; the new job saves with 3 shards.
    job3.assert_clean()
    assert job3.same("resumed")["all_steps"] == [10, 30, 40]
    for r in range(3):
        assert job3.rank(r)["restore_latest"]["ok"] == expected_local(4.0, r, 3)
        assert job3.rank(r)["restore_50"]["ok"] == expected_local(5.0, r, 3)
    assert job3.same("after_save")["all_steps"] == [40, 50]  # 50 is the new best; 40 is pinned (resumed from)
    manifest = stored_manifest(store, "step_00000050")
    assert sorted(e.path for e in manifest.files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    with fresh_reader(store) as reader:
        assert reader.verify().ok
        assert reader.all_steps() == [40, 50]


def test_sharded_save_failing_on_one_rank_leaves_nothing(sharded_jobs: tuple[Backend, Job, Job]) -> None:
    _, job, _ = sharded_jobs
    assert job.same("after_failure")["all_steps"] == [10, 20, 30]
    assert job.rank(0)["debris_40"] == []  # the folder of the failed save is removed, as for every other kind
    # DCP turns one rank's failure into a CheckpointException on every rank; every rank raises rank 0's
    # SaveFailedError, which names both.
    for res in job.all():
        causes = failed_ranks(res["failing_40"])
        assert sorted(causes) == [0, 1] and all("OSError: injected: DCP write failed" in c for c in causes.values()), causes


# --------------------------------------------------------------------------- #
# Asynchronous saves
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module", params=BACKENDS)
def async_job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Backend, Job]:
    """A 2-rank job with async_save=True (and, at its end, an async sharded save into a sibling directory)."""
    store = module_store(request, tmp_path_factory)
    job = run_job(tmp_path_factory.mktemp("async-results"), "async_saves", 2, store.url, store.storage_options)
    return store, job


def test_async_saves_across_ranks(async_job: tuple[Backend, Job]) -> None:
    store, job = async_job
    job.assert_clean()
    assert job.same("saved") == {"2": True, "3": False, "4": True, "5": True, "6": True}
    after = job.same("after_saves")
    assert after["all_steps"] == [4, 5, 6] and after["best_step"] == 5  # keep_last=3 (2 rotated out)
    assert job.same("restore_5")["ok"] == {"w": [5.0] * 4, "step": 5}  # the snapshot, not the live tensor
    for r in range(2):
        assert job.rank(r)["restore_8"]["ok"] == {"rank": r, "step": 8, "w": [800.0 + r] * 3}

    # Rank 1's background upload fails: the save fails on every rank, raised once, nothing visible.
    failed = [error(res["wait_failed_9"]) for res in job.all()]
    assert failed[1][0] == "OSError"
    assert list(failed_ranks(job.rank(0)["wait_failed_9"])) == [1] and "rank 1: OSError" in failed[0][1]
    assert job.same("wait_again") == {"ok": None}
    assert 9 not in job.same("after_failure")["all_steps"]
    assert job.same("after_recovery")["all_steps"] == [5, 6, 8, 10]
    with fresh_reader(store) as reader:
        assert reader.all_steps() == [5, 6, 8, 10]
        assert reader.verify().ok
    assert "step_00000009" not in stored_names(store)


def test_async_sharded_save(async_job: tuple[Backend, Job]) -> None:
    store, job = async_job
    assert job.same("sharded_save") == {"ok": True}
    assert job.same("sharded_wait") == {"ok": None}
    assert job.same("sharded_after_save")["all_steps"] == [1]
    for r in range(2):
        assert job.rank(r)["sharded_restore"]["ok"] == expected_local(1.0, r, 2)  # the snapshot, not -7
    manifest = stored_manifest(store.with_url(f"{store.url}_sharded"), "step_00000001")
    assert sorted(e.path for e in manifest.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_async_failure_is_raised_by_the_same_call_on_every_rank(tmp_path: Path, local_backend: Any) -> None:
    job = run_job(tmp_path, "async_failure_next_call", 2, local_backend.url, deadline=45)
    assert not job.timed_out, job.describe()
    assert list(failed_ranks(job.rank(0)["save_3"])) == [1]
    assert error(job.rank(1)["save_3"])[0] == "OSError"  # not a gloo error once rank 0 has left


def test_metrics_passed_on_rank_0_only(tmp_path: Path, local_backend: Any) -> None:
    job = run_job(tmp_path, "metrics_on_rank0_only", 2, local_backend.url, deadline=30)
    assert not job.timed_out, job.describe()
    assert job.same("save_1") == {"ok": True}  # a new best by rank 0's metrics, on every rank
    assert job.same("after_save")["metrics"] == {"1": {"loss": 1.0}}


# --------------------------------------------------------------------------- #
# The lease: one writable job per directory
# --------------------------------------------------------------------------- #


def test_second_job_is_refused_on_every_rank_and_read_only_works(tmp_path: Path, store: Any) -> None:
    holder = CheckpointManager(store.url, storage_options=store.storage_options, best="loss", mode="min")
    try:
        holder.save(1, dist_worker.replicated(1), metrics={"loss": 2.0})
        with holder.save_directory(2, metrics={"loss": 1.0}, force=True) as folder:
            Path(folder, "a.bin").write_bytes(b"a")
        holder.save(3, dist_worker.replicated(3), metrics={"loss": 3.0}, force=True)
        job = run_job(tmp_path, "locked", 2, store.url, store.storage_options)
    finally:
        holder.close()
    job.assert_clean()
    refused = [error(res["writable"]) for res in job.all()]
    assert [kind for kind, _ in refused] == ["DirectoryLockedError"] * 2
    assert f"pid {os.getpid()}" in refused[1][1]  # rank 1 learns who holds the lease, from rank 0
    read_only = job.same("read_only")
    assert read_only["all_steps"] == [1, 2, 3] and read_only["best_step"] == 2
    assert job.same("restore") == {"ok": {"w": [3.0] * 4, "step": 3}}
    assert job.same("restore_directory") == {"ok": ["a.bin"]}
    assert job.same("verify") == {"ok": True}
    assert [error(job.same(k))[0] for k in ("save", "report", "delete")] == ["ReadOnlyError"] * 3
    with fresh_reader(store) as reader:
        assert reader.all_steps() == [1, 2, 3]


# --------------------------------------------------------------------------- #
# The example of docs/distributed.md
# --------------------------------------------------------------------------- #


def test_example_runs_under_torchrun_and_resumes(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "distributed_train.py"
    directory = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outputs = []
    for _ in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            str(example), "--dir", str(directory), "--steps", "20", "--save-every", "10", "--eval-every", "5",
        ]  # fmt: skip
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "checkpoints in" in outputs[0] and "none yet" in outputs[0]
    assert "resumed from step 20" in outputs[1]
    assert "every rank sees steps" in outputs[1]
    with fresh_reader(SimpleNamespace(url=str(directory), storage_options={})) as reader:
        assert reader.latest_step() == 40
        assert reader.verify().ok
