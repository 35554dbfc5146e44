"""When a step is due for a checkpoint: small, frozen, pure policy objects.

A policy holds only its configuration, validated at construction, and
answers ``due(progress)`` without I/O or clock reads, so the check is cheap
enough to call every training step. What it may look at comes in as values
(:class:`Progress`); ``should_save(step, ...)`` is the same question with
keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from ckptman.errors import PolicyConfigError


class Progress(NamedTuple):
    """Where training is, as values the caller measured (a tuple: built on every call, so it must be cheap).

    ``epoch``: completed epochs (1 at the end of the first). ``seconds_since_save``:
    since the last save, on the caller's monotonic clock. ``saved_epoch``: the
    highest epoch a checkpoint (committed or in flight) already records.
    """

    step: int
    epoch: int | None = None
    seconds_since_save: float | None = None
    saved_epoch: int | None = None


@runtime_checkable
class SavePolicy(Protocol):
    def due(self, progress: Progress) -> bool: ...

    def should_save(
        self, step: int, *, epoch: int | None = None, seconds_since_save: float | None = None, saved_epoch: int | None = None
    ) -> bool: ...


class _Trigger:
    """``should_save(step, ...)`` for every policy, in terms of its ``due``."""

    def due(self, progress: Progress) -> bool:
        raise NotImplementedError

    def should_save(
        self, step: int, *, epoch: int | None = None, seconds_since_save: float | None = None, saved_epoch: int | None = None
    ) -> bool:
        return self.due(Progress(step, epoch, seconds_since_save, saved_epoch))


def require_int(name: str, value: object, *, minimum: int) -> int:
    """Validate a policy number: an int (not a bool) no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyConfigError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise PolicyConfigError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def require_seconds(name: str, value: object) -> float:
    """Validate a duration: a finite number of seconds > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise PolicyConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EveryCall(_Trigger):
    """Every ``save()`` call saves (the default when no trigger is set)."""

    def due(self, progress: Progress) -> bool:
        return True


@dataclass(frozen=True)
class EveryNSteps(_Trigger):
    """Due at steps that are > 0, >= ``begin`` and divisible by ``interval``."""

    interval: int
    begin: int = 0

    def __post_init__(self) -> None:
        require_int("save_interval_steps", self.interval, minimum=1)
        require_int("save_begin", self.begin, minimum=0)

    def due(self, progress: Progress) -> bool:
        step = progress.step
        return step > 0 and step >= self.begin and step % self.interval == 0


@dataclass(frozen=True)
class EveryNEpochs(_Trigger):
    """Due once per ``interval`` completed epochs: the epoch is > 0, divisible by ``interval``
    and newer than any a checkpoint records, so calling it on every step of an epoch saves once."""

    interval: int

    def __post_init__(self) -> None:
        require_int("save_interval_epochs", self.interval, minimum=1)

    def due(self, progress: Progress) -> bool:
        epoch = progress.epoch
        if epoch is None or epoch <= 0 or epoch % self.interval:
            return False
        return progress.saved_epoch is None or epoch > progress.saved_epoch


@dataclass(frozen=True)
class EveryNSeconds(_Trigger):
    """Due once ``interval`` seconds have passed since the last save (or since the caller started)."""

    interval: float

    def __post_init__(self) -> None:
        require_seconds("save_interval_seconds", self.interval)

    def due(self, progress: Progress) -> bool:
        return progress.seconds_since_save is not None and progress.seconds_since_save >= self.interval


@dataclass(frozen=True)
class AnyOf(_Trigger):
    """Due when any of its policies is due."""

    policies: tuple[SavePolicy, ...]

    def due(self, progress: Progress) -> bool:
        return any(policy.due(progress) for policy in self.policies)
