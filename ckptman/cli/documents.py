"""The ``--json`` documents: plain JSON values only, one builder per shape, documented in docs/cli.md.

Every shape is built here from the library's objects, so a field means the
same in every command (a checkpoint in ``ls`` is the checkpoint in ``info``
and ``best``). Non-finite metrics are the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"``, as on storage; a policy is data such as
``{"keep_best": {"metric": "val/loss", "mode": "min", "k": 2}}``, never a repr.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ckptman import jsonfmt
from ckptman.cli.output import age_of
from ckptman.manifest import Manifest
from ckptman.policy import Policy
from ckptman.policy.best import Metric
from ckptman.policy.save import AnyOf
from ckptman.record import CheckpointRecord
from ckptman.verify import VerifyReport

SCHEMA_VERSION = 1  # bumped when a field changes meaning or goes away; new fields may appear any time


def checkpoint(record: CheckpointRecord, reasons: Sequence[str] | None = None, now: float | None = None) -> dict[str, Any]:
    """One committed checkpoint; ``reasons`` are the retention rules that keep it (``ls``)."""
    document: dict[str, Any] = {
        "step": record.step,
        "name": record.name,
        "kind": record.kind,
        "size": record.size,
        "created": record.created,
        "age_seconds": round(age_of(record.created, now), 3),
        "epoch": record.epoch,
        "metrics": jsonfmt.encode_metrics(record.metrics),
    }
    if reasons is not None:
        document["reasons"] = list(reasons)
    return document


def files(manifest: Manifest) -> list[dict[str, Any]]:
    return [dict(entry.to_json()) for entry in manifest.files]


def rule(item: object) -> dict[str, dict[str, Any]]:
    """A policy object as ``{snake_case_name: {field: plain value}}``; a metric as its name and mode."""
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(item):  # type: ignore[arg-type]
        value = getattr(item, field.name)
        if isinstance(value, Metric):
            fields.update(metric=value.name, mode=value.mode)
        elif isinstance(value, (set, frozenset)):
            fields[field.name] = sorted(value)
        else:
            fields[field.name] = value
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", type(item).__name__).lower(): fields}


def policy(rebuilt: Policy, config: Mapping[str, Any]) -> dict[str, Any]:
    """The writer's policy: its save triggers (any one saves), retention rules (union), tracked metrics, and
    ``config``, the manager arguments that rebuild it."""
    triggers = rebuilt.save.policies if isinstance(rebuilt.save, AnyOf) else (rebuilt.save,)
    return {
        "save": [rule(trigger) for trigger in triggers],
        "retention": [rule(item) for item in rebuilt.retention],
        "best": {metric.name: metric.mode for metric in rebuilt.metrics},
        "config": dict(config),
    }


def describe_rule(document: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"keep_last": {"n": 3}}`` as ``keep_last(n=3)`` for the text output."""
    ((name, fields),) = document.items()
    return f"{name}({', '.join(f'{key}={value}' for key, value in fields.items())})"


def verify_report(report: VerifyReport) -> dict[str, Any]:
    return {
        "directory": report.directory,
        "ok": report.ok,
        "checked": len(report.results),
        "failed": len(report.failures),
        "checkpoints": [
            {"name": r.name, "step": r.step, "ok": r.ok, "problems": list(r.problems)} for r in report.results
        ],
    }
