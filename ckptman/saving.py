"""The save sequence across ranks, the one place that says which step runs where.

For one checkpoint (a :class:`CheckpointRecord` decided by rank 0, see
``CheckpointManager._decide``):

1. **Rank 0** prepares the folder: it refuses a name with an unreadable
   manifest and removes the leftover of an earlier failed save of the name.
2. **Every rank** writes its own files into ``<directory>/<name>/`` (the
   checkpoint kind decides which, :mod:`ckptman.kinds`), each checksummed
   while it streams. A rank that fails still reaches step 3.
3. **Every rank** sends rank 0 its file entries, or its error.
4. **Rank 0** commits (:meth:`Bookkeeper.commit`: lease check (read while
   step 2 runs, :meth:`Bookkeeper.read_lease_ahead`), manifest
   written last in one call, then ``latest``, retention and the sidecar), or,
   when any rank failed, wrote nothing, or two ranks wrote the same file,
   removes the folder and commits nothing.
5. **Every rank** receives rank 0's catalog, or the error: a rank that failed
   raises its own error (unless it is a ``BaseException`` such as DCP's), the
   others rank 0's, e.g. a :class:`SaveFailedError` naming the failed ranks.

In a single process every step runs there and the collectives are no-ops.
With ``async_save=True`` the whole sequence runs on the background thread,
on a process group of its own.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

from ckptman import distributed
from ckptman.bookkeeping import Bookkeeper
from ckptman.errors import EmptyCheckpointError, FileNameClashError, SaveFailedError
from ckptman.manifest import FileEntry, Manifest
from ckptman.record import CheckpointRecord

WriteOwn = Callable[[str], Sequence[FileEntry]]
"""What one rank stores of a checkpoint, given the folder name: the entries of the files it wrote."""


def save_collectively(ranks: distributed.Coordinator, books: Bookkeeper, record: CheckpointRecord, write_own: WriteOwn) -> None:
    """Steps 1 to 5 above; raises on every rank when nothing was committed."""
    step, name = record.step, record.name
    distributed.on_coordinator(ranks, lambda: books.prepare_folder(step))
    if ranks.is_coordinator:
        books.read_lease_ahead()  # overlaps the uploads; the commit checks it is still recent enough
    own: tuple[FileEntry, ...] = ()
    failure: BaseException | None = None
    try:
        own = tuple(write_own(name))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every rank must reach the gather below (DCP raises BaseException)
        failure = exc
    reports = ranks.gather((own, None if failure is None else distributed.portable(failure)))

    def finish() -> None:
        with books.discard_on_error(name):
            failed = {rank: f"{error[0]}: {error[1]}" for rank, (_, error) in enumerate(reports) if error}
            if failed:
                raise SaveFailedError(step, failed)
            entries = tuple(entry for files, _ in reports for entry in files)
            if not entries:
                raise EmptyCheckpointError(
                    f"save_directory({step}) wrote no files on any rank; nothing was committed. Write the "
                    "checkpoint's files into the folder it yields"
                )
            writers: dict[str, list[int]] = {}
            for rank, (files, _) in enumerate(reports):
                for entry in files:
                    writers.setdefault(entry.path, []).append(rank)
            clashes = {path: owners for path, owners in writers.items() if len(owners) > 1}
            if clashes:
                named = ", ".join(f"{path} (ranks {', '.join(map(str, owners))})" for path, owners in sorted(clashes.items()))
                raise FileNameClashError(
                    f"ranks wrote files with the same name into step {step}: {named}; nothing was committed. "
                    "Give each rank's files names of their own (e.g. with the rank in them)"
                )
            books.commit(Manifest(step, name, record.kind, time.time(), entries, record.metrics, record.epoch))

    try:
        books.catalog.on_coordinator(ranks, finish)
    except Exception as exc:
        if isinstance(failure, Exception):
            raise failure from None  # the failing rank reports its own error
        if failure is not None:  # a BaseException (DCP's): rank 0's error, naming every failed rank, caused by it
            raise exc from failure
        raise
    books.catalog.pinned = {}  # on every rank, as rank 0 did in its commit


def fail_collectively(ranks: distributed.Coordinator, books: Bookkeeper, record: CheckpointRecord, error: Exception) -> None:
    """This rank failed before its save began: it still takes part, so every rank fails the save together."""

    def fail(name: str) -> list[FileEntry]:
        raise error

    with contextlib.suppress(Exception):  # the caller gets the original error
        save_collectively(ranks, books, record, fail)
