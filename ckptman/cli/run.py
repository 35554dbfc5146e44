"""Parse, run one command, and turn every way it can end into an exit code and at most one line on stderr."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from ckptman.cli.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED, PROG
from ckptman.cli.output import error_line, reporting
from ckptman.cli.parser import build_parser
from ckptman.errors import CheckpointError

Handler = Callable[[argparse.Namespace, TextIO], int]


def handler_of(spec: str) -> Handler:
    module, _, name = spec.partition(":")
    handler: Handler = getattr(importlib.import_module(f"ckptman.cli.{module}"), name)
    return handler


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: keep argparse's code
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    with reporting():
        try:
            return int(handler_of(args.handler)(args, sys.stdout))
        except KeyboardInterrupt:
            print(interrupted_line(args), file=sys.stderr)
            return EXIT_INTERRUPTED
        except CheckpointError as exc:
            print(error_line(exc), file=sys.stderr)
        except BrokenPipeError:  # e.g. `ckptman ls DIR | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
            return 1
        except OSError as exc:  # permission denied, disk full: a message, not a traceback
            print(error_line(exc), file=sys.stderr)
    return EXIT_ERROR


def interrupted_line(args: argparse.Namespace) -> str:
    """For the demo: the last committed step and that a rerun resumes there; for the other commands just "interrupted"."""
    if args.command != "demo":
        return f"{PROG}: interrupted"
    try:  # read-only, without torch: a fraction of a second on top of the Ctrl-C
        from ckptman.cli import options
        from ckptman.manager import CheckpointManager

        reader = CheckpointManager(args.directory, options.storage_options(args.directory, args), read_only=True)
        step, directory = reader.latest_step(), reader.directory
    except Exception:  # noqa: BLE001 - the directory cannot be read now: say only what is sure
        return f"{PROG}: interrupted; run the same command again to resume from the last committed checkpoint"
    if step is None:
        return f"{PROG}: interrupted; nothing is committed in {directory} yet, so a rerun starts from the beginning"
    return f"{PROG}: interrupted; step {step} is committed in {directory}: run the same command again to resume from it"
