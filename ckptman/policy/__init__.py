"""Pure decision logic: when to save, which checkpoints rank best, which to keep.

Nothing in this package performs I/O or reads the clock.
"""

from ckptman.policy.best import Metric, infer_mode, rank, resolve_metrics, top_k
from ckptman.policy.config import Policy, build_policy, policy_from_config
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
from ckptman.policy.save import AnyOf, EveryCall, EveryNSteps, SavePolicy

__all__ = [
    "AnyOf",
    "EveryCall",
    "EveryNSteps",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepLatest",
    "KeepSteps",
    "Metric",
    "Policy",
    "RetentionRule",
    "SavePolicy",
    "build_policy",
    "decide",
    "infer_mode",
    "policy_from_config",
    "rank",
    "resolve_metrics",
    "top_k",
]
