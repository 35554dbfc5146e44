"""When a step is due for a checkpoint: small, frozen, pure policy objects.

A policy holds only its configuration, validated at construction, and answers
``should_save(step)`` without I/O or clock reads, so the check is cheap enough
to call every training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ckptman.errors import PolicyConfigError


@runtime_checkable
class SavePolicy(Protocol):
    def should_save(self, step: int) -> bool: ...


def require_int(name: str, value: object, *, minimum: int) -> int:
    """Validate a policy number: an int (not a bool) no smaller than ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyConfigError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise PolicyConfigError(f"{name} must be an int >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class EveryCall:
    """Every ``save()`` call saves (the default when no interval is set)."""

    def should_save(self, step: int) -> bool:
        return True


@dataclass(frozen=True)
class EveryNSteps:
    """Due at steps that are > 0, >= ``begin`` and divisible by ``interval``."""

    interval: int
    begin: int = 0

    def __post_init__(self) -> None:
        require_int("save_interval_steps", self.interval, minimum=1)
        require_int("save_begin", self.begin, minimum=0)

    def should_save(self, step: int) -> bool:
        return step > 0 and step >= self.begin and step % self.interval == 0


@dataclass(frozen=True)
class AnyOf:
    """Due when any of its policies is due."""

    policies: tuple[SavePolicy, ...]

    def should_save(self, step: int) -> bool:
        return any(policy.should_save(step) for policy in self.policies)
