"""Who does what across ranks: a small coordinator over torch.distributed, and a one-process stand-in.

Every rank constructs the same manager and calls the same methods in the
same order. Ranks write their own payload files; rank 0 alone makes
decisions, holds the lease, writes manifests, ``latest`` and the sidecar,
and deletes. Everything else is told to the other ranks through these few
collectives, on a process group of ckptman's own (gloo), so that saves
running on a background thread never interleave with the training loop's
collectives on the default group.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Any, Callable, Protocol, TypeVar

T = TypeVar("T")

COORDINATOR = 0


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


class TorchDistributed:
    """Object collectives on a dedicated gloo group (created collectively, once per manager)."""

    def __init__(self, group: Any = None, timeout: datetime.timedelta | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        ranks = None if group is None else dist.get_process_group_ranks(group)
        self.group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    def _global(self, rank: int) -> int:
        return self._dist.get_global_rank(self.group, rank)

    def broadcast(self, value: T) -> T:
        box = [value]
        self._dist.broadcast_object_list(box, src=self._global(COORDINATOR), group=self.group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        self._dist.gather_object(value, out, dst=self._global(COORDINATOR), group=self.group)
        return out or []

    def all_gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, value, group=self.group)
        return out


def coordinator(process_group: Any = None, timeout: datetime.timedelta | None = None) -> Coordinator:
    """TorchDistributed when a process group is given or the default one is initialized, else SingleProcess."""
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


def _rebuild(kind: str, message: str) -> BaseException:
    """The same ckptman error class on every rank; anything else as a CheckpointError naming it."""
    from ckptman import errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.CheckpointError):
        return cls(message)
    return errors.CheckpointError(f"{kind} on rank {COORDINATOR}: {message}")


def on_coordinator(ranks: Coordinator, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; every rank returns its result or raises its error."""
    outcome: tuple[Any, tuple[str, str] | None] | None = None
    error: BaseException | None = None
    if ranks.is_coordinator:
        try:
            outcome = (work(), None)
            if ranks.world_size > 1:
                pickle.dumps(outcome)  # fail here, on rank 0, rather than leave the others waiting
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then re-raised
            error = exc
            outcome = (None, portable(exc))
    result, failure = ranks.broadcast(outcome)  # type: ignore[misc]
    if error is not None:
        raise error
    if failure is not None:
        raise _rebuild(*failure)
    return result  # type: ignore[no-any-return]
