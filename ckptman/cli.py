"""The ``ckptman`` command: ``demo`` to see the manager work, ``ls`` and ``verify`` to inspect a directory.

Every ckptman error ends as one ``ckptman: error: <message>`` line on stderr
with exit code 2, never a traceback: the messages already say what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import warnings
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

from ckptman import __version__, jsonfmt
from ckptman.demo import METRIC, DemoResult, run_demo
from ckptman.errors import CheckpointError
from ckptman.errors import CheckpointWarning
from ckptman.manager import CheckpointManager
from ckptman.record import CheckpointRecord
from ckptman.policy import policy_from_config
from ckptman.state import SIDECAR_NAME

PROG = "ckptman"
EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_ERROR = 2


# -- storage options --------------------------------------------------------
def parse_storage_option(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` with a dotted key for nesting; the value is JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. anon=true or client_kwargs.endpoint_url=http://localhost:9000), got {text!r}"
        )
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return parts, value


def build_storage_options(items: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Merge parsed ``--storage-option`` items into the nested dict fsspec expects."""
    options: dict[str, Any] = {}
    for parts, value in items:
        node = options
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"--storage-option {'.'.join(parts[: i + 1])} is set both as a value and as a group")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise CheckpointError(f"--storage-option {'.'.join(parts)} is set both as a value and as a group")
        node[parts[-1]] = value
    return options


