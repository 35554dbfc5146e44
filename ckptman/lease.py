"""Single writer per directory: a lease object created with a conditional create.

A writable manager creates ``<directory>/ckptman.lock`` only if no such object
exists (``O_EXCL``-like link locally, ``If-None-Match: *`` on S3,
``ifGenerationMatch=0`` on GCS), renews it from a background thread every
third of ``timeout``, checks it is still the holder before every commit, and
deletes it on close. A second writer gets :class:`DirectoryLockedError` naming
the holder. A lease not renewed for longer than ``timeout`` (its holder was
killed) may be taken over, with a warning.

Takeover, renewal and release are compare-and-swap on the exact lease object
read (:meth:`Storage.replace_if`: S3 ``If-Match``, GCS ``ifGenerationMatch``,
a guarded replace on local disk): of managers racing to take over one stale
lease exactly one wins, and a writer resumed from a long pause cannot
overwrite the lease of the writer that took over from it.

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
from typing import NoReturn

from ckptman.errors import DirectoryLockedError, LeaseLostError, PolicyConfigError
from ckptman.retry import RetryPolicy
from ckptman.staging import pid_alive
from ckptman.conditional import Versioned
from ckptman.storage import Storage

LEASE_NAME = "ckptman.lock"
# A takeover that finds the lease released meanwhile creates it again; this bounds how often.
_ACQUIRE_ROUNDS = 3
# A version token no object has: an S3 ETag is a quoted hash, a GCS generation a microsecond timestamp.
_NO_SUCH_VERSION = "1"
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
        """Take the lease, or take over a stale one; DirectoryLockedError when another writer holds it.

        A takeover replaces exactly the lease object that was judged stale
        (compare-and-swap): of several managers taking over at once, one wins
        and the others find its fresh lease and are refused.
        """
        mine = self.holder.to_bytes()
        for _ in range(_ACQUIRE_ROUNDS):
            if self._storage.create_exclusive(LEASE_NAME, mine):
                break
            try:
                current = self._storage.read_versioned(LEASE_NAME)
            except FileNotFoundError:
                continue  # released between the create and the read: create again
            holder = _holder(current)
            if holder.id == self.holder.id:
                break  # a retried create whose first attempt landed
            now = time.time()
            if not self._is_stale(holder, now):
                raise DirectoryLockedError(
                    f"{self._storage.url} is being written by another checkpoint manager: {holder.describe(now)}. "
                    f"Open it with read_only=True to read; a lease not renewed for lease_timeout={self.timeout:g}s "
                    "can be taken over"
                )
            warnings.warn(
                f"taking over the stale lease of {self._storage.url} held by {holder.describe(now)}; "
                "that writer stopped renewing it",
                LeaseWarning,
                stacklevel=6,  # the CheckpointManager(...) call: acquire < _take_lease < lambda < on_coordinator < __init__
            )
            if self._storage.replace_if(LEASE_NAME, mine, current) or self._holds():
                break
            raise DirectoryLockedError(f"another manager took over the stale lease of {self._storage.url} first")
        else:
            raise DirectoryLockedError(
                f"the lease of {self._storage.url} kept changing while this manager tried to take it; "
                "another writer is opening the directory: retry, or open it with read_only=True"
            )
        self._check_conditions_hold(mine)
        self._start_renewing()

    def _holds(self) -> bool:
        """Whether the lease on storage is this manager's (after a conditional write answered 'changed')."""
        try:
            return _holder(self._storage.read_versioned(LEASE_NAME)).id == self.holder.id
        except FileNotFoundError:
            return False

    def _check_conditions_hold(self, mine: bytes) -> None:
        """Say so when this backend's lease cannot be compare-and-swap (once per open, in the log).

        A store that silently ignores ``If-Match`` / ``ifGenerationMatch`` is
        found by one conditional write that must fail: it names a version no
        object has. If the store accepts it, it rewrote our own lease with the
        same bytes, which changes nothing.
        """
        kind = self._storage.compare_and_swap
        if kind == "server" and self._storage.replace_if(LEASE_NAME, mine, Versioned(mine, _NO_SUCH_VERSION)):
            kind = "none"
        if kind == "none":
            logger.warning(
                "%s: this storage does not make a replace conditional on the version read, so a lease takeover "
                "and renewal are a read followed by a write; two managers taking over one stale lease at the same "
                "moment could both proceed (see docs/guarantees.md)",
                self._storage.url,
            )

    def _is_stale(self, holder: Holder, now: float) -> bool:
        """Not renewed within the longer of both timeouts, or held by a dead process on this host."""
        if holder.host == self.holder.host and holder.pid != self.holder.pid and not pid_alive(holder.pid):
            return True
        return now - holder.renewed > max(self.timeout, holder.timeout)

    def raise_if_lost(self) -> None:
        """Without I/O: raise if the renewal thread already found the lease gone."""
        if self._lost is not None:
            raise LeaseLostError(f"lost the lease on {self._storage.url}: {self._lost}") from self._lost

    def check(self) -> float:
        """Raise LeaseLostError unless this manager still holds the lease (read before every write).

        Returns the time (``time.time()``) until which this read proves the
        lease ours: no one may take over a lease before ``renewed + timeout``
        (see :meth:`_is_stale`), and half of that margin is kept for clock
        skew and the write that follows.
        """
        return _holder(self._current()).renewed + self.timeout / 2

    def _current(self) -> Versioned:
        """The lease object on storage, which must be this manager's; else the lease is lost."""
        self.raise_if_lost()
        try:
            current: Versioned | None = self._storage.read_versioned(LEASE_NAME)
        except FileNotFoundError:
            current = None
        holder = _holder(current) if current is not None else None
        if current is None or holder is None or holder.id != self.holder.id:
            self._lose(f"held by {holder.describe(time.time()) if holder else 'nobody'}")
        return current

    def _lose(self, why: str) -> NoReturn:
        self._lost = LeaseLostError(f"the lease is now {why}")
        raise LeaseLostError(
            f"this manager no longer holds the lease on {self._storage.url} ({why}); "
            "another job took over the directory, so nothing more is written"
        )

    def renew(self) -> None:
        """Move the renewal time forward, conditional on the lease object being the one just read as ours.

        A writer resumed after a long pause (SIGSTOP, a frozen VM) whose lease
        was taken over meanwhile fails the condition instead of overwriting
        its successor's lease.
        """
        current = self._current()
        renewed = replace(self.holder, renewed=time.time())
        # A failed condition with our id still stored means a retried replace whose first attempt landed.
        if not self._storage.replace_if(LEASE_NAME, renewed.to_bytes(), current) and not self._holds():
            self._lose("taken over by another writer while this one renewed it")
        self.holder = renewed

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
            current = storage.read_versioned(LEASE_NAME)
            if _holder(current).id == self.holder.id:
                storage.remove_if(LEASE_NAME, current)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - nobody to tell; the lease just goes stale
            logger.warning("could not release the lease on %s: %s", self._storage.url, exc)


def _holder(lease: Versioned) -> Holder:
    """An unreadable lease counts as held by an unknown writer that never renews."""
    return Holder.from_bytes(lease.data) or Holder(UNREADABLE, "?", 0, 0.0, 0.0)
