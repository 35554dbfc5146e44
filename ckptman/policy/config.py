"""The manager's flat keyword arguments, turned into policy objects in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ckptman.errors import ManifestError, PolicyConfigError
from ckptman.policy.best import Metric, enters_top_k, rank, resolve_metrics
from ckptman.policy.retention import (
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepLatest,
    KeepSteps,
    RetentionRule,
    decide,
)
from ckptman.policy.save import EveryCall, EveryNSteps, SavePolicy, require_int
from ckptman.record import CheckpointRecord


@dataclass(frozen=True)
class Policy:
    """Everything the manager decides, as pure functions of the committed records."""

    save: SavePolicy
    metrics: tuple[Metric, ...]
    keep_best: int
    retention: tuple[RetentionRule, ...]
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def metric(self, name: str | None) -> Metric:
        """The tracked metric called ``name`` (the first tracked one when None)."""
        if not self.metrics:
            raise PolicyConfigError("no metric is tracked; construct the manager with best='metric name'")
        if name is None:
            return self.metrics[0]
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise PolicyConfigError(f"metric {name!r} is not tracked; tracked: {[m.name for m in self.metrics]}")

    def wants(self, records: Sequence[CheckpointRecord], candidate: CheckpointRecord) -> bool:
        """Due by interval, or the candidate's metrics would rank it among the kept best."""
        if self.save.should_save(candidate.step):
            return True
        return any(enters_top_k(records, metric, self.keep_best, candidate) for metric in self.metrics)

    def retain(self, records: Sequence[CheckpointRecord], pinned: Mapping[int, str] = {}) -> dict[int, tuple[str, ...]]:
        """Kept steps with their reasons; ``pinned`` adds steps the caller protects."""
        rules = list(self.retention)
        for reason in sorted(set(pinned.values())):
            rules.append(KeepSteps(frozenset(s for s, r in pinned.items() if r == reason), reason))
        return decide(records, rules)

    def best(self, records: Sequence[CheckpointRecord], name: str | None = None) -> CheckpointRecord | None:
        ranked = rank(records, self.metric(name))
        return ranked[0] if ranked else None

    def describe(self) -> dict[str, object]:
        """The policy as JSON for the sidecar: ``config`` rebuilds it (:func:`policy_from_config`), the rest is for people."""
        return {
            "config": dict(self.config),
            "save": repr(self.save),
            "best": {m.name: m.mode for m in self.metrics},
            "keep_best": self.keep_best,
            "retention": [repr(rule) for rule in self.retention],
        }


def build_policy(
    *,
    save_interval_steps: int | None,
    save_begin: int,
    keep_last: int | None,
    keep_every: int | None,
    best: str | Sequence[str] | None,
    mode: str | Mapping[str, str] | None,
    keep_best: int,
) -> Policy:
    require_int("save_begin", save_begin, minimum=0)
    save: SavePolicy = EveryCall() if save_interval_steps is None else EveryNSteps(save_interval_steps, save_begin)
    metrics = resolve_metrics(best, mode)
    require_int("keep_best", keep_best, minimum=1)
    rules: list[RetentionRule] = [KeepLatest(), KeepAll() if keep_last is None else KeepLast(keep_last)]
    if keep_every is not None:
        rules.append(KeepEvery(keep_every))
    rules.extend(KeepBest(metric, keep_best) for metric in metrics)
    config = {
        "save_interval_steps": save_interval_steps,
        "save_begin": save_begin,
        "keep_last": keep_last,
        "keep_every": keep_every,
        "best": [m.name for m in metrics] or None,
        "mode": {m.name: m.mode for m in metrics} or None,
        "keep_best": keep_best,
    }
    return Policy(save=save, metrics=metrics, keep_best=keep_best, retention=tuple(rules), config=config)


def policy_from_config(config: object, source: str) -> Policy:
    """Rebuild the policy a sidecar recorded (``policy.config``), e.g. for ``ckptman ls``."""
    if not isinstance(config, Mapping) or set(config) != set(_CONFIG_KEYS):
        raise ManifestError(f"{source}: 'policy.config' must be an object with keys {sorted(_CONFIG_KEYS)}, got {config!r}")
    try:
        return build_policy(**config)
    except PolicyConfigError as exc:
        raise ManifestError(f"{source}: 'policy.config' is invalid: {exc}") from exc


_CONFIG_KEYS = ("save_interval_steps", "save_begin", "keep_last", "keep_every", "best", "mode", "keep_best")
