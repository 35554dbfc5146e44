"""The benchmark driver shared by bench.py and _objectstore.py: configuration, rows, interleaving, scratch folders."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from typing import Any, Callable

from _common import MiB, describe, is_not_implemented

# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Config:
    repeats: int
    state_mib: int
    n_tensors: int
    dir_files: int
    dir_file_mib: int
    latency: float
    bandwidth: float
    should_save_calls: int
    base: str  # parent of all temporary folders
    small_files: int = 256
    small_file_kib: int = 256
    scale_mibs: tuple[int, ...] = (64, 256, 1024)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: str) -> Config:
        quick = args.quick
        return cls(
            repeats=args.repeats or (2 if quick else 5),
            state_mib=args.state_mib or (64 if quick else 256),
            n_tensors=args.tensors,
            dir_files=16,
            dir_file_mib=args.file_mib or (4 if quick else 16),
            latency=args.latency,
            bandwidth=args.bandwidth_mib * MiB,
            should_save_calls=200_000 if quick else 1_000_000,
            base=base,
            small_files=64 if quick else 256,
            scale_mibs=(16, 64) if quick else (64, 256, 1024),
        )


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Row:
    contender: str
    kind: str = "s"  # "s" seconds, "us" microseconds per call, "mem" bytes
    samples: list[float] = dataclasses.field(default_factory=list)
    status: str | None = None  # "n/a (not implemented: ...)" or "error: ..."
    baseline: bool = False
    goal: str = ""
    check: Callable[[Group, Row], bool] | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and self.status is None else None


@dataclasses.dataclass
class Group:
    key: str
    title: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    ratio_of: float | None = None  # fixed denominator for the ratio column (memory: state size)

    def row(self, contender: str) -> Row:
        for row in self.rows:
            if row.contender == contender:
                return row
        raise KeyError(contender)

    def ratio(self, row: Row) -> float | None:
        if row.median is None:
            return None
        if self.ratio_of is not None:
            return row.median / self.ratio_of
        base = next((r for r in self.rows if r.baseline), None)
        if base is None or not base.median:
            return None
        return row.median / base.median

    def met(self, row: Row) -> str:
        if not row.goal:
            return ""
        if row.median is None:
            return "n/a"
        try:
            return "yes" if row.check and row.check(self, row) else "NO"
        except (TypeError, ZeroDivisionError):  # a reference it needs is missing
            return "n/a"


def ratio_at_most(limit: float, *, not_above: str | None = None) -> Callable[[Group, Row], bool]:
    """Ratio <= limit, and (optionally) median <= another row's median."""

    def check(group: Group, row: Row) -> bool:
        ratio = group.ratio(row)
        ok = ratio is not None and ratio <= limit
        if not_above is not None:
            other = group.row(not_above).median
            if other is None:
                raise TypeError("reference row missing")
            ok = ok and row.median <= other
        return ok

    return check


def median_at_most(limit: float) -> Callable[[Group, Row], bool]:
    return lambda group, row: row.median <= limit


# --------------------------------------------------------------------------- #
# The interleaving driver
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Contender:
    """``measure()`` does its own untimed preparation and cleanup and returns
    ``{row label: value}`` for what it timed.  ``setup()`` (a warm-up) raising
    TypeError/NotImplementedError marks the contender "not implemented"."""

    labels: list[str]
    measure: Callable[[int], dict[str, float]]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_value(value: float, kind: str) -> str:
    if kind == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.2f} s"
    if kind == "us":
        return f"{value:.3f} µs"
    if kind == "mem":
        return f"{value / MiB:.0f} MiB"
    return f"{value:.3g}"


def run_interleaved(group: Group, contenders: list[Contender], repeats: int, settle: Callable[[], None] | None = None) -> None:
    """Warm up every contender, then run them round-robin (rotating the order each repeat).

    ``settle`` runs (untimed) before every measurement, e.g. to wait until a
    server has finished the background work the previous one left it.
    """
    rows = {row.contender: row for row in group.rows}
    active: list[Contender] = []
    for c in contenders:
        try:
            if c.setup:
                c.setup()
            active.append(c)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the bench goes on
            status = f"n/a (not implemented: {describe(exc, 70)})" if is_not_implemented(exc) else f"error: {describe(exc, 80)}"
            for label in c.labels:
                rows[label].status = status
            log(f"  {c.labels[0]}: {status}")
    try:
        for rep in range(repeats):
            order = active[rep % len(active):] + active[: rep % len(active)] if active else []
            for c in order:
                if rows[c.labels[0]].status is not None:
                    continue
                gc.collect()
                if settle is not None:
                    settle()
                try:
                    values = c.measure(rep)
                except Exception as exc:  # noqa: BLE001
                    status = f"error: {describe(exc, 80)}"
                    for label in c.labels:
                        rows[label].status = status
                    log(f"  repeat {rep + 1}/{repeats} {c.labels[0]}: {status}")
                    continue
                for label, value in values.items():
                    rows[label].samples.append(value)
                shown = ", ".join(f"{label} {fmt_value(v, rows[label].kind)}" for label, v in values.items())
                log(f"  repeat {rep + 1}/{repeats}: {shown}")
    finally:
        for c in contenders:
            if c.teardown:
                with contextlib.suppress(Exception):
                    c.teardown()


class Scratch:
    """Fresh, uniquely named folders below one parent; removed by ``clean``."""

    def __init__(self, base: str, name: str) -> None:
        self.root = tempfile.mkdtemp(prefix=f"{name}-", dir=base)

    def new(self, name: str = "run", create: bool = True) -> str:
        path = os.path.join(self.root, f"{name}-{uuid.uuid4().hex[:8]}")
        if create:
            os.makedirs(path)
        return path

    def clean(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def manager(directory: str, **kwargs: Any) -> Any:
    """A CheckpointManager; progress bars off when the keyword exists (they would draw on a terminal)."""
    from ckptman import CheckpointManager

    if "progress" in manager_parameters():
        kwargs.setdefault("progress", False)
    return CheckpointManager(directory, **kwargs)


def manager_parameters() -> dict[str, Any]:
    """CheckpointManager's keyword arguments and their defaults."""
    import inspect

    from ckptman import CheckpointManager

    return {
        name: p.default
        for name, p in inspect.signature(CheckpointManager).parameters.items()
        if p.default is not inspect.Parameter.empty
    }




def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"

