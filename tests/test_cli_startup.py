"""Startup without torch, the lazy exports of ``ckptman``, and Ctrl-C at any point of a command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import COMMAND

import ckptman
from ckptman import CheckpointManager

NO_TORCH = """
import json, sys
import ckptman.cli
codes = [ckptman.cli.main(argv) for argv in {argvs!r}]
print(json.dumps({{"codes": codes, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
"""


def test_reading_commands_do_not_import_torch(tmp_path: Path) -> None:
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, best="val/loss") as mgr:
        mgr.save(1, {"w": torch.ones(2)}, metrics={"val/loss": 1.0})
    argvs = [["ls", directory], ["ls", directory, "--json"], ["info", directory, "1"], ["best", directory], ["verify", directory]]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(argvs=argvs)], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["codes"] == [0] * len(argvs), done.stderr
    assert found["torch"] == [], "ls/info/best/verify imported torch"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["ls", "--help"]])
def test_help_and_version_do_not_import_ckptman_storage(argv: list[str]) -> None:
    code = f"import sys, ckptman.cli; ckptman.cli.main({argv!r}); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fsspec')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_import_ckptman_is_lazy() -> None:
    code = "import sys, ckptman; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fsspec')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_every_documented_return_type_is_exported() -> None:
    from ckptman.record import CheckpointRecord
    from ckptman.verify import CheckResult, VerifyReport

    assert (ckptman.VerifyReport, ckptman.CheckResult, ckptman.CheckpointRecord) == (VerifyReport, CheckResult, CheckpointRecord)
    for name in ckptman.__all__:
        assert getattr(ckptman, name) is not None, name
    assert set(ckptman.__all__) <= set(dir(ckptman))
    with pytest.raises(AttributeError, match="no attribute 'CheckpointManagr'"):
        ckptman.CheckpointManagr  # noqa: B018 - a typo is an error, never a silent None


def _interrupt_demo(directory: Path, *, after: str, stream: str) -> subprocess.CompletedProcess[str]:
    """Start ``ckptman demo`` (importtime on, so stderr shows how far startup got), SIGINT it once ``after`` shows."""
    command = [sys.executable, "-X", "importtime", "-m", "ckptman"] if stream == "stderr" else COMMAND
    child = subprocess.Popen(
        [*command, "demo", str(directory), "--steps", "100000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pipe = child.stderr if stream == "stderr" else child.stdout
    assert pipe is not None
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = pipe.readline()
        seen.append(line)
        if after in line or not line:
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, "".join(seen) + out, err)


def test_ctrl_c_while_training_names_the_committed_step(tmp_path: Path) -> None:
    done = _interrupt_demo(tmp_path / "run", after="saved (", stream="stdout")
    assert done.returncode == 130
    last = CheckpointManager(str(tmp_path / "run"), read_only=True).latest_step()
    assert last is not None
    assert done.stderr == (
        f"ckptman: interrupted; step {last} is committed in {tmp_path / 'run'}: run the same command again to resume from it\n"
    )


def test_ctrl_c_while_importing_is_one_line(tmp_path: Path) -> None:
    """Interrupted inside main(), while torch loads: no traceback, exit 130."""
    done = _interrupt_demo(tmp_path / "run", after="torch", stream="stderr")
    assert done.returncode == 130
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == [f"ckptman: interrupted; nothing is committed in {tmp_path / 'run'} yet, so a rerun starts from the beginning"]
