"""The sidecar ``<directory>/ckptman.json``: retention and best-score state as JSON.

It lists every committed checkpoint with its metrics, the best steps per
tracked metric and the latest checkpoint, so a restarted job, ``ckptman ls``
or any external tool sees the state in one read. The manifests stay the
source of truth: a missing, unreadable or stale sidecar is rebuilt from them
and never causes a deletion::

    {
      "format": "ckptman/state", "version": 1,  # 2 when policy.config holds a setting 0.1.0 lacks
      "latest": "step_00000200",
      "checkpoints": [{"step": 100, "name": "step_00000100", "kind": "state",
                       "created": 1764000000.0, "size": 123, "metrics": {...}}],
      "best": {"val/loss": {"mode": "min", "steps": [100]}},
      "policy": {"config": {...}, ...}         # "config" rebuilds the writer's policy (ckptman ls); the rest is for people
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ckptman import jsonfmt
from ckptman.errors import ManifestError
from ckptman.manifest import KINDS
from ckptman.record import CheckpointRecord

SIDECAR_NAME = "ckptman.json"
FORMAT = "ckptman/state"
VERSION = 2
# Version 1 readers (ckptman 0.1.0) refuse a policy.config holding keys they do not know, with a
# confusing message; a sidecar with such keys is written as version 2, so they say "upgrade" instead.
# Without them the sidecar stays version 1, exactly what 0.1.0 reads.
_VERSION_1_CONFIG = frozenset(
    {"save_interval_steps", "save_begin", "keep_last", "keep_every", "best", "mode", "keep_best"}
)


@dataclass(frozen=True)
class SidecarState:
    checkpoints: tuple[CheckpointRecord, ...]
    best: Mapping[str, Mapping[str, Any]]
    latest: str | None
    policy: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        config = self.policy.get("config")
        newer_config = isinstance(config, Mapping) and not set(config) <= _VERSION_1_CONFIG
        return {
            "format": FORMAT,
            "version": VERSION if newer_config else 1,
            "latest": self.latest,
            "checkpoints": [_record_to_json(r) for r in sorted(self.checkpoints, key=lambda r: r.step)],
            "best": {name: dict(entry) for name, entry in self.best.items()},
            "policy": dict(self.policy),
        }

    def to_bytes(self) -> bytes:
        return jsonfmt.dumps(self.to_dict())

    def same_checkpoints(self, other: SidecarState) -> bool:
        """The same steps, names, kinds, epochs and metrics (compared as JSON, so NaN equals NaN)."""

        def key(state: SidecarState) -> list[tuple[int, str, str, int | None, dict[str, float | str]]]:
            return sorted((r.step, r.name, r.kind, r.epoch, jsonfmt.encode_metrics(r.metrics)) for r in state.checkpoints)

        return key(self) == key(other)

    @staticmethod
    def from_dict(document: Mapping[str, Any], source: str) -> SidecarState:
        jsonfmt.check_format(document, FORMAT, VERSION, source)
        raw_checkpoints = jsonfmt.require(document, "checkpoints", list, source)
        records = tuple(_record_from_json(raw, source) for raw in raw_checkpoints)
        if len({r.step for r in records}) != len(records):
            raise ManifestError(f"{source}: lists the same step twice")
        latest = document.get("latest")
        if latest is not None and not isinstance(latest, str):
            raise ManifestError(f"{source}: 'latest' must be a folder name or null, got {latest!r}")
        best = document.get("best", {})
        policy = document.get("policy", {})
        if not isinstance(best, dict) or not isinstance(policy, dict):
            raise ManifestError(f"{source}: 'best' and 'policy' must be objects")
        return SidecarState(records, best, latest, policy)

    @staticmethod
    def from_bytes(data: bytes, source: str) -> SidecarState:
        return SidecarState.from_dict(jsonfmt.loads(data, source), source)


def _record_to_json(r: CheckpointRecord) -> dict[str, object]:
    entry: dict[str, object] = {
        "step": r.step,
        "name": r.name,
        "kind": r.kind,
        "created": r.created,
        "size": r.size,
        "metrics": jsonfmt.encode_metrics(r.metrics),
    }
    if r.epoch is not None:  # optional, like the manifest's
        entry["epoch"] = r.epoch
    return entry


def _record_from_json(raw: object, source: str) -> CheckpointRecord:
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: each checkpoint entry must be an object, got {raw!r}")
    step = jsonfmt.require(raw, "step", int, source)
    where = f"{source}: checkpoint step {step}"
    kind = raw.get("kind", "state")
    if kind not in KINDS:
        raise ManifestError(f"{where}: unknown kind {kind!r}")
    return CheckpointRecord(
        step=step,
        name=jsonfmt.require(raw, "name", str, where),
        metrics=jsonfmt.decode_metrics(raw.get("metrics", {}), where),
        created=float(jsonfmt.require(raw, "created", (int, float), where)),
        size=jsonfmt.require(raw, "size", int, where),
        kind=kind,
        epoch=jsonfmt.optional_count(raw, "epoch", where),
    )
