"""Hostile and mistaken input, tabled: each gets a specific error or a documented recovery, and no committed checkpoint is lost."""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import REMOTE_BACKENDS

from ckptman import (
    BucketNotFoundError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    EmptyCheckpointError,
    InvalidMetricError,
    InvalidStepError,
    NotADirectoryStorageError,
    ReservedNameError,
    StateRequiredError,
    StepExistsError,
    UnreadableFolderError,
    UnsupportedProtocolError,
    WrongCheckpointKindError,
)
from ckptman.manifest import MANIFEST_NAME


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((8,), float(step))}


@pytest.fixture
def run(backend: Any) -> Any:
    """A directory with steps 1 and 2 committed, and a writable manager on it (closed after the test)."""
    mgr = CheckpointManager(backend.url, storage_options=backend.storage_options, best="loss")
    mgr.save(1, state(1), metrics={"loss": 0.5})
    mgr.save(2, state(2), metrics={"loss": 0.7})
    yield backend, mgr
    mgr.close()


def save_files(mgr: CheckpointManager, step: int, names: list[str]) -> None:
    """A forced save_directory() whose block writes ``names`` (each a few bytes)."""
    with mgr.save_directory(step, force=True) as folder:
        for name in names:
            with open(f"{folder}/{name}", "wb") as f:
                f.write(name.encode())


def assert_nothing_lost(backend: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # each test asserts its own warnings
        reader = CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True, best="loss")
    assert reader.all_steps()[:2] == [1, 2]
    assert torch.equal(reader.restore(1)["w"], state(1)["w"]) and torch.equal(reader.restore(2)["w"], state(2)["w"])
    assert reader.best_step() == 1


RAISES: list[tuple[str, Callable[[CheckpointManager], Any], type[Exception], str]] = [
    ("string metric", lambda m: m.save(3, state(3), metrics={"loss": "0.1"}), InvalidMetricError, "'loss' must be a real number"),
    ("tensor metric with many values", lambda m: m.save(3, state(3), metrics={"loss": torch.ones(3)}), InvalidMetricError, "3 elements"),
    ("bool metric", lambda m: m.save(3, state(3), metrics={"loss": True}), InvalidMetricError, "bool"),
    ("metric name not a string", lambda m: m.save(3, state(3), metrics={1: 0.5}), InvalidMetricError, "non-empty strings"),
    ("bool step", lambda m: m.save(True, state(3)), InvalidStepError, "bool"),
    ("float step", lambda m: m.save(3.0, state(3)), InvalidStepError, "float"),
    ("negative step", lambda m: m.save(-3, state(3)), InvalidStepError, "-3"),
    ("step beyond int64", lambda m: m.save(2**63, state(3)), InvalidStepError, "2**63"),
    ("step regression", lambda m: m.save(0, state(0)), InvalidStepError, "older than the latest committed step 2"),
    ("duplicate step", lambda m: m.save(2, state(2), force=True), StepExistsError, "step 2 is already committed"),
    ("report for a missing step", lambda m: m.report(7, {"loss": 0.1}), Exception, "no committed checkpoint for step 7"),
    ("report with no metrics", lambda m: m.report(2, {}), InvalidMetricError, "at least one metric"),
    ("restore of a missing step", lambda m: m.restore(9), Exception, "committed steps: [1, 2]"),
    ("bool epoch", lambda m: m.save(3, state(3), epoch=True), InvalidStepError, "epoch must be"),
    ("float epoch", lambda m: m.save(3, state(3), epoch=1.0), InvalidStepError, "epoch must be"),
    ("negative epoch", lambda m: m.save(3, state(3), epoch=-1), InvalidStepError, "epoch must be"),
    ("string epoch to should_save", lambda m: m.should_save(3, epoch="1"), InvalidStepError, "epoch must be"),
    ("save_directory writing the manifest's name", lambda m: save_files(m, 3, ["a.bin", MANIFEST_NAME]), ReservedNameError, "a name ckptman reserves; rename it"),
    ("save_directory writing no file", lambda m: save_files(m, 3, []), EmptyCheckpointError, "wrote no files on any rank"),
    ("sharded restore without state=", lambda m: m.restore(1, sharded=True), StateRequiredError, "pass state=<the state dict to fill>"),
    ("sharded restore of a state checkpoint", lambda m: m.restore(1, sharded=True, state={}), WrongCheckpointKindError, "use restore() without sharded=True"),
]


@pytest.mark.parametrize("case", RAISES, ids=[c[0] for c in RAISES])
def test_bad_calls_raise_specific_errors(run: Any, case: Any) -> None:
    backend, mgr = run
    _, call, error, message = case
    with pytest.raises(error) as raised:
        call(mgr)
    assert message in str(raised.value)
    assert mgr.all_steps() == [1, 2]
    assert_nothing_lost(backend)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_metrics_are_recorded_but_never_best(run: Any, value: float) -> None:
    backend, mgr = run
    assert mgr.save(3, state(3), metrics={"loss": value}, force=True)
    assert mgr.best_step() == 1
    recorded = mgr.metrics(3)["loss"]
    assert (math.isnan(recorded) and math.isnan(value)) or recorded == value
    assert_nothing_lost(backend)


