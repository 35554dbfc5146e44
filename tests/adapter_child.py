"""What the adapter tests share: the framework they need, and a training child SIGKILLed mid-run.

``run_until_commits`` runs an adapter's training child (tests/lightning_child.py,
tests/transformers_child.py, tests/mmengine_child.py) until it has committed
enough checkpoints, then SIGKILLs it: the crash the adapter tests resume from.
The children print ``committed <step> <epoch>`` after each commit and ``finished`` at the end.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI


def require_framework(*modules: str | tuple[str, ...], extra: str, adapter: str) -> None:
    """Import what an adapter test needs (a tuple: any one of them); skip without it, fail with CI set:
    a skipped adapter test proves nothing."""
    missing = [m for m in modules if not any(_importable(name) for name in ((m,) if isinstance(m, str) else m))]
    if not missing:
        return
    names = " and ".join(m if isinstance(m, str) else " or ".join(m) for m in missing)
    reason = f'{names} not installed (pip install -e ".[{extra}]")'
    if IN_CI:
        pytest.fail(f"{reason}: with CI set, the {adapter} adapter must be tested", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: ckptman and the tests' helper modules importable."""
    root = Path(__file__).resolve().parent
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root.parent), str(root)]), **extra}


def run_until_commits(child_script: Path, config: dict[str, Any], commits: int, tmp_path: Path) -> list[tuple[int, int]]:
    """Train in a subprocess; SIGKILL it once it reported ``commits`` commits. Returns (step, epoch) of each."""
    env = child_env()
    err = tmp_path / "child.err"
    with err.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, str(child_script), json.dumps(config)], stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        seen: list[tuple[int, int]] = []
        try:
            assert child.stdout is not None
            for line in child.stdout:
                if line.startswith("committed "):
                    _, step, epoch = line.split()
                    seen.append((int(step), int(epoch)))
                    if len(seen) == commits:
                        child.send_signal(signal.SIGKILL)
                        break
                assert not line.startswith("finished"), "the child finished before it could be killed"
        finally:
            child.kill()
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, err.read_text()[-2000:]
    return seen
