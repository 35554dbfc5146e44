"""The manager's flat keyword arguments, turned into policy objects in one place."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ckptman.errors import CheckpointWarning, ManifestError, PolicyConfigError
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
from ckptman.policy.save import AnyOf, EveryCall, EveryNEpochs, EveryNSeconds, EveryNSteps, Progress, SavePolicy, require_int
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

    def wants(self, records: Sequence[CheckpointRecord], candidate: CheckpointRecord, progress: Progress | None = None) -> bool:
        """Due by a trigger, or the candidate's metrics would rank it among the kept best.

        ``progress`` carries what the triggers look at besides the step (default: the candidate's step and epoch).
        """
        if self.save.due(progress or Progress(candidate.step, candidate.epoch)):
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
    save_interval_steps: int | None = None,
    save_begin: int = 0,
    keep_last: int | None = None,
    keep_every: int | None = None,
    best: str | Sequence[str] | None = None,
    mode: str | Mapping[str, str] | None = None,
    keep_best: int = 1,
    save_interval_epochs: int | None = None,
    save_interval_seconds: float | None = None,
) -> Policy:
    """The manager's keyword arguments, with its defaults: the signature is also the sidecar's ``policy.config`` schema."""
    require_int("save_begin", save_begin, minimum=0)
    save = _save_policy(save_interval_steps, save_begin, save_interval_epochs, save_interval_seconds)
    metrics = resolve_metrics(best, mode)
    require_int("keep_best", keep_best, minimum=1)
    rules: list[RetentionRule] = [KeepLatest(), KeepAll() if keep_last is None else KeepLast(keep_last)]
    if keep_every is not None:
        rules.append(KeepEvery(keep_every))
    rules.extend(KeepBest(metric, keep_best) for metric in metrics)
    config: dict[str, object] = {
        "save_interval_steps": save_interval_steps,
        "save_begin": save_begin,
        "keep_last": keep_last,
        "keep_every": keep_every,
        "best": [m.name for m in metrics] or None,
        "mode": {m.name: m.mode for m in metrics} or None,
        "keep_best": keep_best,
    }
    # Only when set: a sidecar without them stays exactly what 0.1.0 wrote and reads.
    if save_interval_epochs is not None:
        config["save_interval_epochs"] = save_interval_epochs
    if save_interval_seconds is not None:
        config["save_interval_seconds"] = save_interval_seconds
    return Policy(save=save, metrics=metrics, keep_best=keep_best, retention=tuple(rules), config=config)


def _save_policy(steps: int | None, begin: int, epochs: int | None, seconds: float | None) -> SavePolicy:
    """The union of the set triggers; every ``save()`` call saves when none is set."""
    triggers: list[SavePolicy] = []
    if steps is not None:
        triggers.append(EveryNSteps(steps, begin))
    if epochs is not None:
        triggers.append(EveryNEpochs(epochs))
    if seconds is not None:
        triggers.append(EveryNSeconds(seconds))
    if not triggers:
        return EveryCall()
    return triggers[0] if len(triggers) == 1 else AnyOf(tuple(triggers))


def policy_from_config(config: object, source: str) -> Policy:
    """Rebuild the policy a sidecar recorded (``policy.config``), e.g. for ``ckptman ls``.

    Any version's sidecar reads: a key it lacks (an older writer had no such
    setting) takes :func:`build_policy`'s default; a key this version does not
    know (a newer writer's setting) is ignored with a warning.
    """
    if not isinstance(config, Mapping):
        raise ManifestError(f"{source}: 'policy.config' must be an object, got {config!r}")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        warnings.warn(
            f"{source}: 'policy.config' has settings this ckptman does not know (written by a newer version?); "
            f"ignored: {unknown}",
            CheckpointWarning,
            stacklevel=2,
        )
    try:
        return build_policy(**{key: value for key, value in config.items() if key in _CONFIG_KEYS})
    except PolicyConfigError as exc:
        raise ManifestError(f"{source}: 'policy.config' is invalid: {exc}") from exc


_CONFIG_KEYS = frozenset(inspect.signature(build_policy).parameters)
"""The known ``policy.config`` keys: :func:`build_policy`'s arguments, so a new argument is known at once."""
