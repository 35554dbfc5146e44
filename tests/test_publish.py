"""``mgr.publish``: a verified state checkpoint, trimmed to some keys, as one standalone ``.pth`` outside retention.

Every behavioural test runs on all five backends (``backend`` fixture).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
from typing import Any

import fsspec
import pytest
import torch

from ckptman import (
    CheckpointManager,
    CheckpointNotFoundError,
    MissingKeysError,
    PublishTargetError,
    ReadOnlyError,
    UnsafeCheckpointError,
    WrongCheckpointKindError,
)
from ckptman import publish as publishing
from ckptman.cli import main


def state(step: int) -> dict[str, Any]:
    return {
        "model": {"w": torch.full((4, 3), float(step)), "b": torch.arange(3, dtype=torch.float64) + step},
        "optimizer": {"lr": 0.1, "momentum": torch.ones(4)},
        "meta": {"step": step},
    }


def manager(backend: Any, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(backend.url, storage_options=backend.storage_options, **kwargs)


def read_url(backend: Any, url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **backend.storage_options, skip_instance_cache=True)
    return fs.cat_file(path)


def listing(backend: Any) -> set[str]:
    """Every file below the run directory, read fresh."""
    fs, root = backend.fs(fresh=True)
    try:
        return {path[len(root.rstrip("/")) :] for path in fs.find(root)}
    except FileNotFoundError:
        return set()


def load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def assert_tensors_equal(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_tensors_equal(actual[key], expected[key])
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    else:
        assert actual == expected


def cli_options(backend: Any) -> list[str]:
    return [arg for key, value in backend.storage_options.items() for arg in ("--storage-option", f"{key}={json.dumps(value)}")]


def test_publishes_the_kept_keys_under_published_named_by_sha256(backend: Any) -> None:
    with manager(backend, best="val/loss") as mgr:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
            mgr.save(step, state(step), metrics={"val/loss": loss})
        url = mgr.publish(mgr.best_step("val/loss"), keys=["model", "meta"])
        data = read_url(backend, url)
        assert url == f"{mgr.directory}/published/step_00000020-{hashlib.sha256(data).hexdigest()[:8]}.pth"
        assert_tensors_equal(load(data), {"model": state(20)["model"], "meta": state(20)["meta"]})

        whole = mgr.publish()  # the latest, every key
        data = read_url(backend, whole)
        assert posixpath.basename(whole) == f"step_00000030-{hashlib.sha256(data).hexdigest()[:8]}.pth"
        assert_tensors_equal(load(data), state(30))
        assert mgr.publish(keys="model") != whole  # one key as a string; another file, never an overwrite
        assert mgr.publish() == whole  # the same bytes get the same name
        assert mgr.all_steps() == [10, 20, 30] and mgr.verify().ok


def test_publishes_elsewhere_with_to_also_from_a_read_only_manager(backend: Any, backend_factory: Any) -> None:
    with manager(backend) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    elsewhere = backend_factory(backend.name)
    reader = manager(backend, read_only=True)
    before = listing(backend)
    with pytest.raises(ReadOnlyError, match="pass to= a place outside"):
        reader.publish()
    assert listing(backend) == before

    target = elsewhere.join("export", "model.pth")
    url = reader.publish(1, keys=["model"], to=target)
    assert url == CheckpointManager(elsewhere.url, storage_options=elsewhere.storage_options, read_only=True).directory + "/export/model.pth"
    assert_tensors_equal(load(read_url(backend, url)), {"model": state(1)["model"]})

    into_folder = reader.publish(to=elsewhere.join("zoo") + "/")  # a folder: the default name inside it
    data = read_url(backend, into_folder)
    assert posixpath.basename(into_folder) == f"step_00000002-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    assert_tensors_equal(load(data), state(2))
    assert listing(backend) == before  # nothing written into the checkpoint directory


def test_refusals_are_typed_and_write_nothing(backend: Any) -> None:
    with manager(backend) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
            mgr.publish()
        with mgr.save_directory(1) as folder, open(f"{folder}/weights.bin", "wb") as f:
            f.write(b"x" * 10)
        mgr.save(2, state(2))
        mgr.save(3, [torch.ones(2)])
        before = listing(backend)

        with pytest.raises(WrongCheckpointKindError, match=r"directory checkpoint; use publish\(\) .*restore_directory\(1\)"):
            mgr.publish(1)
        with pytest.raises(MissingKeysError, match=r"no top-level key\(s\) \['ema', 'scheduler'\]; its keys are \['model', 'optimizer', 'meta'\]") as missing:
            mgr.publish(2, keys=["model", "ema", "scheduler"])
        assert missing.value.missing == ("ema", "scheduler") and missing.value.present == ("model", "optimizer", "meta")
        with pytest.raises(MissingKeysError, match="holds a list, not a dict.*keys=None"):
            mgr.publish(keys=["model"])
        with pytest.raises(PublishTargetError, match="not under its published/ folder"):
            mgr.publish(2, to=f"{backend.url}/step_00000002/model.pth")
        with pytest.raises(CheckpointNotFoundError, match="committed steps: \\[1, 2, 3\\]"):
            mgr.publish(7)
        assert listing(backend) == before
        assert mgr.publish(2, to=f"{backend.url}/published/v1/model.pth") == f"{mgr.directory}/published/v1/model.pth"


def test_published_files_survive_reopen_retention_ls_and_verify(
    backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with manager(backend, keep_last=1) as mgr:
        mgr.save(1, state(1))
        published = {mgr.publish(keys=["model"]), mgr.publish(to=f"{backend.url}/published/")}
    contents = {url: read_url(backend, url) for url in published}

    with manager(backend, keep_last=1) as mgr:  # a writable reopen cleans up debris: published/ is not debris
        assert mgr.all_steps() == [1] and not mgr.verify().failures
        for step in (2, 3):
            mgr.save(step, state(step))  # retention deletes step 1, the published checkpoint
        assert mgr.all_steps() == [3]
    assert {url: read_url(backend, url) for url in published} == contents

    assert main(["verify", backend.url, *cli_options(backend)]) == 0
    assert main(["ls", backend.url, *cli_options(backend)]) == 0
    out, _ = capsys.readouterr()
    assert "/published" not in out and "step_00000003" in out and "1 checkpoint," in out


def test_publish_does_not_move_the_resumed_from_pin(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    with CheckpointManager(tmp_path, keep_last=1, keep_every=1) as mgr:  # keep_every=1 keeps both around
        mgr.restore(2)
        mgr.publish(1)
        assert "resumed from" in mgr.kept_reasons()[2]
        assert "resumed from" not in mgr.kept_reasons()[1]


def test_sharded_checkpoints_are_refused_before_loading(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state(1))
        manifest = dataclasses.replace(mgr._catalog.manifest(1), kind="sharded")
        with pytest.raises(WrongCheckpointKindError, match=r"sharded checkpoint; .*restore\(sharded=True, state=\.\.\.\)"):
            publishing.load(mgr._place, manifest, weights_only=True)


@pytest.mark.parametrize(
    ("keys", "error"),
    [(["a", 1], TypeError), (3, TypeError), ([], ValueError)],
    ids=["not-a-string", "not-a-list", "empty"],
)
def test_bad_keys_fail_before_anything_is_read(tmp_path: Any, keys: Any, error: type[Exception]) -> None:
    with CheckpointManager(tmp_path) as mgr, pytest.raises(error, match=r"keys"):
        mgr.publish(keys=keys)  # nothing committed: the argument is checked first


class Opaque:
    """A pickled object that ``weights_only=True`` refuses."""


def test_unsafe_checkpoint_needs_weights_only_false(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": {"w": torch.ones(2)}, "extra": Opaque()})
        with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
            mgr.publish(keys=["model"])
        assert not (tmp_path / "published").exists()
        url = mgr.publish(keys=["model"], weights_only=False)  # the published file itself holds tensors only
        assert_tensors_equal(torch.load(url, weights_only=True), {"model": {"w": torch.ones(2)}})


def test_publish_waits_for_the_save_in_flight(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        url = mgr.publish(keys=["meta"])  # "the latest" is the save just handed to the background
        assert posixpath.basename(url).startswith("step_00000002-")
        assert torch.load(url, weights_only=True) == {"meta": {"step": 2}}
