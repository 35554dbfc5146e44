"""A writer process for the lease tests: it holds a directory's lease until the parent pauses or kills it.

Run as ``python lease_child.py CONFIG_JSON``; CONFIG has ``url``,
``storage_options``, ``lease_timeout`` and ``pause`` (``"renewal"``: the
process stops itself with SIGSTOP inside a lease renewal, after reading the
lease and before replacing it: the worst moment for a writer to freeze).

Talks over stdout lines: ``ready`` once step 1 is committed; then, after the
parent writes ``go`` to stdin, it waits ``after_resume`` seconds (so its
renewal thread runs again), tries to save step 3, prints ``outcome <name>``
(the exception class, or ``saved``), closes the manager and exits 0.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import torch

from ckptman import CheckpointManager
from ckptman.lease import LEASE_NAME
from ckptman.storage import Storage


def stop_inside_renewal() -> None:
    """Make the renewal thread's next read of the lease freeze this process right after it returns."""
    read = Storage.read_versioned

    def read_then_freeze(self: Storage, rel: str):  # type: ignore[no-untyped-def]
        result = read(self, rel)
        if rel == LEASE_NAME and threading.current_thread().name.startswith("ckptman-lease") and armed.is_set():
            armed.clear()
            print("paused", flush=True)
            # raise_signal stops this very thread before it returns; os.kill(getpid()) lets it run on a little.
            signal.raise_signal(signal.SIGSTOP)
        return result

    Storage.read_versioned = read_then_freeze  # type: ignore[method-assign]


armed = threading.Event()


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("pause") == "renewal":
        stop_inside_renewal()
    mgr = CheckpointManager(config["url"], storage_options=config["storage_options"], lease_timeout=config["lease_timeout"])
    mgr.save(1, {"w": torch.ones(2)}, force=True)
    armed.set()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(2)
    time.sleep(config.get("after_resume", 0.0))
    try:
        mgr.save(3, {"w": torch.ones(2)}, force=True)
        outcome = "saved"
    except Exception as exc:  # noqa: BLE001 - the parent asserts which one
        outcome = type(exc).__name__
    print(f"outcome {outcome}", flush=True)
    mgr.close()


if __name__ == "__main__":
    main()
