"""Who does what across ranks: a small coordinator over torch.distributed, and a one-process stand-in.

Every rank constructs the same manager and calls the same methods in the
same order. Ranks write their own payload files; rank 0 alone makes
decisions, holds the lease, writes manifests, ``latest`` and the sidecar,
and deletes. Everything else is told to the other ranks through these few
collectives, on a process group of ckptman's own (gloo), so that saves
running on a background thread never interleave with the training loop's
collectives on the default group.

A peer that dies makes gloo fail the collective at once (its connection
closes); one that stops answering makes it fail after the group's timeout
(``dist_timeout``). Either is raised as :class:`~ckptman.errors.PeerRankError`.

Before creating its groups, a manager checks through the default group's
store, with a short timeout, that every rank of the group constructs it:
``new_group`` is a collective, and a manager built on one rank alone (a
framework hook on rank 0) would otherwise wait in it for torch's 30 minutes.
``process_group=THIS_PROCESS`` builds a manager for this process alone,
with no group and no collective.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import enum
import numbers
import pickle
import sys
from typing import Any, Callable, Iterator, Protocol, TypeVar

from ckptman.errors import (
    CheckpointError,
    MissingRanksError,
    PeerRankError,
    PolicyConfigError,
    ShardedOnOneRankError,
)

T = TypeVar("T")

COORDINATOR = 0
# How long the ranks of a new manager wait for each other to construct it when dist_timeout is None:
# long enough for ranks that construct it after the same setup, short against torch's 30 minutes.
JOIN_TIMEOUT = datetime.timedelta(seconds=60)
ONE_RANK_HINT = (
    "where only this process calls the manager (e.g. a framework hook that runs on rank 0 only), "
    "pass process_group=ckptman.THIS_PROCESS"
)
# What the collectives of this thread are part of, for the message of a PeerRankError.
_OPERATION: contextvars.ContextVar[str] = contextvars.ContextVar("ckptman_operation", default="a ckptman call")


def check_timeout(value: object) -> datetime.timedelta | None:
    """``dist_timeout`` as torch wants it; None keeps torch's default (30 minutes for gloo)."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise PolicyConfigError(
            f"dist_timeout must be a number of seconds or a datetime.timedelta (e.g. 600 or timedelta(minutes=10)), "
            f"got {value!r} ({type(value).__name__}); None keeps torch's default"
        )
    # gloo counts whole milliseconds: less would become 0, which fails creating the group at once.
    if not 0.001 <= seconds < float("inf"):
        raise PolicyConfigError(
            f"dist_timeout must be a finite duration of at least 1 millisecond (e.g. 600 seconds), got {value!r}; "
            "None keeps torch's default"
        )
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def during(operation: str) -> Iterator[None]:
    """Name what the collectives inside are part of (e.g. "the save of step 3"), for a PeerRankError."""
    token = _OPERATION.set(operation)
    try:
        yield
    finally:
        _OPERATION.reset(token)


class Coordinator(Protocol):
    rank: int
    world_size: int

    @property
    def is_coordinator(self) -> bool: ...

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        ...

    def gather(self, value: T) -> list[T]:
        """On rank 0 every rank's ``value`` in rank order; on others an empty list."""
        ...

    def all_gather(self, value: T) -> list[T]: ...


class SingleProcess:
    """The coordinator of a run without torch.distributed: every collective is the identity."""

    rank = 0
    world_size = 1
    is_coordinator = True

    def broadcast(self, value: T) -> T:
        return value

    def gather(self, value: T) -> list[T]:
        return [value]

    def all_gather(self, value: T) -> list[T]:
        return [value]


class _ThisProcess(enum.Enum):
    """The type of :data:`THIS_PROCESS` (an enum: its one value pickles and compares as itself)."""

    THIS_PROCESS = "THIS_PROCESS"

    def __repr__(self) -> str:
        return "ckptman.THIS_PROCESS"

    __str__ = __repr__


THIS_PROCESS = _ThisProcess.THIS_PROCESS
"""``process_group=THIS_PROCESS``: a manager acting for this process alone, even inside an initialised job."""


class ThisProcessOnly(SingleProcess):
    """The coordinator of ``process_group=THIS_PROCESS``: this process is its own rank 0; nothing is collective."""


def require_every_rank(ranks: Coordinator, call: str) -> None:
    """DCP's save and load are collective over the whole job: a one-process manager cannot take part alone."""
    if isinstance(ranks, ThisProcessOnly):
        raise ShardedOnOneRankError(
            f"{call} needs every rank of the job (torch.distributed.checkpoint writes and reads each rank's "
            "shards collectively), but this manager was built with process_group=ckptman.THIS_PROCESS and acts "
            "for this process alone. Construct the manager on every rank (process_group=None) for sharded "
            "checkpoints, or save a full state dict from this rank with save(step, state)"
        )


# Successful joins per group (its global ranks), in the order every rank constructs its managers.
_joined: dict[tuple[int, ...], int] = {}


def join(ranks: tuple[int, ...], rank: int, timeout: datetime.timedelta) -> None:
    """Wait until every rank of the group constructs this manager, or raise MissingRanksError.

    A counter in the default group's store, not a collective: no group is
    created and nothing is left waiting. A rank that gives up withdraws its
    count, unless every rank arrived meanwhile (then it joins too), so all
    ranks either pass together or fail, and a later attempt starts afresh.
    """
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    key = f"ckptman/join/{','.join(map(str, ranks))}/{_joined.get(ranks, 0)}"
    arrived = store.add(key, 1)
    if arrived == len(ranks):
        store.set(f"{key}/all", "1")
    else:
        try:
            store.wait([f"{key}/all"], timeout)
        except RuntimeError as exc:  # DistStoreError: the wait timed out
            arrived = store.add(key, -1) + 1
            if arrived != len(ranks):
                raise _missing(rank, len(ranks), arrived, timeout) from exc
            store.add(key, 1)  # the last rank arrived while this one gave up: all pass
    _joined[ranks] = _joined.get(ranks, 0) + 1


