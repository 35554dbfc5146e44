"""How long the ``ckptman`` command takes to start, next to ``import torch``.

Median wall time of fresh processes (``--repeats``, default 7, interleaved so
a busy machine's drift hits every command alike)::

    python bench/bench_startup.py              # --help, --version, -V, ls, ls --json, verify, import torch
    python bench/bench_startup.py --repeats 11 --markdown

``ls`` and ``verify`` run on a small run directory this script writes first
(three checkpoints on local disk). The ``ckptman`` console script next to
``sys.executable`` is used, as a user runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_SECONDS = 0.5  # "well under a second" for every command that loads no tensor


def console_script() -> list[str]:
    found = shutil.which("ckptman", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "ckptman"]


def write_run(directory: str) -> None:
    """Three small checkpoints with a tracked metric, in a child process (this one stays torch-free)."""
    code = (
        "import sys, torch; from ckptman import CheckpointManager\n"
        "with CheckpointManager(sys.argv[1], keep_last=2, best='val/loss') as mgr:\n"
        "    for step in (10, 20, 30): mgr.save(step, {'w': torch.ones(1000)}, metrics={'val/loss': 1 / step})\n"
    )
    subprocess.run([sys.executable, "-c", code, directory], check=True)


def commands(directory: str) -> dict[str, list[str]]:
    cli = console_script()
    return {
        "ckptman --help": [*cli, "--help"],
        "ckptman --version": [*cli, "--version"],
        "ckptman ls DIR": [*cli, "ls", directory],
        "ckptman ls DIR --json": [*cli, "ls", directory, "--json"],
        "ckptman verify DIR": [*cli, "verify", directory],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(cases: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Each case once per round, the order rotated every round; one warm-up round first (page cache)."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        wall_time(cases[name])
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(wall_time(cases[name]))
    return samples


def table(samples: dict[str, list[float]], markdown: bool) -> list[str]:
    torch_median = statistics.median(samples['python -c "import torch"'])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        is_reference = "import torch" in name
        goal = "reference" if is_reference else ("met" if median < GOAL_SECONDS else "MISSED")
        rows.append((name, f"{median:.3f}", f"{min(values):.3f}", f"{max(values):.3f}", f"{median / torch_median:.2f}", goal))
    headers = ("command", "median s", "min s", "max s", "x import torch", f"goal < {GOAL_SECONDS}s")
    if markdown:
        return [f"| {' | '.join(headers)} |", f"|{'---|' * len(headers)}", *(f"| {' | '.join(row)} |" for row in rows)]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (headers, *rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (default 7; at least 5 is sensible)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptman-bench-startup-") as root:
        directory = os.path.join(root, "run")
        write_run(directory)
        samples = measure(commands(directory), args.repeats)
    print(f"{args.repeats} runs each, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", file=sys.stderr)
    print("\n".join(table(samples, args.markdown)))


if __name__ == "__main__":
    main()