# -- formatting ---------------------------------------------------------------
def human_size(size: int) -> str:
    """Bytes in binary units, three significant digits: what a person compares at a glance."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1000 or unit == "TiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Aligned columns (numbers right, text left), no trailing spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return lines


# -- demo -----------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    if args.steps < 0:
        raise CheckpointError(f"--steps must be >= 0, got {args.steps}")

    def echo(line: str) -> None:
        print(line, file=out, flush=True)

    result = run_demo(args.directory, build_storage_options(args.storage_option), args.steps, echo)
    echo("")
    for line in demo_summary(result):
        echo(line)
    return 0


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


# -- ls ---------------------------------------------------------------------------
def keep_reasons(mgr: CheckpointManager) -> tuple[dict[int, list[str]], dict[str, Any] | None]:
    """Why each checkpoint is kept, by the policy recorded in the directory's sidecar."""
    stored = mgr.stored_state()
    records = [mgr.record(step) for step in mgr.all_steps()]
    if stored is None:
        return {r.step: ["unknown (no sidecar)"] for r in records}, None
    policy = policy_from_config(stored["policy"].get("config"), f"{mgr.directory}/{SIDECAR_NAME}")
    kept = policy.retain(records)
    return {r.step: list(kept.get(r.step, ("not kept by the policy (deleted at the writer's next save or report)",))) for r in records}, stored


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    mgr = CheckpointManager(args.directory, storage_options=build_storage_options(args.storage_option), read_only=True)
    records = [mgr.record(step) for step in mgr.all_steps()]
    reasons, stored = keep_reasons(mgr)
    stale = stored is not None and [c["step"] for c in stored["checkpoints"]] != mgr.all_steps()
    if stale:
        warnings.warn(
            f"{mgr.directory}/{SIDECAR_NAME} is out of date with the manifests (an interrupted save?); "
            "the listing shows the manifests",
            CheckpointWarning,
            stacklevel=2,
        )
    policy = stored["policy"] if stored else None
    if args.json:
        print(json.dumps(ls_document(mgr.directory, records, reasons, policy, stored["best"] if stored else {}, stale), indent=2, allow_nan=False), file=out)
    if not records:
        print(f"no committed checkpoints in {mgr.directory}", file=sys.stderr if args.json else out)
    elif not args.json:
        for line in ls_lines(mgr.directory, records, reasons, policy):
            print(line, file=out)
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    mgr = CheckpointManager(args.directory, storage_options=build_storage_options(args.storage_option), read_only=True)
    report = mgr.verify(args.step)
    if args.json:
        document = {
            "directory": report.directory,
            "ok": report.ok,
            "checkpoints": [{"name": r.name, "step": r.step, "ok": r.ok, "problems": list(r.problems)} for r in report.results],
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        for line in report.lines():
            print(line, file=out)
    return EXIT_OK if report.ok else EXIT_VERIFY_FAILED


def ls_document(
    directory: str,
    records: Sequence[CheckpointRecord],
    reasons: Mapping[int, list[str]],
    policy: Mapping[str, Any] | None,
    best: Mapping[str, Any],
    stale: bool,
) -> dict[str, Any]:
    """``ls --json``: strict JSON (non-finite metrics as "NaN"/"Infinity", as on storage)."""
    return {
        "directory": directory,
        "latest": records[-1].step if records else None,
        "policy": dict(policy) if policy else None,
        "best": {name: entry["steps"] for name, entry in best.items()},
        "sidecar_stale": stale,
        "checkpoints": [
            {
                "step": r.step,
                "name": r.name,
                "kind": r.kind,
                "size": r.size,
                "created": r.created,
                "metrics": jsonfmt.encode_metrics(r.metrics),
                "reasons": reasons[r.step],
            }
            for r in records
        ],
    }


def ls_lines(
    directory: str, records: Sequence[CheckpointRecord], reasons: Mapping[int, list[str]], policy: Mapping[str, Any] | None
) -> list[str]:
    """``ls`` for a person: a summary, the stored policy, one aligned row per checkpoint."""
    count = len(records)
    lines = [f"{directory}: {count} checkpoint{'s' if count != 1 else ''}, latest step {records[-1].step}"]
    if policy:
        rules = ", ".join(map(str, policy.get("retention", [])))
        lines.append(f"policy: save {policy.get('save', '?')}; keep {rules}")
    rows = [
        [
            str(r.step),
            r.name,
            human_size(r.size),
            datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M:%S"),
            " ".join(f"{k}={format_metric(v)}" for k, v in sorted(r.metrics.items())) or "-",
            ", ".join(reasons[r.step]),
        ]
        for r in records
    ]
    headers = ["step", "name", "size", "created", "metrics", "kept because"]
    return lines + format_table(headers, rows, [True, False, True, False, False, False])


# -- entry point --------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        type=parse_storage_option,
        default=[],
        help="fsspec storage option, repeatable; VALUE is JSON when it parses (true, 3, {...}), else a string; "
        "dotted keys nest (client_kwargs.endpoint_url=http://localhost:9000)",
    )
    parser = argparse.ArgumentParser(prog=PROG, description="Checkpoint manager for PyTorch on fsspec storage.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="train a tiny model with checkpointing; run again to resume",
        description="Train a small MLP with periodic and best-metric checkpoints and retention. "
        "Run again on the same directory to resume from its latest checkpoint.",
    )
    demo.add_argument("directory", nargs="?", default=os.path.join("runs", "demo"), help="local path or fsspec URL (default: ./runs/demo)")
    demo.add_argument("--steps", type=int, default=200, help="training steps to run in this invocation (default: 200)")
    demo.set_defaults(handler=cmd_demo)

    ls = commands.add_parser(
        "ls",
        parents=[common],
        help="list committed checkpoints and why they are kept",
        description="List the committed checkpoints of a directory (read-only).",
    )
    ls.add_argument("directory", help="local path or fsspec URL")
    ls.add_argument("--json", action="store_true", help="print machine-readable JSON")
    ls.set_defaults(handler=cmd_ls)

    check = commands.add_parser(
        "verify",
        parents=[common],
        help="check every committed checkpoint's sizes and checksums; exit 1 on any failure",
        description="Read every payload file of the committed checkpoints (read-only) and compare it with its "
        "manifest. Exits 0 when all verify, 1 when any fails.",
    )
    check.add_argument("directory", help="local path or fsspec URL")
    check.add_argument("--step", type=int, default=None, help="verify only this step")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(handler=cmd_verify)
    return parser


def _show_warning(fallback: Callable[..., None]) -> Callable[..., None]:
    """ckptman's own warnings as one ``ckptman: warning:`` line; others as usual."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, CheckpointWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show


class _LowerLevelFormatter(logging.Formatter):
    """``warning:`` like argparse's ``error:``, not ``WARNING:``."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return super().formatMessage(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """The manager's repair notices (removed leftovers, rebuilt sidecar) as ``ckptman: warning:`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LowerLevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("ckptman")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: keep argparse's code
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    with warnings.catch_warnings(), _log_to_stderr():
        warnings.showwarning = _show_warning(warnings.showwarning)
        try:
            return int(args.handler(args, sys.stdout))
        except CheckpointError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        except BrokenPipeError:  # e.g. `ckptman ls DIR | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
            return 1
        except OSError as exc:  # permission denied, disk full: a message, not a traceback
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
    return EXIT_ERROR