def _missing(rank: int, world_size: int, arrived: int, timeout: datetime.timedelta) -> MissingRanksError:
    return MissingRanksError(
        f"rank {rank}: only {arrived} of the {world_size} ranks of the job constructed this CheckpointManager "
        f"within {timeout.total_seconds():g}s. With process_group=None (the default) inside an initialised "
        f"torch.distributed job the manager is collective: every rank constructs it and calls it; {ONE_RANK_HINT}. "
        "If the ranks only reach the constructor far apart, pass a longer dist_timeout. "
        "No process group was created: the job can go on"
    )


class TorchDistributed:
    """Object collectives on a dedicated gloo group (created collectively, once per manager)."""

    def __init__(self, group: Any = None, timeout: datetime.timedelta | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        ranks = None if group is None else dist.get_process_group_ranks(group)
        join(tuple(ranks or range(self.world_size)), self.rank, timeout or JOIN_TIMEOUT)
        with self._peers("creation of its gloo group"):
            self.group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    def _global(self, rank: int) -> int:
        return self._dist.get_global_rank(self.group, rank)

    def broadcast(self, value: T) -> T:
        box = [value]
        with self._peers("broadcast"):
            self._dist.broadcast_object_list(box, src=self._global(COORDINATOR), group=self.group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        with self._peers("gather"):
            self._dist.gather_object(value, out, dst=self._global(COORDINATOR), group=self.group)
        return out or []

    def all_gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        with self._peers("all_gather"):
            self._dist.all_gather_object(out, value, group=self.group)
        return out

    @contextlib.contextmanager
    def _peers(self, collective: str) -> Iterator[None]:
        """A RuntimeError of a collective is gloo's report of a peer whose connection closed or timed out."""
        try:
            yield
        except RuntimeError as exc:
            raise self._peer_lost(collective, exc) from exc

    def _peer_lost(self, collective: str, cause: RuntimeError) -> PeerRankError:
        others = [r for r in range(self.world_size) if r != self.rank]
        peer = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
        if self.timeout is None:
            from torch.distributed.constants import default_pg_timeout

            waited = f"torch's default timeout ({default_pg_timeout.total_seconds():g}s)"
        else:
            waited = f"dist_timeout={self.timeout.total_seconds():g}s"
        return PeerRankError(
            f"rank {self.rank} of {self.world_size} lost {peer} during {_OPERATION.get()}: ckptman's {collective} failed "
            f"(gloo: {cause}). A rank died, or did not reach the same ckptman call within {waited}; {ONE_RANK_HINT}; "
            "if ranks are that far apart only because one is slow (e.g. uploading), raise dist_timeout. The job cannot "
            "continue: restart all its ranks. Checkpoints already committed stay restorable; the next writable "
            "manager removes what an interrupted save left."
        )


def coordinator(process_group: Any = None, timeout: datetime.timedelta | None = None) -> Coordinator:
    """TorchDistributed when a process group is given or the default one is initialized, else SingleProcess."""
    if process_group is THIS_PROCESS:
        return ThisProcessOnly()
    if process_group is None and "torch.distributed" not in sys.modules:
        return SingleProcess()  # no process group can be initialised yet; not importing torch saves ~1 s (ckptman ls)
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return SingleProcess()
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    if dist.get_world_size(process_group) == 1:
        return SingleProcess()
    return TorchDistributed(process_group, timeout)


def portable(error: BaseException) -> tuple[str, str]:
    """An exception as (class name, message): any error pickles this way, so no rank is left waiting."""
    return type(error).__name__, str(error)


def _transportable(error: Exception) -> BaseException | tuple[str, str]:
    """ckptman's own errors cross ranks as themselves (with fields such as ``failed_ranks``); others by name."""
    if isinstance(error, CheckpointError):
        try:
            pickle.loads(pickle.dumps(error))  # the other ranks must be able to rebuild it, not only this one send it
        except Exception:  # noqa: BLE001 - a field that does not round-trip: send the name and message instead
            return portable(error)
        return error
    return portable(error)


def _rebuild(failure: BaseException | tuple[str, str]) -> BaseException:
    """Rank 0's error on another rank: a ckptman error as it was; anything else as a CheckpointError naming it."""
    if isinstance(failure, BaseException):
        return failure
    kind, message = failure
    return CheckpointError(f"{kind} on rank {COORDINATOR}: {message}")


def on_coordinator(ranks: Coordinator, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; every rank returns its result or raises its error."""
    outcome: tuple[Any, BaseException | tuple[str, str] | None] | None = None
    error: BaseException | None = None
    if ranks.is_coordinator:
        try:
            outcome = (work(), None)
            if ranks.world_size > 1:
                pickle.dumps(outcome)  # fail here, on rank 0, rather than leave the others waiting
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then re-raised
            error = exc
            outcome = (None, _transportable(exc))
    result, failure = ranks.broadcast(outcome)  # type: ignore[misc]
    if error is not None:
        raise error
    if failure is not None:
        raise _rebuild(failure)
    return result  # type: ignore[no-any-return]
