"""The ``ckptman`` CLI: demo (train, resume, retention table), ls, and error reporting."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from ckptman import CheckpointManager
from ckptman.cli import build_storage_options, human_size, main, parse_storage_option


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_steps(out: str) -> list[int]:
    """The step column of the demo's final "kept" table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kept ")) + 2  # skip the header row
    end = next(i for i, line in enumerate(lines) if line.startswith("this run saved"))
    return [int(line.split()[0]) for line in lines[start:end]]


def test_demo_runs_then_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "run")
    code, out, err = run(capsys, "demo", directory, "--steps", "40")
    assert code == 0, err
    assert "new run" in out and "Traceback" not in err
    assert table_steps(out) == CheckpointManager(directory, read_only=True).all_steps()

    # 30 is off the save interval: the final step is still saved, so the next run resumes exactly there.
    code, out, err = run(capsys, "demo", directory, "--steps", "30")
    assert code == 0, err
    assert "resumed from step 40" in out
    reader = CheckpointManager(directory, read_only=True)
    assert reader.latest_step() == 70
    assert reader.restore()["step"] == 70
    assert table_steps(out) == reader.all_steps()
    assert "latest" in out and "best val/loss #1" in out
    assert "retention deleted" in out


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    assert main(["demo", split, "--steps", "25"]) == 0
    assert main(["demo", split, "--steps", "25"]) == 0
    assert main(["demo", whole, "--steps", "50"]) == 0
    capsys.readouterr()
    a = CheckpointManager(split, read_only=True).restore(50)
    b = CheckpointManager(whole, read_only=True).restore(50)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_demo_and_ls_on_memory_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://ckptman-cli-{uuid.uuid4().hex}/run"
    code, out, err = run(capsys, "demo", url, "--steps", "40")
    assert code == 0, err
    steps = CheckpointManager(url, read_only=True).all_steps()
    assert steps and table_steps(out) == steps

    code, out, err = run(capsys, "ls", url)
    assert code == 0, err
    for step in steps:
        assert f"step_{step:08d}" in out
    assert "latest" in out


def test_ls_lists_committed_steps_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path / "run")
    assert main(["demo", directory, "--steps", "60"]) == 0
    steps = CheckpointManager(directory, read_only=True).all_steps()
    capsys.readouterr()

    code, out, err = run(capsys, "ls", directory)
    assert code == 0, err
    rows = {int(line.split()[0]): line for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert sorted(rows) == steps
    assert "latest" in rows[steps[-1]]
    assert "KiB" in rows[steps[-1]] and "val/loss=" in rows[steps[-1]]

    code, out, err = run(capsys, "ls", directory, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert [c["step"] for c in document["checkpoints"]] == steps
    assert document["latest"] == steps[-1]
    best = document["best"]["val/loss"]
    by_step = {c["step"]: c for c in document["checkpoints"]}
    assert "best val/loss #1" in by_step[best[0]]["reasons"]
    # The reasons are those of the policy that wrote the directory, not of the read-only reader.
    writer = CheckpointManager(directory, **document["policy"]["config"])
    assert {step: tuple(c["reasons"]) for step, c in by_step.items()} == writer.kept_reasons()
    assert all(c["reasons"] and c["size"] > 0 and "val/loss" in c["metrics"] for c in document["checkpoints"])


@pytest.mark.parametrize("make", [True, False], ids=["empty", "missing"])
def test_ls_empty_or_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: bool) -> None:
    directory = tmp_path / "nothing"
    if make:
        directory.mkdir()
    code, out, err = run(capsys, "ls", str(directory))
    assert code == 0
    assert "no committed checkpoints" in out and err == ""
    code, out, err = run(capsys, "ls", str(directory), "--json")
    assert code == 0 and json.loads(out)["checkpoints"] == []


def test_ls_unknown_protocol_is_an_error_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ls", "nosuchproto://bucket/run")
    assert code == 2
    assert err.startswith("ckptman: error: ") and "nosuchproto" in err
    assert "Traceback" not in err and out == ""


def test_ckptman_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    code, _, err = run(capsys, "demo", str(a_file), "--steps", "1")
    assert code == 2 and err.startswith("ckptman: error: ") and "is a file" in err


def test_ls_reports_unreadable_folders_as_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    assert main(["demo", str(directory), "--steps", "20"]) == 0
    (directory / "step_00000999").mkdir()
    (directory / "step_00000999" / "ckptman-manifest.json").write_text("{")
    capsys.readouterr()
    code, out, err = run(capsys, "ls", str(directory))
    assert code == 0
    assert "ckptman: warning: ignoring checkpoint folder step_00000999" in err
    assert "step_00000999" not in out


def test_storage_options_parse_json_and_nest() -> None:
    items = [
        parse_storage_option("anon=true"),
        parse_storage_option("client_kwargs.endpoint_url=http://localhost:9000"),
        parse_storage_option("client_kwargs.region_name=eu-west-1"),
        parse_storage_option("block_size=1024"),
    ]
    assert build_storage_options(items) == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://localhost:9000", "region_name": "eu-west-1"},
        "block_size": 1024,
    }


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ls", "x", "--storage-option", "novalue")
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run(capsys, "ls", "x", "--storage-option", "a=1", "--storage-option", "a.b=2")
    assert code == 2 and err.startswith("ckptman: error: ")
    code, _, err = run(capsys, "demo", "x", "--steps", "-1")
    assert code == 2 and "--steps" in err
    assert run(capsys)[0] == 2


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 14_540, 5 * 2**30)] == ["0 B", "1023 B", "1.0 KiB", "14.2 KiB", "5.0 GiB"]


def test_python_dash_m_subprocess(tmp_path: Path) -> None:
    directory = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "ckptman", "demo", directory, "--steps", "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert table_steps(result.stdout) == CheckpointManager(directory, read_only=True).all_steps()
