"""Best tracking: which metric direction is better and which checkpoints rank best.

One tracked metric is simply a tuple of one :class:`Metric`; there is no
separate single-metric code path.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from ckptman.errors import InvalidMetricError, PolicyConfigError
from ckptman.record import CheckpointRecord

Mode = Literal["min", "max"]

# Checked in this order. "loss" goes first so names such as "heatmap_loss"
# (which contains "map") or "top1_loss" are minimised, as their authors mean.
_LESS_IS_BETTER = ("loss",)
_GREATER_IS_BETTER = ("acc", "top", "ar@", "auc", "precision", "map", "mdice", "miou", "macc", "aacc")


def infer_mode(name: str) -> Mode:
    """The direction of a metric from its name: case-insensitive substrings of mmengine's keys, "loss" first."""
    lowered = name.lower()
    if any(key in lowered for key in _LESS_IS_BETTER):
        return "min"
    if any(key in lowered for key in _GREATER_IS_BETTER):
        return "max"
    raise PolicyConfigError(
        f"cannot infer whether metric {name!r} should be minimised or maximised; "
        f"pass mode='min' or mode='max' (for several metrics a dict such as mode={{{name!r}: 'max'}})"
    )


@dataclass(frozen=True)
class Metric:
    """A tracked metric and its direction."""

    name: str
    mode: Mode

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise PolicyConfigError(f"mode for metric {self.name!r} must be 'min' or 'max', got {self.mode!r}")

    def sort_key(self, value: float) -> float:
        """Smaller is better, whatever the mode."""
        return value if self.mode == "min" else -value


def resolve_metrics(best: str | Sequence[str] | None, mode: str | Mapping[str, str] | None) -> tuple[Metric, ...]:
    """Turn the manager's ``best=`` / ``mode=`` arguments into Metric objects."""
    if best is None:
        if mode is not None:
            raise PolicyConfigError("mode= was given without best=; name the metric(s) to track with best=")
        return ()
    if not isinstance(best, (str, Sequence)):
        raise PolicyConfigError(f"best= must be a metric name or a list of names, got {best!r}")
    names = [best] if isinstance(best, str) else list(best)
    if not names:
        raise PolicyConfigError("best= is an empty list; pass None to track no metric")
    for name in names:
        if not isinstance(name, str) or not name:
            raise PolicyConfigError(f"best= must name metrics with non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise PolicyConfigError(f"best= names a metric twice: {names}")
    if isinstance(mode, Mapping):
        unknown = sorted(set(mode) - set(names))
        if unknown:
            raise PolicyConfigError(f"mode= names metrics that best= does not track: {unknown}; tracked: {names}")
        return tuple(Metric(name, mode[name] if name in mode else infer_mode(name)) for name in names)  # type: ignore[arg-type]
    if mode is None:
        return tuple(Metric(name, infer_mode(name)) for name in names)
    if len(names) > 1:
        raise PolicyConfigError(
            f"mode={mode!r} is ambiguous for several metrics {names}; pass a dict such as {{{names[0]!r}: 'min', ...}}"
        )
    return (Metric(names[0], mode),)  # type: ignore[arg-type]


def validate_metric_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidMetricError(f"metric names must be non-empty strings, got {name!r}")
    return name


def coerce_metric_value(name: str, value: object) -> float:
    """A metric value as a float; 0-d tensors and numpy scalars are unwrapped with ``.item()``.

    NaN and infinities are accepted (they are recorded but never become best).
    """
    if isinstance(value, bool):
        raise InvalidMetricError(f"metric {name!r} is a bool ({value!r}); pass a real number")
    item = getattr(value, "item", None)
    if not isinstance(value, numbers.Real) and callable(item):
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else getattr(value, "size", 1)
        if size != 1:
            raise InvalidMetricError(f"metric {name!r} has {size} elements; pass a single number (e.g. loss.mean().item())")
        value = item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidMetricError(f"metric {name!r} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def coerce_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """Validate a metrics mapping from the caller into plain floats."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise InvalidMetricError(f"metrics must be a mapping of name to number, got {type(metrics).__name__}")
    return {validate_metric_name(name): coerce_metric_value(name, value) for name, value in metrics.items()}


def is_rankable(value: float | None) -> bool:
    """NaN, infinities and missing values never become best."""
    return value is not None and math.isfinite(value)


def rank(records: Iterable[CheckpointRecord], metric: Metric) -> list[CheckpointRecord]:
    """Records with a finite value for ``metric``, best first; ties keep the earlier step first."""
    ranked = [r for r in records if is_rankable(r.metrics.get(metric.name))]
    return sorted(ranked, key=lambda r: (metric.sort_key(r.metrics[metric.name]), r.step))


def top_k(records: Iterable[CheckpointRecord], metric: Metric, k: int) -> list[CheckpointRecord]:
    return rank(records, metric)[:k]


def enters_top_k(records: Sequence[CheckpointRecord], metric: Metric, k: int, candidate: CheckpointRecord) -> bool:
    """Whether ``candidate`` (not yet committed) would rank among the best ``k`` for ``metric``."""
    if not is_rankable(candidate.metrics.get(metric.name)):
        return False
    return candidate.step in {r.step for r in top_k([*records, candidate], metric, k)}
