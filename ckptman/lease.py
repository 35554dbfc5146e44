"""Single writer per directory: a lease object created with a conditional create.

A writable manager creates ``<directory>/ckptman.lock`` only if no such object
exists (``O_EXCL``-like link locally, ``If-None-Match: *`` on S3,
``ifGenerationMatch=0`` on GCS), renews it from a background thread every
third of ``timeout``, checks it is still the holder before every commit, and
deletes it on close. A second writer gets :class:`DirectoryLockedError` naming
the holder. A lease not renewed for longer than ``timeout`` (its holder was
killed) may be taken over, with a warning.

A lease is stale when it was not renewed within the longer of the holder's
and the newcomer's timeout (so a newcomer with a short timeout cannot take a
live writer's lease), or at once when its holder was a process on this same
host that no longer exists (a killed job restarts without waiting).
Staleness compares the holder's last renewal time with this machine's clock,
so writer hosts' clocks must agree to well within ``timeout``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from ckptman.errors import DirectoryLockedError, LeaseLostError, PolicyConfigError
from ckptman.retry import RetryPolicy
from ckptman.staging import pid_alive
from ckptman.storage import Storage

LEASE_NAME = "ckptman.lock"
UNREADABLE = "unreadable"
logger = logging.getLogger("ckptman")


class LeaseWarning(UserWarning):
    """A stale lease of a stopped writer was taken over."""


@dataclass(frozen=True)
class Holder:
    id: str
    host: str
    pid: int
    since: float
    renewed: float
    timeout: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(data: bytes) -> Holder | None:
        """None for an unreadable lease: treated as held by an unknown writer that never renews."""
        try:
            raw = json.loads(data)
            return Holder(
                str(raw["id"]),
                str(raw["host"]),
                int(raw["pid"]),
                float(raw["since"]),
                float(raw["renewed"]),
                float(raw.get("timeout", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        if self.id == UNREADABLE:
            return "an unreadable lease object (a corrupted lock)"
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host} pid {self.pid} since {since} (last renewed {now - self.renewed:.0f}s ago)"


class Lease:
    """The lease of one writable manager on one directory."""

    def __init__(self, storage: Storage, timeout: float) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise PolicyConfigError(f"lease_timeout must be a number of seconds > 0, got {timeout!r}")
        self._storage = storage
        self.timeout = float(timeout)
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.timeout)
        self._lost: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or take over a stale one; DirectoryLockedError when another writer holds it."""
        if self._storage.create_exclusive(LEASE_NAME, self.holder.to_bytes()):
            self._start_renewing()
            return
        current = self._read()
        now = time.time()
        if current is not None and not self._is_stale(current, now):
            raise DirectoryLockedError(
                f"{self._storage.url} is being written by another checkpoint manager: {current.describe(now)}. "
                f"Open it with read_only=True to read; a lease not renewed for lease_timeout={self.timeout:g}s "
                "can be taken over"
            )
        who = current.describe(now) if current else "a writer that already left"
        warnings.warn(
            f"taking over the stale lease of {self._storage.url} held by {who}; that writer stopped renewing it",
            LeaseWarning,
            stacklevel=6,  # the CheckpointManager(...) call: acquire < _take_lease < lambda < on_coordinator < __init__
        )
        self._storage.remove(LEASE_NAME)
        if not self._storage.create_exclusive(LEASE_NAME, self.holder.to_bytes()):
            raise DirectoryLockedError(f"another manager took over the stale lease of {self._storage.url} first")
        self._start_renewing()

    def _is_stale(self, holder: Holder, now: float) -> bool:
        """Not renewed within the longer of both timeouts, or held by a dead process on this host."""
        if holder.host == self.holder.host and holder.pid != self.holder.pid and not pid_alive(holder.pid):
            return True
        return now - holder.renewed > max(self.timeout, holder.timeout)

    def raise_if_lost(self) -> None:
        """Without I/O: raise if the renewal thread already found the lease gone."""
        if self._lost is not None:
            raise LeaseLostError(f"lost the lease on {self._storage.url}: {self._lost}") from self._lost

    def check(self) -> None:
        """Raise LeaseLostError unless this manager still holds the lease (read before every write)."""
        self.raise_if_lost()
        current = self._read()
        if current is None or current.id != self.holder.id:
            who = current.describe(time.time()) if current else "nobody"
            self._lost = LeaseLostError(f"the lease is now held by {who}")
            raise LeaseLostError(
                f"this manager no longer holds the lease on {self._storage.url} (held by {who}); "
                "another job took over the directory, so nothing more is written"
            )

    def renew(self) -> None:
        self.check()
        self.holder = replace(self.holder, renewed=time.time())
        self._storage.write_atomic(LEASE_NAME, self.holder.to_bytes())

    def release(self, wait: bool = True) -> None:
        """Stop renewing; the renewal thread deletes the lease if it is still ours.

        ``wait=False`` only signals: used from a garbage-collection finalizer,
        which may run on fsspec's event-loop thread where blocking I/O would
        deadlock.
        """
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def release_from_finalizer(self) -> None:
        self.release(wait=threading.current_thread() is threading.main_thread())

    def _read(self) -> Holder | None:
        return _read(self._storage)

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"ckptman-lease {self._storage.url}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - surfaced by check() on the next commit
                self._lost = exc
                break
        self._stop.wait()
        # Best effort, one attempt: at interpreter exit the storage may already be gone.
        storage = self._storage.with_retry(RetryPolicy(attempts=1))
        try:
            current = _read(storage)
            if current is not None and current.id == self.holder.id:
                storage.remove(LEASE_NAME)
        except Exception as exc:  # noqa: BLE001 - nobody to tell; the lease just goes stale
            logger.warning("could not release the lease on %s: %s", self._storage.url, exc)


def _read(storage: Storage) -> Holder | None:
    try:
        data = storage.read_small(LEASE_NAME)
    except FileNotFoundError:
        return None
    return Holder.from_bytes(data) or Holder(UNREADABLE, "?", 0, 0.0, 0.0)
