"""Behavioural suite for CheckpointManager, run against local disk, memory://, S3 (moto and SeaweedFS) and GCS (fake-gcs-server)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import torch
from conftest import REMOTE_BACKENDS

from ckptman import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    InvalidMetricError,
    InvalidStepError,
    ReadOnlyError,
    StepExistsError,
)
from ckptman.manifest import MANIFEST_NAME
from ckptman.transfer import checksum_of


_opened: list[CheckpointManager] = []


@pytest.fixture(autouse=True)
def _close_managers() -> Any:
    """Release every manager's lease while the test's storage server is still up."""
    yield
    while _opened:
        _opened.pop().close()


def manager(backend: Any, **kwargs: Any) -> CheckpointManager:
    mgr = CheckpointManager(backend.url, storage_options=backend.storage_options, **kwargs)
    _opened.append(mgr)
    return mgr


def state(step: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)
    return {"weight": torch.randn(16, 8, generator=generator), "bias": torch.arange(step, step + 4), "step": step}


def listing(backend: Any) -> set[str]:
    """Top-level names in the directory, read fresh from storage."""
    fs, root = backend.fs()
    fs.invalidate_cache()
    if not fs.exists(root):
        return set()
    return {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}


def read(backend: Any, rel: str) -> bytes:
    fs, root = backend.fs()
    fs.invalidate_cache()
    return fs.cat_file(f"{root}/{rel}")


def write(backend: Any, rel: str, data: bytes) -> None:
    fs, root = backend.fs()
    if backend.name == "local":
        os.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
    fs.pipe_file(f"{root}/{rel}", data)
    fs.invalidate_cache()


def assert_same_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value)
        else:
            assert actual[key] == value


class TestSaveRestore:
    def test_round_trip_of_real_tensors(self, backend: Any) -> None:
        mgr = manager(backend)
        assert mgr.latest_step() is None and mgr.all_steps() == []
        assert mgr.save(10, state(10)) is True
        assert mgr.save(20, state(20)) is True
        assert mgr.all_steps() == [10, 20] and mgr.latest_step() == 20
        assert_same_state(mgr.restore(), state(20))
        assert_same_state(mgr.restore(10), state(10))

    def test_interval_decides_and_force_overrides(self, backend: Any) -> None:
        mgr = manager(backend, save_interval_steps=5, save_begin=10)
        assert [s for s in range(0, 21) if mgr.should_save(s)] == [10, 15, 20]
        assert mgr.save(7, state(7)) is False
        assert mgr.save(10, state(10)) is True
        assert mgr.save(12, state(12)) is False
        assert mgr.save(13, state(13), force=True) is True
        assert mgr.all_steps() == [10, 13]

    def test_commit_writes_manifest_latest_and_sidecar(self, backend: Any) -> None:
        mgr = manager(backend, best="val/loss")
        mgr.save(3, state(3), metrics={"val/loss": 0.5})
        assert listing(backend) == {"step_00000003", "latest", "ckptman.json", "ckptman.lock"}
        mgr.close()
        assert listing(backend) == {"step_00000003", "latest", "ckptman.json"}, "close() releases the lease"
        assert read(backend, "latest").decode() == "step_00000003"
        manifest = json.loads(read(backend, f"step_00000003/{MANIFEST_NAME}"))
        payload = read(backend, "step_00000003/state.pt")
        assert manifest["step"] == 3 and manifest["metrics"] == {"val/loss": 0.5}
        assert manifest["files"] == [{"path": "state.pt", "size": len(payload), "checksum": checksum_of(payload)}]
        assert manifest["created"] > 0
        sidecar = json.loads(read(backend, "ckptman.json"))
        assert sidecar["latest"] == "step_00000003"
        assert sidecar["best"] == {"val/loss": {"mode": "min", "steps": [3]}}
        assert [c["step"] for c in sidecar["checkpoints"]] == [3]

    def test_metric_names_never_appear_in_paths(self, backend: Any) -> None:
        mgr = manager(backend, best="val/loss")
        mgr.save(1, state(1), metrics={"val/loss": 1.0})
        fs, root = backend.fs()
        fs.invalidate_cache()
        assert not any("val" in path[len(root) :] for path in fs.find(root))


class TestCommitProtocol:
    def test_folder_without_manifest_does_not_exist_and_is_cleaned_up(self, backend: Any) -> None:
        with manager(backend, keep_last=1) as mgr:
            mgr.save(10, state(10))
        write(backend, "step_00000020/state.pt", b"half written")
        write(backend, "tensorboard/events.out", b"user data")

        reader = manager(backend, read_only=True)
        assert reader.all_steps() == [10] and reader.latest_step() == 10
        assert "step_00000020" in listing(backend), "a read-only manager must not delete anything"

        writer = manager(backend, keep_last=1)
        assert writer.all_steps() == [10]
        assert listing(backend) == {"step_00000010", "tensorboard", "latest", "ckptman.json", "ckptman.lock"}
        assert_same_state(writer.restore(), state(10))

    def test_a_save_that_fails_leaves_nothing_and_deletes_nothing(self, backend: Any) -> None:
        class Unpicklable:
            def __reduce__(self) -> Any:
                raise RuntimeError("cannot serialise this")

        mgr = manager(backend, keep_last=1)
        mgr.save(1, state(1))
        with pytest.raises(RuntimeError, match="cannot serialise"):
            mgr.save(2, {"weight": torch.ones(3), "bad": Unpicklable()})
        assert mgr.all_steps() == [1]
        assert listing(backend) == {"step_00000001", "latest", "ckptman.json", "ckptman.lock"}
        assert manager(backend, read_only=True).all_steps() == [1]

    def test_interrupted_delete_leaves_no_complete_looking_folder(self, backend: Any, monkeypatch: Any) -> None:
        mgr = manager(backend, keep_last=1)
        mgr.save(1, state(1))
        fs = mgr._storage.fs  # the manager's own filesystem (on S3 opened with a larger connection pool)
        original = fs.rm

        def rm_fails_on_trees(path: Any, recursive: bool = False, **kwargs: Any) -> Any:
            if recursive and "step_00000001" in str(path):
                raise OSError("simulated crash while deleting the payload")
            return original(path, recursive=recursive, **kwargs)

        monkeypatch.setattr(fs, "rm", rm_fails_on_trees)
        with pytest.warns(CheckpointWarning, match="step_00000002 is committed.*simulated crash"):
            assert mgr.save(2, state(2)) is True
        monkeypatch.undo()
        mgr.close()
        # Step 1's manifest went first; its payload is still there but it no longer counts.
        assert "step_00000001" in listing(backend)
        fresh = manager(backend, keep_last=1)
        assert fresh.all_steps() == [2]
        assert "step_00000001" not in listing(backend)

    def test_corrupted_payload_is_detected_on_restore(self, backend: Any) -> None:
        mgr = manager(backend)
        mgr.save(5, state(5))
        payload = bytearray(read(backend, "step_00000005/state.pt"))
        payload[len(payload) // 2] ^= 0xFF
        write(backend, "step_00000005/state.pt", bytes(payload))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            manager(backend, read_only=True).restore(5)
        write(backend, "step_00000005/state.pt", bytes(payload[:-10]))
        with pytest.raises(CorruptCheckpointError, match="size mismatch"):
            manager(backend, read_only=True).restore(5)


class TestRetention:
    def test_keeps_union_of_last_every_best_and_latest(self, backend: Any) -> None:
        mgr = manager(backend, keep_last=2, keep_every=40, best="val/loss", keep_best=2)
        losses = {10: 0.9, 20: 0.2, 30: 0.8, 40: 0.7, 50: 0.3, 60: 0.6, 70: 0.5}
        for step, loss in losses.items():
            mgr.save(step, state(step), metrics={"val/loss": loss})
        assert mgr.kept_reasons() == {
            20: ("best val/loss #1",),
            40: ("every 40",),
            50: ("best val/loss #2",),
            60: ("last 2",),
            70: ("latest", "last 2"),
        }
        assert mgr.all_steps() == [20, 40, 50, 60, 70]
        assert {n for n in listing(backend) if n.startswith("step_")} == {f"step_{s:08d}" for s in [20, 40, 50, 60, 70]}

    def test_metrics_reported_after_the_save_protect_the_best(self, backend: Any) -> None:
        mgr = manager(backend, keep_last=1, best="acc")
        mgr.save(1, state(1))
        mgr.report(1, {"acc": 0.9})
        mgr.save(2, state(2))
        mgr.report(2, {"acc": 0.5})
        mgr.save(3, state(3))
        assert mgr.all_steps() == [1, 3] and mgr.best_step("acc") == 1
        mgr.report(3, {"acc": 0.95})
        assert mgr.all_steps() == [3] and mgr.best_step() == 3
        assert mgr.metrics(3) == {"acc": 0.95}

    def test_nan_and_inf_never_become_best_and_ties_keep_the_earlier_step(self, backend: Any) -> None:
        mgr = manager(backend, best="loss", keep_last=1)
        mgr.save(1, state(1), metrics={"loss": 0.5})
        assert mgr.save(2, state(2), metrics={"loss": math.nan}) is True  # every call saves (no interval)
        mgr.save(3, state(3), metrics={"loss": -math.inf})
        mgr.save(4, state(4), metrics={"loss": 0.5})
        mgr.save(5, state(5))
        assert mgr.best_step() == 1
        assert mgr.all_steps() == [1, 5]
        assert math.isnan(manager(backend, best="loss", read_only=True).state_dict()["checkpoints"][0]["metrics"]["loss"]) is False

    def test_new_best_is_saved_off_interval(self, backend: Any) -> None:
        mgr = manager(backend, save_interval_steps=100, best="val/acc", keep_last=1)
        assert mgr.save(50, state(50), metrics={"val/acc": 0.5}) is True
        assert mgr.save(60, state(60), metrics={"val/acc": 0.4}) is False
        assert mgr.save(70, state(70), metrics={"val/acc": 0.6}) is True
        assert mgr.save(100, state(100), metrics={"val/acc": 0.1}) is True
        assert mgr.all_steps() == [70, 100]

    def test_several_metrics_each_keep_their_best(self, backend: Any) -> None:
        mgr = manager(backend, best=["acc", "loss"], keep_last=1)
        mgr.save(1, state(1), metrics={"acc": 0.9, "loss": 0.9})
        mgr.save(2, state(2), metrics={"acc": 0.1, "loss": 0.1})
        mgr.save(3, state(3), metrics={"acc": 0.5, "loss": 0.5}, force=True)
        mgr.save(4, state(4), force=True)
        assert mgr.all_steps() == [1, 2, 4]
        assert (mgr.best_step("acc"), mgr.best_step("loss")) == (1, 2)

    def test_explicit_delete_moves_latest(self, backend: Any) -> None:
        mgr = manager(backend)
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        mgr.delete(2)
        assert mgr.all_steps() == [1]
        assert read(backend, "latest").decode() == "step_00000001"
        mgr.delete(1)
        assert "latest" not in listing(backend)
        with pytest.raises(CheckpointNotFoundError):
            mgr.delete(1)

    def test_the_checkpoint_resumed_from_is_not_rotated_away(self, backend: Any) -> None:
        mgr = manager(backend, keep_last=1, best="acc")
        mgr.save(1, state(1), metrics={"acc": 0.9})
        mgr.save(2, state(2), metrics={"acc": 0.1}, force=True)
        mgr.save(3, state(3), metrics={"acc": 0.2}, force=True)
        assert mgr.all_steps() == [1, 3]
        mgr.restore(1)
        mgr.report(3, {"acc": 0.95})  # would make step 1 deletable
        assert mgr.all_steps() == [1, 3]
        mgr.save(4, state(4), force=True)
        assert mgr.all_steps() == [3, 4]


class TestRestart:
    def test_continues_exactly_where_it_was(self, backend: Any) -> None:
        settings: dict[str, Any] = dict(save_interval_steps=10, keep_last=2, best="val/loss", keep_every=50)
        schedule = {s: abs(math.sin(s)) for s in range(5, 101, 5)}

        first = manager(backend, **settings)
        for step in [s for s in schedule if s <= 55]:
            first.save(step, state(step), metrics={"val/loss": schedule[step]})
        reported = first.latest_step()
        assert reported is not None
        first.report(reported, {"val/loss": 0.0001, "extra": 1.0})
        before = (first.all_steps(), first.best_step(), first.state_dict())
        first.close()

        second = manager(backend, **settings)
        assert (second.all_steps(), second.best_step(), second.state_dict()) == before
        assert second.metrics(reported) == {"val/loss": 0.0001, "extra": 1.0}
        for step in [s for s in schedule if s > 55]:
            second.save(step, state(step), metrics={"val/loss": schedule[step]})

        # A manager that never stopped, fed the same events, ends in the same place.
        from types import SimpleNamespace

        import uuid

        twin = SimpleNamespace(url=f"memory://ckptman-twin-{uuid.uuid4().hex}/run", storage_options={})
        uninterrupted = manager(twin, **settings)
        for step, loss in schedule.items():
            uninterrupted.save(step, state(step), metrics={"val/loss": loss})
            if step == 55:
                uninterrupted.report(reported, {"val/loss": 0.0001, "extra": 1.0})
        assert second.all_steps() == uninterrupted.all_steps()
        assert second.best_step() == uninterrupted.best_step() == reported
        assert second.kept_reasons() == uninterrupted.kept_reasons()

    @pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "stale"])
    def test_sidecar_is_rebuilt_from_manifests_and_nothing_is_deleted(self, backend: Any, damage: str) -> None:
        mgr = manager(backend, keep_last=2, best="loss")
        mgr.save(1, state(1), metrics={"loss": 0.1})
        old_sidecar = read(backend, "ckptman.json")
        mgr.save(2, state(2), metrics={"loss": 0.5})
        mgr.save(3, state(3), metrics={"loss": 0.3})
        expected = mgr.state_dict()
        mgr.close()
        fs, root = backend.fs()
        if damage == "missing":
            fs.rm(f"{root}/ckptman.json")
        elif damage == "stale":
            write(backend, "ckptman.json", old_sidecar)
        else:
            sidecar = read(backend, "ckptman.json")
            write(backend, "ckptman.json", b"\x00not json" if damage == "garbage" else sidecar[: len(sidecar) // 2])
        fs.invalidate_cache()

        if damage == "stale":
            reopened = manager(backend, keep_last=2, best="loss")
        else:
            with pytest.warns(CheckpointWarning, match="ckptman.json"):
                reopened = manager(backend, keep_last=2, best="loss")
        assert reopened.state_dict() == expected
        assert reopened.all_steps() == [1, 2, 3]
        assert json.loads(read(backend, "ckptman.json")) == expected

    def test_state_dict_is_json_and_load_state_dict_adopts_lost_metrics(self, backend: Any) -> None:
        mgr = manager(backend, best="acc")
        mgr.save(1, state(1), metrics={"acc": 0.5})
        mgr.save(2, state(2))
        saved = json.loads(json.dumps(mgr.state_dict()))
        saved["checkpoints"][1]["metrics"] = {"acc": 0.7}
        saved["checkpoints"].append({"step": 9, "name": "step_00000009", "created": 0, "size": 1, "metrics": {}})
        saved["checkpoints"][0]["metrics"] = {"acc": 0.1}  # storage already knows step 1's acc: storage wins
        with pytest.warns(CheckpointWarning, match="step_00000009"):
            mgr.load_state_dict(saved)
        assert mgr.metrics(1) == {"acc": 0.5} and mgr.metrics(2) == {"acc": 0.7}
        assert mgr.best_step() == 2
        assert manager(backend, best="acc", read_only=True).metrics(2) == {"acc": 0.7}


class TestDirectoryCheckpoints:
    def test_many_files_round_trip(self, backend: Any, tmp_path: Any) -> None:
        mgr = manager(backend, keep_last=1)
        files = {
            "mp_rank_00_model_states.pt": None,
            "zero_pp_rank_0_mp_rank_00_optim_states.pt": None,
            "zero/shard_1.bin": os.urandom(1000),
            "zero/deeper/shard_2.bin": b"",
        }
        with mgr.save_directory(100, metrics={"loss": 1.0}) as folder:
            assert folder is not None
            torch.save(state(100), os.path.join(folder, "mp_rank_00_model_states.pt"))
            torch.save({"optim": torch.ones(5)}, os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
            os.makedirs(os.path.join(folder, "zero", "deeper"))
            for rel in ("zero/shard_1.bin", "zero/deeper/shard_2.bin"):
                with open(os.path.join(folder, rel), "wb") as f:
                    f.write(files[rel])  # type: ignore[arg-type]
        assert mgr.all_steps() == [100] and mgr.metrics(100) == {"loss": 1.0}
        assert read(backend, "latest").decode() == "step_00000100"

        restored = manager(backend, read_only=True).restore_directory(local_dir=tmp_path / "restored")
        found = sorted(
            os.path.relpath(os.path.join(d, f), restored).replace(os.sep, "/") for d, _, fs in os.walk(restored) for f in fs
        )
        assert found == sorted(files)
        assert_same_state(torch.load(os.path.join(restored, "mp_rank_00_model_states.pt")), state(100))
        with open(os.path.join(restored, "zero", "shard_1.bin"), "rb") as f:
            assert f.read() == files["zero/shard_1.bin"]
        default = manager(backend, read_only=True).restore_directory()
        assert os.path.isfile(os.path.join(default, "zero", "deeper", "shard_2.bin"))

    def test_exception_in_block_commits_nothing(self, backend: Any) -> None:
        mgr = manager(backend)
        mgr.save(1, state(1))
        with pytest.raises(ValueError, match="boom"):
            with mgr.save_directory(2) as folder:
                with open(os.path.join(folder, "shard.bin"), "wb") as f:  # type: ignore[arg-type]
                    f.write(b"partial")
                raise ValueError("boom")
        assert mgr.all_steps() == [1]
        assert not any(name.startswith("step_00000002") for name in listing(backend))
        assert not os.path.exists(folder)  # type: ignore[arg-type]

    def test_not_due_yields_none_and_empty_block_is_an_error(self, backend: Any) -> None:
        mgr = manager(backend, save_interval_steps=10)
        with mgr.save_directory(5) as folder:
            assert folder is None
        with pytest.raises(CheckpointError, match="wrote no files"):
            with mgr.save_directory(10):
                pass
        assert mgr.all_steps() == []

    def test_restore_of_directory_checkpoint_points_to_restore_directory(self, backend: Any) -> None:
        mgr = manager(backend)
        with mgr.save_directory(1) as folder:
            open(os.path.join(folder, "a.bin"), "wb").close()  # type: ignore[arg-type]
        with pytest.raises(CheckpointError, match="restore_directory"):
            mgr.restore()


class TestBadInput:
    @pytest.mark.parametrize("step", [-1, 1.0, "3", True, None, 2**63])
    def test_bad_steps(self, backend: Any, step: Any) -> None:
        mgr = manager(backend)
        with pytest.raises(InvalidStepError):
            mgr.save(step, state(1))
        assert mgr.all_steps() == []

    def test_step_must_move_forward(self, backend: Any) -> None:
        mgr = manager(backend)
        mgr.save(10, state(10))
        with pytest.raises(StepExistsError, match="step 10 is already committed"):
            mgr.save(10, state(10))
        with pytest.raises(InvalidStepError, match="older than the latest committed step 10"):
            mgr.save(5, state(5))
        assert_same_state(mgr.restore(), state(10))

    def test_non_numeric_metric(self, backend: Any) -> None:
        mgr = manager(backend, best="loss")
        with pytest.raises(InvalidMetricError, match="'loss'"):
            mgr.save(1, state(1), metrics={"loss": "low"})
        mgr.save(1, state(1), metrics={"loss": 1.0})
        with pytest.raises(InvalidMetricError):
            mgr.report(1, {"loss": [0.5]})
        assert mgr.metrics(1) == {"loss": 1.0}

    def test_report_for_a_step_without_checkpoint(self, backend: Any) -> None:
        mgr = manager(backend)
        with pytest.raises(CheckpointNotFoundError, match="step 3"):
            mgr.report(3, {"loss": 1.0})
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore()
        with pytest.raises(CheckpointNotFoundError):
            mgr.metrics(3)

    def test_read_only_manager_refuses_writes(self, backend: Any) -> None:
        manager(backend).save(1, state(1))
        reader = manager(backend, read_only=True)
        for call in (
            lambda: reader.save(2, state(2)),
            lambda: reader.report(1, {"loss": 1.0}),
            lambda: reader.delete(1),
        ):
            with pytest.raises(ReadOnlyError, match="read_only=True"):
                call()
        with pytest.raises(ReadOnlyError):
            with reader.save_directory(3):
                pass
        assert_same_state(reader.restore(), state(1))

    def test_closed_manager_refuses_calls(self, backend: Any) -> None:
        with manager(backend) as mgr:
            mgr.save(1, state(1))
        with pytest.raises(CheckpointError, match="closed"):
            mgr.save(2, state(2))


def test_unknown_protocol_is_a_clear_error() -> None:
    from ckptman import UnsupportedProtocolError

    with pytest.raises(UnsupportedProtocolError, match="unknown storage protocol 'nosuchfs'"):
        CheckpointManager("nosuchfs://bucket/run")


def test_directory_that_is_a_file(tmp_path: Any) -> None:
    from ckptman import NotADirectoryStorageError

    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryStorageError, match="is a file"):
        CheckpointManager(str(target))
    assert target.read_text() == "not a directory"


def test_local_writes_are_fsynced_before_the_manifest_commits(tmp_path: Any, monkeypatch: Any) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename:" + os.path.basename(dst))
        real_replace(src, dst)

    mgr = CheckpointManager(str(tmp_path / "run"))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    mgr.save(1, state(1))
    commit_at = events.index(f"rename:{MANIFEST_NAME}")
    before = events[:commit_at]
    assert "fsync:state.pt" in before, events
    assert "fsync:step_00000001" in before, "the checkpoint folder's entries must be durable before commit"
    assert "fsync:run" in before, "the run directory's entry for the folder must be durable before commit"
    assert events.index("rename:latest") > commit_at, "latest moves only after the commit"
    assert events[commit_at + 1] == "fsync:step_00000001", "the manifest rename itself is made durable"


@pytest.mark.parametrize("backend", REMOTE_BACKENDS, indirect=True)
def test_missing_bucket_is_never_created(backend: Any) -> None:
    from ckptman import BucketNotFoundError

    url = backend.missing_bucket_url()
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        CheckpointManager(url, storage_options=backend.storage_options)
    with pytest.raises(BucketNotFoundError):
        CheckpointManager(url, storage_options=backend.storage_options, read_only=True)
    fs, _ = backend.fs()
    fs.invalidate_cache()
    assert not fs.exists(url.split("://", 1)[1].split("/", 1)[0])


def test_unreachable_endpoint_is_not_reported_as_a_missing_bucket() -> None:
    import socket

    from ckptman import BucketNotFoundError, StorageError

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "config_kwargs": {"retries": {"max_attempts": 1}}, "retries": 1}
    with pytest.raises(StorageError, match="could not reach") as raised:
        CheckpointManager("s3://ckptman-test/run", storage_options=options)
    assert not isinstance(raised.value, BucketNotFoundError)
    assert "'s'" not in str(raised.value) and "secret" not in str(raised.value)


def test_reader_with_an_old_listing_gets_not_found_for_a_rotated_checkpoint(backend: Any) -> None:
    writer = manager(backend, keep_last=1)
    writer.save(1, state(1))
    reader = manager(backend, read_only=True)
    writer.save(2, state(2))  # rotates step 1 out
    with pytest.raises(CheckpointNotFoundError, match="deleted since this manager listed"):
        reader.restore(1)
    reader.refresh()
    assert reader.all_steps() == [2]


def test_bookkeeping_failure_after_commit_warns_and_reports_the_commit(local_backend: Any, monkeypatch: Any) -> None:
    mgr = manager(local_backend, keep_last=1)
    mgr.save(1, state(1))
    from ckptman.storage import Storage

    original = Storage.write_atomic

    def sidecar_fails(self: Storage, rel: str, data: bytes) -> None:
        if rel == "ckptman.json":
            raise OSError("disk full while writing the sidecar")
        original(self, rel, data)

    monkeypatch.setattr(Storage, "write_atomic", sidecar_fails)
    with pytest.warns(CheckpointWarning, match="step_00000002 is committed.*disk full"):
        assert mgr.save(2, state(2)) is True
    monkeypatch.undo()
    assert mgr.all_steps() == [2]
    mgr.close()
    reopened = manager(local_backend, keep_last=1)
    assert reopened.all_steps() == [2]
    assert json.loads(read(local_backend, "ckptman.json"))["latest"] == "step_00000002"


def test_temporary_files_of_an_interrupted_local_write_are_cleaned(local_backend: Any) -> None:
    with manager(local_backend) as mgr:
        mgr.save(1, state(1))
    for rel in (".ckptman-tmp-abc-ckptman.json", "step_00000001/.ckptman-tmp-def-ckptman-manifest.json"):
        write(local_backend, rel, b"partial")
    manager(local_backend)
    leftovers = [p for p in os.listdir(local_backend.url) + os.listdir(f"{local_backend.url}/step_00000001") if "tmp" in p]
    assert leftovers == []


def test_sharded_save_and_restore_in_one_process(backend: Any) -> None:
    mgr = manager(backend, keep_last=1)
    source = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}
    assert mgr.save(1, source, sharded=True)
    record = mgr.record(1)
    assert record.kind == "sharded"
    files = {entry.path for entry in mgr._catalog.manifest(1).files}
    assert ".metadata" in files and any(path.endswith(".distcp") for path in files)
    assert mgr.verify().ok
    target = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
    assert mgr.restore(sharded=True, state=target) is target
    assert torch.equal(target["w"], source["w"]) and torch.equal(target["b"], source["b"])
    with pytest.raises(TypeError, match="state="):
        mgr.restore(sharded=True)
    with pytest.raises(CheckpointError, match=r"sharded checkpoint; use restore\(sharded=True"):
        mgr.restore(1)  # a sharded checkpoint has no state.pt
