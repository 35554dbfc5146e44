"""The ``ckptman`` command through the installed console script, on local disk and moto S3.

Every command runs as a subprocess of the real ``ckptman`` script (the
venv's ``bin/ckptman``), its ``--json`` output parsed here, so what is
tested is what a user runs. Directories are written with the library in this
process; the CLI only reads, deletes, cleans up, restores and publishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptman import CheckpointManager
from ckptman.manifest import MANIFEST_NAME

BIN = shutil.which("ckptman", path=str(Path(sys.executable).parent))
COMMAND = [BIN] if BIN else [sys.executable, "-m", "ckptman"]
POLICY: dict[str, Any] = {"keep_last": 2, "best": "val/loss", "keep_best": 1}
LOSSES = {10: 0.5, 20: 0.2, 30: 0.4, 40: 0.3}  # step 20 is best; keep_last=2 keeps 30, 40


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code in (0, 1), self.err
        return json.loads(self.out)


def ckptman(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> Result:
    """Run the console script; stderr must never hold a traceback."""
    done = subprocess.run([*COMMAND, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def storage_flags(backend: Any) -> list[str]:
    """The CLI flags for a test backend: moto through the --endpoint-url shortcut, credentials from the environment."""
    endpoint = backend.storage_options.get("client_kwargs", {}).get("endpoint_url")
    return ["--endpoint-url", endpoint] if endpoint else []


def write_run(backend: Any) -> None:
    with CheckpointManager(backend.url, storage_options=backend.storage_options, **POLICY) as mgr:
        for step, loss in LOSSES.items():
            mgr.save(step, {"model": {"w": torch.full((4,), float(step))}, "step": step}, metrics={"val/loss": loss}, epoch=step // 10)


both = pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)


@both
def test_ls_json_has_plain_policy_and_kept_by(backend: Any) -> None:
    write_run(backend)
    listed = ckptman("ls", backend.url, "--json", *storage_flags(backend)).json()
    assert [c["step"] for c in listed["checkpoints"]] == [20, 30, 40] and listed["latest"] == 40
    by_step = {c["step"]: c for c in listed["checkpoints"]}
    assert by_step[20]["reasons"] == ["best val/loss #1"]
    assert by_step[40]["reasons"] == ["latest", "last 2"]
    assert by_step[30]["metrics"] == {"val/loss": 0.4} and by_step[30]["epoch"] == 3
    assert all(c["size"] > 0 and c["kind"] == "state" and 0 <= c["age_seconds"] < 600 for c in listed["checkpoints"])
    policy = listed["policy"]
    assert {"keep_best": {"metric": "val/loss", "mode": "min", "k": 1}} in policy["retention"]
    assert {"keep_last": {"n": 2}} in policy["retention"]
    assert policy["save"] == [{"every_call": {}}]
    assert "(" not in json.dumps(policy), "a repr leaked into the JSON"
    assert listed["best"] == {"val/loss": [20]}
    if backend.name != "local":
        return  # the text output is the same code on every backend
    text = ckptman("ls", backend.url)
    assert text.code == 0, text.err
    rows = {line.split()[0]: line for line in text.out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert sorted(rows) == ["20", "30", "40"] and "latest, last 2" in rows["40"] and "val/loss=0.2000" in rows["20"]
    assert "keep_best(metric=val/loss, mode=min, k=1)" in text.out


@both
def test_info_shows_manifest_files_and_checksums(backend: Any) -> None:
    write_run(backend)
    info = ckptman("info", backend.url, "30", "--json", *storage_flags(backend)).json()
    fs, root = backend.fs(fresh=True)
    manifest = json.loads(fs.cat_file(f"{root}/step_00000030/{MANIFEST_NAME}"))
    assert info["files"] == manifest["files"] and info["step"] == 30 and info["name"] == "step_00000030"
    assert info["files"][0]["checksum"].startswith("xxh3_128:") and info["reasons"] == ["last 2"]
    assert info["url"].endswith("/step_00000030")
    if backend.name != "local":
        return
    text = ckptman("info", backend.url, "30")
    assert manifest["files"][0]["checksum"] in text.out and "state.pt" in text.out
    missing = ckptman("info", backend.url, "31")
    assert missing.code == 2 and "no committed checkpoint for step 31" in missing.err and "[20, 30, 40]" in missing.err


@both
def test_best_by_tracked_metric(backend: Any) -> None:
    write_run(backend)
    best = ckptman("best", backend.url, "--json", *storage_flags(backend)).json()
    assert (best["metric"], best["mode"], best["value"], best["checkpoint"]["step"]) == ("val/loss", "min", 0.2, 20)
    if backend.name != "local":
        return
    text = ckptman("best", backend.url, "val/loss")
    assert text.code == 0 and text.out.startswith("step 20 (step_00000020): val/loss=0.2000")
    untracked = ckptman("best", backend.url, "val/acc")
    assert untracked.code == 2 and "'val/acc' is not tracked" in untracked.err


@both
def test_verify_exits_1_on_a_corrupted_checkpoint(backend: Any) -> None:
    write_run(backend)
    report = ckptman("verify", backend.url, "--json", *storage_flags(backend)).json()
    assert report["ok"] and report["checked"] == 3 and [c["step"] for c in report["checkpoints"]] == [20, 30, 40]
    fs, root = backend.fs(fresh=True)
    fs.pipe_file(f"{root}/step_00000030/state.pt", b"not what was saved")
    failed = ckptman("verify", backend.url, "--json", *storage_flags(backend))
    assert failed.code == 1
    document = json.loads(failed.out)
    assert not document["ok"] and document["failed"] == 1
    assert [c["step"] for c in document["checkpoints"] if not c["ok"]] == [30]
    one = ckptman("verify", backend.url, "40", *storage_flags(backend))  # the positional STEP
    assert one.code == 0 and "1 of 1 checkpoints verified" in one.out


@both
def test_rm_refuses_the_latest_unless_forced(backend: Any) -> None:
    write_run(backend)
    refused = ckptman("rm", backend.url, "30", "40", *storage_flags(backend))
    assert refused.code == 2 and "step 40 is the latest checkpoint" in refused.err and "--force" in refused.err
    with CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True) as reader:
        assert reader.all_steps() == [20, 30, 40], "nothing may be deleted when one step is refused"

    deleted = ckptman("rm", backend.url, "30", "--json", *storage_flags(backend)).json()
    assert (deleted["deleted"], deleted["steps"], deleted["latest"]) == ([30], [20, 40], 40)
    forced = ckptman("rm", backend.url, "40", "--force", "--json", *storage_flags(backend)).json()
    assert forced["steps"] == [20] and forced["latest"] == 20
    with CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True) as reader:
        assert reader.all_steps() == [20]
        # The sidecar keeps the writer's policy, not the CLI's: best is still tracked.
        assert reader.stored_state()["policy"]["config"]["best"] == ["val/loss"]  # type: ignore[index]


def test_rm_takes_the_lease(local_backend: Any) -> None:
    write_run(local_backend)
    with CheckpointManager(local_backend.url, **POLICY):  # a running job holds the directory
        held = ckptman("rm", local_backend.url, "20")
    assert held.code == 2 and "is being written by another checkpoint manager" in held.err
    assert CheckpointManager(local_backend.url, read_only=True).all_steps() == [20, 30, 40]


def test_rm_after_a_killed_writer_warns_in_one_line(local_backend: Any) -> None:
    """A lease left by a dead process is taken over; its LeaseWarning is one ``ckptman: warning:`` line."""
    write_run(local_backend)
    leave_lease = f"import os; from ckptman import CheckpointManager; m = CheckpointManager({local_backend.url!r}); os._exit(0)"
    subprocess.run([sys.executable, "-c", leave_lease], check=True, timeout=60)
    result = ckptman("rm", local_backend.url, "20")
    assert result.code == 0, result.err
    assert result.err.startswith("ckptman: warning: taking over the stale lease") and result.err.count("\n") == 1


@both
def test_gc_is_a_dry_run_unless_yes(backend: Any) -> None:
    write_run(backend)
    fs, root = backend.fs(fresh=True)
    fs.makedirs(f"{root}/step_00000050", exist_ok=True)  # local disk; a no-op on S3
    fs.pipe_file(f"{root}/step_00000050/state.pt", b"an interrupted save")
    dry = ckptman("gc", backend.url, "--json", *storage_flags(backend)).json()
    assert dry["dry_run"] and dry["incomplete"] == ["step_00000050"] and dry["removed"] == []
    assert backend.fs(fresh=True)[0].exists(f"{root}/step_00000050/state.pt")
    if backend.name == "local":
        text = ckptman("gc", backend.url)
        assert "step_00000050: would remove" in text.out and "--yes" in text.out

    done = ckptman("gc", backend.url, "--yes", "--json", *storage_flags(backend)).json()
    assert not done["dry_run"] and done["removed"] == ["step_00000050"]
    assert not backend.fs(fresh=True)[0].exists(f"{root}/step_00000050/state.pt")
    if backend.name == "local":
        again = ckptman("gc", backend.url)
        assert again.code == 0 and "nothing to clean up" in again.out
    with CheckpointManager(backend.url, storage_options=backend.storage_options, read_only=True) as reader:
        assert reader.all_steps() == [20, 30, 40]


@both
def test_restore_any_kind_verified(backend: Any, tmp_path: Path) -> None:
    write_run(backend)
    mgr = CheckpointManager(backend.url, storage_options=backend.storage_options, **POLICY)
    with mgr, mgr.save_directory(50, force=True) as folder:
        assert folder is not None
        Path(folder, "shards").mkdir()
        Path(folder, "shards", "rank0.bin").write_bytes(b"\x00" * 1000)
        Path(folder, "config.json").write_text("{}")
    target = tmp_path / "out"
    restored = ckptman("restore", backend.url, "50", "--to", str(target), "--json", *storage_flags(backend)).json()
    assert restored["kind"] == "directory" and restored["to"] == str(target)
    assert sorted(f["path"] for f in restored["files"]) == ["config.json", "shards/rank0.bin"]
    assert (target / "shards" / "rank0.bin").read_bytes() == b"\x00" * 1000
    if backend.name != "local":
        return
    state_dir = tmp_path / "state"
    text = ckptman("restore", backend.url, "40", "--to", str(state_dir))
    assert text.code == 0 and "verified" in text.out
    assert torch.load(state_dir / "state.pt", weights_only=True)["step"] == 40
    again = ckptman("restore", backend.url, "40", "--to", str(state_dir))
    assert again.code == 2 and "not an empty directory" in again.err

    with CheckpointManager(backend.url, **POLICY) as mgr:
        mgr.save(60, {"w": torch.arange(4.0)}, sharded=True, force=True)
    sharded = ckptman("restore", backend.url, "60", "--to", str(tmp_path / "dcp"), "--json").json()
    assert sharded["kind"] == "sharded" and ".metadata" in [f["path"] for f in sharded["files"]]
    assert all((tmp_path / "dcp" / f["path"]).stat().st_size == f["size"] for f in sharded["files"])


@both
def test_publish_keys_through_mgr_publish(backend: Any, tmp_path: Path) -> None:
    write_run(backend)
    inside = ckptman("publish", backend.url, "20", "--keys", "model", "--json", *storage_flags(backend)).json()
    assert inside["url"].startswith(f"{inside['directory']}/published/step_00000020-") and inside["keys"] == ["model"]
    fs, _ = backend.fs(fresh=True)
    published = tmp_path / "inside.pth"
    published.write_bytes(fs.cat_file(fs._strip_protocol(inside["url"])))
    assert list(torch.load(published, weights_only=True)) == ["model"]
    if backend.name != "local":
        return
    target = tmp_path / "weights.pth"
    outside = ckptman("publish", backend.url, "40", "--to", str(target))
    assert outside.code == 0 and str(target) in outside.out
    assert set(torch.load(target, weights_only=True)) == {"model", "step"}
    wrong = ckptman("publish", backend.url, "40", "--keys", "optimizer")
    assert wrong.code == 2 and "no top-level key(s) ['optimizer']" in wrong.err


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["info", "1"], ["best"], ["gc"], ["rm", "1"]])
def test_a_missing_path_is_an_error(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "runz"
    result = ckptman(command[0], str(missing), *command[1:])
    assert result.code == 2 and result.out == ""
    assert result.err.startswith(f"ckptman: error: {missing} does not exist; check the path")
    assert not missing.exists(), "a command must not create the directory it was pointed at"


def test_a_missing_s3_prefix_is_an_error(s3_backend: Any) -> None:
    result = ckptman("verify", s3_backend.url, *storage_flags(s3_backend))
    assert result.code == 2 and f"{s3_backend.url} does not exist" in result.err


def test_a_checkpoint_folder_is_not_a_run_directory(local_backend: Any) -> None:
    write_run(local_backend)
    result = ckptman("ls", f"{local_backend.url}/step_00000030")
    assert result.code == 2
    assert "is a checkpoint folder, not a run directory" in result.err and result.err.rstrip().endswith(local_backend.url)


def test_an_empty_directory_lists_nothing(tmp_path: Path) -> None:
    listed = ckptman("ls", str(tmp_path), "--json").json()
    assert listed["checkpoints"] == [] and listed["latest"] is None
    assert "no committed checkpoints" in ckptman("ls", str(tmp_path)).out


def test_unreadable_folders_are_warnings(local_backend: Any) -> None:
    write_run(local_backend)
    Path(local_backend.url, "step_00000999").mkdir()
    Path(local_backend.url, "step_00000999", MANIFEST_NAME).write_text("{")
    result = ckptman("ls", local_backend.url)
    assert result.code == 0 and "step_00000999" not in result.out
    assert result.err.startswith("ckptman: warning: ignoring checkpoint folder step_00000999")
    assert all(line.startswith("ckptman: warning: ") for line in result.err.splitlines())


def test_demo_json_through_the_console_script(tmp_path: Path) -> None:
    directory = str(tmp_path / "run")
    result = ckptman("demo", directory, "--steps", "30", "--json")
    first = result.json()
    assert first["resumed_from"] is None and first["last_step"] == 30 and "new run" in result.err
    assert [row["step"] for row in first["kept"]] == CheckpointManager(directory, read_only=True).all_steps()


def test_version_and_help() -> None:
    for flag in ("--version", "-V"):
        result = ckptman(flag)
        assert result.code == 0 and result.out.strip() == "ckptman 0.1.0"
    helped = ckptman("--help")
    for name in ("ls", "info", "verify", "best", "rm", "gc", "restore", "publish", "demo"):
        assert f"    {name} " in helped.out, name
    assert "AWS_ENDPOINT_URL" in helped.out and "STORAGE_EMULATOR_HOST" in helped.out and "130" in helped.out
    assert ckptman().code == 2


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    result = ckptman("ls", str(tmp_path), "--storage-option", "novalue")
    assert result.code == 2 and "KEY=VALUE" in result.err
    result = ckptman("ls", str(tmp_path), "--storage-option", "a=1", "--storage-option", "a.b=2")
    assert result.code == 2 and "set both as a value and as a group" in result.err
    result = ckptman("demo", str(tmp_path), "--steps", "-1")
    assert result.code == 2 and "--steps" in result.err
    result = ckptman("ls", str(tmp_path), "--endpoint-url", "http://127.0.0.1:9")
    assert result.code == 2 and "apply to s3:// and gs:// URLs" in result.err


def test_a_file_is_not_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    result = ckptman("ls", str(a_file))
    assert result.code == 2 and "is a file" in result.err


def test_unknown_protocol(tmp_path: Path) -> None:
    result = ckptman("ls", "nosuchproto://bucket/run")
    assert result.code == 2 and result.err.startswith("ckptman: error: unknown storage protocol 'nosuchproto'")


def test_every_warning_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """ckptman's warnings, other libraries' and the ckptman logger's all read ``ckptman: warning: ...``."""
    import logging
    import warnings

    from ckptman import CheckpointWarning, LeaseWarning
    from ckptman.cli.output import reporting

    with reporting():
        warnings.warn("a repair", CheckpointWarning, stacklevel=1)
        warnings.warn("a takeover", LeaseWarning, stacklevel=1)
        warnings.warn("old API", FutureWarning, stacklevel=1)
        logging.getLogger("ckptman").warning("rebuilt %s", "the sidecar")
    assert capsys.readouterr().err.splitlines() == [
        "ckptman: warning: a repair",
        "ckptman: warning: a takeover",
        "ckptman: warning: FutureWarning: old API",
        "ckptman: warning: rebuilt the sidecar",
    ]


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from ckptman.cli import main

    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    for directory, steps in ((split, "25"), (split, "25"), (whole, "50")):
        with open(os.devnull, "w") as sink, _stdout_to(sink):
            assert main(["demo", directory, "--steps", steps]) == 0
    a = CheckpointManager(split, read_only=True).restore(50)
    b = CheckpointManager(whole, read_only=True).restore(50)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def _stdout_to(sink: Any) -> Any:
    import contextlib

    return contextlib.redirect_stdout(sink)
