"""Runs an adapter's training child (tests/lightning_child.py, tests/transformers_child.py) until it has committed
enough checkpoints, then SIGKILLs it: the crash the adapter tests resume from.

The children print ``committed <step> <epoch>`` after each commit and ``finished`` at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_until_commits(child_script: Path, config: dict[str, Any], commits: int, tmp_path: Path) -> list[tuple[int, int]]:
    """Train in a subprocess; SIGKILL it once it reported ``commits`` commits. Returns (step, epoch) of each."""
    root = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root.parent), str(root)])}
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
