"""The read-only commands: ``ls``, ``info``, ``best``, ``verify``; none loads a tensor or needs torch."""

from __future__ import annotations

import argparse
import time
import warnings
from datetime import datetime
from typing import Any, TextIO

from ckptman.cli import documents
from ckptman.cli.exitcodes import EXIT_FAILED, EXIT_OK
from ckptman.cli.output import (
    emit_json,
    emit_lines,
    format_metric,
    format_table,
    human_age,
    human_size,
)
from ckptman.cli.rundir import RunDirectory, open_run
from ckptman.errors import CheckpointWarning, ManifestError
from ckptman.state import SIDECAR_NAME

NOT_KEPT = "not kept by the policy (deleted at the writer's next save or report)"


def kept_reasons(run: RunDirectory) -> dict[int, list[str]]:
    """Why each checkpoint is kept, by the policy recorded in the directory's sidecar (not the reader's)."""
    records = [run.reader.record(step) for step in run.reader.all_steps()]
    policy = run.policy()
    if policy is None:
        return {r.step: ["unknown (no sidecar)"] for r in records}
    kept = policy.retain(records)
    return {r.step: list(kept.get(r.step, (NOT_KEPT,))) for r in records}


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    reader, stored = run.reader, run.stored
    records = [reader.record(step) for step in reader.all_steps()]
    reasons = kept_reasons(run)
    stale = stored is not None and [c["step"] for c in stored["checkpoints"]] != reader.all_steps()
    if stale:
        warnings.warn(
            f"{reader.directory}/{SIDECAR_NAME} is out of date with the manifests (an interrupted save?); "
            "the listing shows the manifests",
            CheckpointWarning,
            stacklevel=2,
        )
    policy = run.policy()
    policy_doc = documents.policy(policy, stored["policy"].get("config", {})) if policy and stored else None
    now = time.time()
    if args.json:
        emit_json(
            {
                "schema": documents.SCHEMA_VERSION,
                "directory": reader.directory,
                "latest": records[-1].step if records else None,
                "policy": policy_doc,
                "best": {name: entry["steps"] for name, entry in (stored["best"] if stored else {}).items()},
                "sidecar_stale": stale,
                "checkpoints": [documents.checkpoint(r, reasons[r.step], now) for r in records],
            },
            out,
        )
        return EXIT_OK
    if not records:
        print(f"no committed checkpoints in {reader.directory}", file=out)
        return EXIT_OK
    count = len(records)
    lines = [f"{reader.directory}: {count} checkpoint{'s' if count != 1 else ''}, latest step {records[-1].step}"]
    if policy_doc:
        save = " or ".join(map(documents.describe_rule, policy_doc["save"]))
        keep = ", ".join(map(documents.describe_rule, policy_doc["retention"]))
        lines.append(f"policy: save on {save}; retention: {keep}")
    rows = [
        [
            str(r.step),
            r.name,
            human_size(r.size),
            human_age(now - r.created),
            "-" if r.epoch is None else str(r.epoch),
            " ".join(f"{k}={format_metric(v)}" for k, v in sorted(r.metrics.items())) or "-",
            ", ".join(reasons[r.step]),
        ]
        for r in records
    ]
    headers = ["step", "name", "size", "age", "epoch", "metrics", "kept because"]
    emit_lines(lines + format_table(headers, rows, [True, False, True, True, True, False, False]), out)
    return EXIT_OK


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    manifest = run.manifest(run.reader.record(args.step).step)  # a step that is not committed raises, naming those that are
    reasons = kept_reasons(run)
    url = run.reader.checkpoint_path(manifest.step)
    document = {
        "schema": documents.SCHEMA_VERSION,
        "directory": run.reader.directory,
        "url": url,
        **documents.checkpoint(manifest.record(), reasons[manifest.step]),
        "files": documents.files(manifest),
    }
    if args.json:
        emit_json(document, out)
        return EXIT_OK
    created = datetime.fromtimestamp(manifest.created).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        f"{manifest.name} (step {manifest.step}, {manifest.kind}) in {run.reader.directory}",
        f"  url:      {url}",
        f"  created:  {created} ({human_age(document['age_seconds'])} ago)",
        f"  epoch:    {'-' if manifest.epoch is None else manifest.epoch}",
        f"  size:     {human_size(manifest.size)} in {len(manifest.files)} file{'s' if len(manifest.files) != 1 else ''}",
        f"  metrics:  {' '.join(f'{k}={format_metric(v)}' for k, v in sorted(manifest.metrics.items())) or '-'}",
        f"  kept by:  {', '.join(reasons[manifest.step])}",
        "",
    ]
    rows = [[entry.path, str(entry.size), entry.checksum] for entry in manifest.files]
    emit_lines(lines + format_table(["file", "bytes", "checksum"], rows, [False, True, False]), out)
    return EXIT_OK


def cmd_best(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    policy = run.policy()
    if policy is None:
        raise ManifestError(f"{run.reader.directory} has no readable {SIDECAR_NAME}, so which metric is tracked is unknown")
    metric = policy.metric(args.metric)
    records = [run.reader.record(step) for step in run.reader.all_steps()]
    best = policy.best(records, metric.name)
    document: dict[str, Any] = {
        "schema": documents.SCHEMA_VERSION,
        "directory": run.reader.directory,
        "metric": metric.name,
        "mode": metric.mode,
        "value": None if best is None else documents.checkpoint(best)["metrics"][metric.name],
        "checkpoint": None if best is None else documents.checkpoint(best),
        "url": None if best is None else run.reader.checkpoint_path(best.step),
    }
    if args.json:
        emit_json(document, out)
    elif best is None:
        print(f"no committed checkpoint in {run.reader.directory} has a finite {metric.name}", file=out)
    else:
        value = format_metric(best.metrics[metric.name])
        print(f"step {best.step} ({best.name}): {metric.name}={value} ({metric.mode}) {document['url']}", file=out)
    return EXIT_FAILED if best is None else EXIT_OK


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    step = args.step if args.step is not None else args.step_option
    report = run.reader.verify(step)
    if args.json:
        emit_json({"schema": documents.SCHEMA_VERSION, **documents.verify_report(report)}, out)
    else:
        emit_lines(report.lines(), out)
    return EXIT_OK if report.ok else EXIT_FAILED