def test_zero_dim_tensor_and_numpy_metrics_are_unwrapped(run: Any) -> None:
    backend, mgr = run
    assert mgr.save(3, state(3), metrics={"loss": torch.tensor(0.25), "acc": np.float64(0.9)})
    assert mgr.metrics(3) == {"loss": 0.25, "acc": 0.9} and mgr.best_step() == 3


def test_huge_but_valid_step(run: Any) -> None:
    backend, mgr = run
    assert mgr.save(2**62, state(9), force=True)
    assert mgr.latest_step() == 2**62
    assert CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True).latest_step() == 2**62


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"format": "ckptman/state", "version": 1, "checkpoints": "x"}', b"\x00" * 20])
def test_corrupt_or_truncated_sidecar_is_rebuilt(run: Any, content: bytes) -> None:
    backend, mgr = run
    mgr.close()
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/ckptman.json", content)
    with pytest.warns(CheckpointWarning, match="ckptman.json"):
        reopened = CheckpointManager(backend.url, storage_options=backend.storage_options, best="loss")
    with reopened:
        assert reopened.all_steps() == [1, 2] and reopened.best_step() == 1
    fs.invalidate_cache()
    assert [c["step"] for c in json.loads(fs.cat_file(f"{root}/ckptman.json"))["checkpoints"]] == [1, 2]
    assert_nothing_lost(backend)


@pytest.mark.parametrize("path", ["../step_00000001/state.pt", "/etc/passwd", "s3://other-bucket/state.pt"])
def test_manifest_with_path_traversal_is_ignored_not_followed_not_deleted(run: Any, path: str) -> None:
    backend, mgr = run
    mgr.close()
    fs, root = backend.fs()
    bad = {
        "format": "ckptman/manifest",
        "version": 1,
        "step": 3,
        "name": "step_00000003",
        "kind": "state",
        "created": 1.0,
        "metrics": {},
        "files": [{"path": path, "size": 1, "checksum": "xxh3_128:00"}],
    }
    fs.makedirs(f"{root}/step_00000003", exist_ok=True)
    fs.pipe_file(f"{root}/step_00000003/{MANIFEST_NAME}", json.dumps(bad).encode())
    with pytest.warns(CheckpointWarning, match="step_00000003.*not a plain relative path"):
        reopened = CheckpointManager(backend.url, storage_options=backend.storage_options, best="loss")
    with reopened:
        assert reopened.all_steps() == [1, 2]
        report = reopened.verify()
        assert not report.ok and report.failures[0].name == "step_00000003"
        with pytest.raises(UnreadableFolderError, match="unreadable manifest.*delete it by hand"):
            reopened.save(3, state(3))
    fs.invalidate_cache()
    assert fs.exists(f"{root}/step_00000003/{MANIFEST_NAME}"), "an unreadable manifest is reported, never deleted"
    assert_nothing_lost(backend)


def test_restore_of_a_directory_checkpoint_names_the_call_to_use(run: Any) -> None:
    backend, mgr = run
    save_files(mgr, 3, ["model.bin"])
    with pytest.raises(WrongCheckpointKindError, match=r"step_00000003 is a directory checkpoint; use restore_directory\(3\)") as raised:
        mgr.restore(3)
    assert (raised.value.kind, raised.value.use) == ("directory", "restore_directory(3)")
    with pytest.raises(WrongCheckpointKindError, match="use restore_directory"):
        mgr.restore()  # the latest is never skipped for being of another kind
    assert mgr.all_steps() == [1, 2, 3]
    assert_nothing_lost(backend)


def test_checkpoint_folder_deleted_behind_the_managers_back(run: Any, caplog: Any) -> None:
    backend, mgr = run
    mgr.save(3, state(3), metrics={"loss": 0.9})
    fs, root = backend.fs()
    fs.rm(f"{root}/step_00000003", recursive=True)
    fs.invalidate_cache()
    with pytest.raises(CheckpointNotFoundError, match="deleted since this manager listed"):
        mgr.restore(3)
    with pytest.warns(CheckpointWarning, match="restored step_00000002 instead"):
        assert torch.equal(mgr.restore()["w"], state(2)["w"])
    with caplog.at_level(logging.WARNING, logger="ckptman"):
        mgr.refresh()
    assert mgr.all_steps() == [1, 2]
    assert "out of date" in caplog.text
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/latest") == b"step_00000002"
    assert mgr.save(4, state(4))
    assert_nothing_lost(backend)


@pytest.mark.parametrize("backend", REMOTE_BACKENDS, indirect=True)
def test_missing_bucket(backend: Any) -> None:
    with pytest.raises(BucketNotFoundError, match="ckptman never creates buckets"):
        CheckpointManager(backend.missing_bucket_url(), storage_options=backend.storage_options)


def test_unknown_protocol_and_directory_that_is_a_file(tmp_path: Any) -> None:
    with pytest.raises(UnsupportedProtocolError, match="unknown storage protocol 'ftpx'"):
        CheckpointManager("ftpx://host/run")
    (tmp_path / "f").write_bytes(b"keep me")
    with pytest.raises(NotADirectoryStorageError):
        CheckpointManager(str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == b"keep me"
