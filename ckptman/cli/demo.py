"""``ckptman demo``: train a tiny model with checkpoints, then show what is kept and why."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ckptman.cli import options as cli_options
from ckptman.cli.exitcodes import EXIT_OK
from ckptman.cli.output import (
    emit_json,
    emit_lines,
    format_metric,
    format_table,
    human_size,
)
from ckptman.demo import METRIC, DemoResult, run_demo
from ckptman.errors import CheckpointError


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    if args.steps < 0:
        raise CheckpointError(f"--steps must be >= 0, got {args.steps}")
    progress = sys.stderr if args.json else out  # with --json, stdout holds only the document

    def echo(line: str) -> None:
        print(line, file=progress, flush=True)

    options = cli_options.storage_options(args.directory, args)
    result = run_demo(args.directory, options, args.steps, echo)
    if args.json:
        emit_json(demo_document(result), out)
    else:
        emit_lines(["", *demo_summary(result)], out)
    return EXIT_OK


def demo_document(result: DemoResult) -> dict[str, object]:
    return {
        "directory": result.directory,
        "resumed_from": result.resumed_from,
        "first_step": result.first_step,
        "last_step": result.last_step,
        "saved": result.saved,
        "deleted": result.deleted,
        "kept": [{"step": r.step, "size": r.size, METRIC: r.val_loss, "reasons": list(r.reasons)} for r in result.kept],
    }


def demo_summary(result: DemoResult) -> list[str]:
    """What is kept and why, then how many checkpoints retention removed."""
    rows = [[str(r.step), human_size(r.size), format_metric(r.val_loss), ", ".join(r.reasons)] for r in result.kept]
    lines = [f"kept {len(result.kept)} checkpoints in {result.directory}:"]
    lines += format_table(["step", "size", METRIC, "kept because"], rows, [True, True, True, False])
    lines.append(
        f"this run saved {result.saved} checkpoints; retention deleted {result.deleted} "
        f"checkpoint{'s' if result.deleted != 1 else ''} during the run"
    )
    return lines
