"""Local scratch folders (save_directory staging, restore downloads) that a killed process cannot leak for good.

Their names carry the owning pid; a writable manager removes the ones whose
process is gone when it opens.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

_PREFIX = "ckptman-scratch-"
_OWNED = re.compile(rf"{_PREFIX}(\d+)-")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def make(purpose: str) -> str:
    """A new scratch folder owned by this process."""
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-{purpose}-")


def remove_stale() -> list[str]:
    """Delete scratch folders of processes that no longer exist (killed mid-save)."""
    root = tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        owner = _OWNED.match(name)
        if owner and not pid_alive(int(owner.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed
