#!/usr/bin/env python
"""ckptman performance benchmark: medians of interleaved runs against the obvious baselines.

    python bench/bench.py [--quick] [--repeats N] [--only NAMES] [--markdown] [--json PATH]

Benchmarks (``--only`` takes these names or their numbers, comma-separated):

1 ``save``         durable sync save of a state dict to local disk:
                   torch.save+fsync vs ckptman save vs DCP save.
2 ``async``        time the training loop is blocked by an async save:
                   ckptman save(async_save=True) vs DCP async_save.
3 ``restore``      verified restore: torch.load vs ckptman restore (warm and
                   cold page cache, and followed by a copy into the model).
4 ``s3``           every S3 transfer against the s3fs call it replaces, on moto
                   behind a latency/bandwidth-limited proxy (bench/_objectstore.py):
                   directory upload, small files, state save, state restore,
                   directory restore.
5 ``should_save``  cost of one ``mgr.should_save(step)`` call.
6 ``memory``       peak extra RSS of one save, each in a fresh process (local
                   disk, and a synchronous save to SeaweedFS S3).
7 ``seaweedfs``    benchmark 4 on a real S3 server (SeaweedFS) on 127.0.0.1.
8 ``scale``        the state save and restore of 4 and 7 at 64 MiB, 256 MiB, 1 GiB.

Contenders of a benchmark are interleaved within every repeat (A B C, B C A,
C A B, ...) so slow drift of a shared machine hits them alike, and every
measured save writes fresh files (deleted outside the timed region).  See
bench/README.md for what each number means and its caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DCP_WARNING,
    HERE,
    MiB,
    ROOT,
    describe,
    evict_from_page_cache,
    fsync_path,
    make_state,
    state_bytes,
    warm_page_cache,
)
from _driver import (  # noqa: E402
    Config,
    Contender,
    Group,
    Row,
    Scratch,
    _version,
    fmt_value,
    log,
    manager,
    median_at_most,
    ratio_at_most,
    rm,
    run_interleaved,
)
from _objectstore import bench_scale, bench_server  # noqa: E402

BENCHES = ("save", "async", "restore", "s3", "should_save", "memory", "seaweedfs", "scale")


# --------------------------------------------------------------------------- #
# 1. durable sync save
# --------------------------------------------------------------------------- #


class ManagerSaver:
    """One CheckpointManager kept open for all measurements, as in a training loop.

    Each measurement saves the next step into it, waits until it is committed
    (outside the timed region) and deletes it again through ``mgr.delete``,
    so every save writes fresh files and the thread pools of an async manager
    are already running, as they would be after the first checkpoint.
    """

    def __init__(self, scratch: Scratch, **kwargs: Any) -> None:
        self.scratch, self.kwargs = scratch, kwargs
        self.mgr: Any = None
        self.folder = ""
        self.step = 0

    def open(self, warmup: dict) -> None:
        self.folder = self.scratch.new("ckptman")
        self.mgr = manager(self.folder, **self.kwargs)  # TypeError while a keyword does not exist yet
        self.save(warmup)

    def save(self, state: dict) -> tuple[float, float]:
        """(seconds until save() returned, seconds until the checkpoint was committed)."""
        self.step += 1
        mgr, step = self.mgr, self.step
        t0 = time.perf_counter()
        ok = mgr.save(step, state)
        t1 = time.perf_counter()
        mgr.wait_until_finished()
        t2 = time.perf_counter()
        if not ok:
            raise RuntimeError("save() returned False")
        if mgr.all_steps() != [step]:
            raise RuntimeError(f"after wait_until_finished() the committed steps are {mgr.all_steps()}, not [{step}]")
        mgr.delete(step)
        return t1 - t0, t2 - t0

    def close(self) -> None:
        try:
            if self.mgr is not None:
                self.mgr.close()
        finally:
            if self.folder:
                rm(self.folder)


def save_contenders(scratch: Scratch) -> dict[str, Callable[[dict], float]]:
    """One timed durable save each; every call writes into a fresh folder and removes it afterwards."""
    import torch
    import torch.distributed.checkpoint as dcp

    def torch_save(s: dict) -> float:
        folder = scratch.new("torch")
        path = os.path.join(folder, "state.pt")
        try:
            t0 = time.perf_counter()
            torch.save(s, path)
            fsync_path(path)
            fsync_path(folder)
            return time.perf_counter() - t0
        finally:
            rm(folder)

    def dcp_save(s: dict) -> float:
        folder = scratch.new("dcp")
        try:
            t0 = time.perf_counter()
            dcp.save(s, checkpoint_id=folder, no_dist=True)
            return time.perf_counter() - t0
        finally:
            rm(folder)

    return {"torch.save+fsync": torch_save, "DCP save": dcp_save}


def manager_contender(saver: ManagerSaver, state: dict, tiny: dict, labels: list[str]) -> Contender:
    """A Contender around a ManagerSaver: labels[0] gets the blocking time, labels[1] (if any) the time to commit."""

    def measure(rep: int) -> dict[str, float]:
        blocked, committed = saver.save(state)
        return dict(zip(labels, (blocked, committed)))

    return Contender(labels, measure, setup=lambda: saver.open(tiny), teardown=saver.close)


def bench_save(cfg: Config, state: dict, tiny: dict) -> Group:
    scratch = Scratch(cfg.base, "save")
    group = Group("1", f"durable save {cfg.state_mib} MiB local")
    group.rows = [
        Row("torch.save+fsync", baseline=True),
        Row("ckptman save", goal="<= 1.00x", check=ratio_at_most(1.00)),
        Row("DCP save"),
    ]
    fns = save_contenders(scratch)
    contenders = [
        Contender([label], lambda rep, f=f, label=label: {label: f(state)}, setup=lambda f=f: f(tiny))
        for label, f in fns.items()
    ]
    contenders.insert(1, manager_contender(ManagerSaver(scratch), state, tiny, ["ckptman save"]))
    try:
        run_interleaved(group, contenders, cfg.repeats)
    finally:
        scratch.clean()
    group.notes.append(
        "torch.save+fsync = torch.save(state, path) + fsync(file) + fsync(folder); ckptman save = mgr.save(step, state) "
        "on a manager kept open across repeats (each checkpoint deleted again, untimed), including checksum, "
        "manifest commit, 'latest' pointer and sidecar; DCP = dcp.save(no_dist=True) with its default sync_files=True"
    )
    return group


# --------------------------------------------------------------------------- #
# 2. async save: blocking time
# --------------------------------------------------------------------------- #


def bench_async(cfg: Config, state: dict, tiny: dict) -> Group:
    import torch.distributed.checkpoint as dcp

    scratch = Scratch(cfg.base, "async")
    group = Group("2", f"async save {cfg.state_mib} MiB: blocked")
    group.rows = [
        Row("ckptman save (sync)", baseline=True),
        Row("DCP async_save"),
        Row("ckptman async_save", goal="<= 0.25x, <= DCP", check=ratio_at_most(0.25, not_above="DCP async_save")),
        Row("  DCP until done"),
        Row("  ckptman until committed"),
    ]

    def dcp_async(s: dict) -> dict[str, float]:
        folder = scratch.new("dcp")
        try:
            t0 = time.perf_counter()
            result = dcp.async_save(s, checkpoint_id=folder, no_dist=True)
            t1 = time.perf_counter()
            getattr(result, "upload_completion", result).result()  # waited for, outside the blocking time
            t2 = time.perf_counter()
            return {"DCP async_save": t1 - t0, "  DCP until done": t2 - t0}
        finally:
            rm(folder)

    contenders = [
        manager_contender(ManagerSaver(scratch), state, tiny, ["ckptman save (sync)"]),
        Contender(["DCP async_save", "  DCP until done"], lambda rep: dcp_async(state), setup=lambda: dcp_async(tiny)),
        manager_contender(
            ManagerSaver(scratch, async_save=True), state, tiny, ["ckptman async_save", "  ckptman until committed"]
        ),
    ]
    try:
        run_interleaved(group, contenders, cfg.repeats)
    finally:
        scratch.clean()
    group.notes.append(
        "blocked = until save()/async_save() returns (ckptman: CheckpointManager(dir, async_save=True), kept open); "
        "every async save is waited for (untimed: wait_until_finished() / future.result()) before the next "
        "measurement. 'until done/committed' = from the call until the background write finished (nothing else runs)"
    )
    return group


# --------------------------------------------------------------------------- #
# 3. verified restore
# --------------------------------------------------------------------------- #


def bench_restore(cfg: Config, state: dict) -> list[Group]:
    import torch

    scratch = Scratch(cfg.base, "restore")
    groups: list[Group] = []
    try:
        torch_file = os.path.join(scratch.new("torch"), "state.pt")
        torch.save(state, torch_file)
        fsync_path(torch_file)
        ck_dir = scratch.new("ckptman")
        mgr = manager(ck_dir)
        try:
            if not mgr.save(0, state):
                raise RuntimeError("save() returned False")
            mgr.wait_until_finished()
            ck_folder = mgr.checkpoint_path(0)
            model = {k: torch.empty_like(v) for k, v in state.items()}

            def torch_load(**kw: Any) -> Callable[[], Any]:
                return lambda: torch.load(torch_file, weights_only=True, **kw)

            def ckptman_restore() -> Any:
                return mgr.restore(0, weights_only=True)

            # First load of each, untimed: check they give the saved state back.
            for load in (torch_load(), ckptman_restore):
                loaded = load()
                if set(loaded) != set(state) or not all(torch.equal(loaded[k], state[k]) for k in state):
                    raise RuntimeError("restored state differs from the saved one")
                del loaded

            def timed(load: Callable[[], Any], files: str, cold: bool, copy: bool) -> float:
                (evict_from_page_cache if cold else warm_page_cache)(files)
                gc.collect()
                t0 = time.perf_counter()
                loaded = load()
                if copy:  # what model.load_state_dict() does with it
                    for k, target in model.items():
                        target.copy_(loaded[k])
                elapsed = time.perf_counter() - t0
                del loaded
                return elapsed

            variants = [
                ("3a", "restore, page cache warm", False, False),
                ("3b", "restore, page cache cold", True, False),
                ("3c", "restore + copy into model (warm)", False, True),
            ]
            for key, title, cold, copy in variants:
                log(f"[{key}] {title}")
                group = Group(key, f"{title} {cfg.state_mib} MiB")
                group.rows = [
                    Row("torch.load", baseline=True),
                    Row("ckptman restore", goal="<= 1.10x", check=ratio_at_most(1.10)),
                ]
                loads = [("torch.load", torch_load(), torch_file), ("ckptman restore", ckptman_restore, ck_folder)]
                if copy:
                    group.rows.insert(1, Row("torch.load(mmap=True)"))
                    loads.insert(1, ("torch.load(mmap=True)", torch_load(mmap=True), torch_file))
                contenders = [
                    Contender(
                        [label],
                        lambda rep, label=label, load=load, files=files, cold=cold, copy=copy: {
                            label: timed(load, files, cold, copy)
                        },
                    )
                    for label, load, files in loads
                ]
                run_interleaved(group, contenders, cfg.repeats)
                groups.append(group)
        finally:
            mgr.close()
    finally:
        scratch.clean()
    groups[0].notes.append(
        "all with weights_only=True; ckptman restore verifies size + xxh3 checksum first. warm = files read once "
        "(untimed) just before; cold = posix_fadvise(DONTNEED) on the files just before (this VM's disk is fast, "
        "cold is close to warm); 3c adds copy_() of every tensor into preallocated ones (load_state_dict), which "
        "counts the page faults a lazily mmap'd result defers"
    )
    return groups



# --------------------------------------------------------------------------- #
# 5. should_save
# --------------------------------------------------------------------------- #


def bench_should_save(cfg: Config) -> Group:
    scratch = Scratch(cfg.base, "should")
    calls = cfg.should_save_calls
    group = Group("5", f"should_save per call ({calls:,} calls)")
    group.rows = [
        Row("python function call", kind="us", baseline=True),
        Row("ckptman should_save", kind="us", goal="<= 2 µs", check=median_at_most(2.0)),
        Row("ckptman should_save, all triggers", kind="us", goal="<= 2 µs", check=median_at_most(2.0)),
    ]
    try:
        mgr = manager(scratch.new("ckptman"), save_interval_steps=1000)
        triggers = manager(
            scratch.new("ckptman-triggers"), save_interval_steps=1000, save_interval_epochs=1, save_interval_seconds=3600
        )
        try:
            step = 123_457  # not due: the common case
            triggers.save(1, {"w": 1}, force=True, epoch=3)  # epoch 3 recorded: a call in epoch 3 is not due

            def plain(s: int) -> bool:
                return s > 0 and s % 1000 == 0

            timers = {
                "python function call": timeit.Timer("plain(step)", globals={"plain": plain, "step": step}),
                "ckptman should_save": timeit.Timer("mgr.should_save(step)", globals={"mgr": mgr, "step": step}),
                "ckptman should_save, all triggers": timeit.Timer(
                    "mgr.should_save(step, epoch=3)", globals={"mgr": triggers, "step": step}
                ),
            }
            contenders = [
                Contender(
                    [label],
                    lambda rep, t=t, label=label: {label: t.timeit(calls) / calls * 1e6},
                    setup=lambda t=t: t.timeit(1000),
                )
                for label, t in timers.items()
            ]
            run_interleaved(group, contenders, cfg.repeats)
        finally:
            mgr.close()
            triggers.close()
    finally:
        scratch.clean()
    group.notes.append(
        "timeit of `mgr.should_save(step)` with save_interval_steps=1000 at a step that is not due; 'all triggers' "
        "adds save_interval_epochs=1 and save_interval_seconds=3600 and passes an epoch already saved, so every "
        "trigger is evaluated and none fires; the reference is a plain Python function doing the same modulo test "
        "(the floor for any Python-level call)"
    )
    return group


# --------------------------------------------------------------------------- #
# 6. peak host memory of one save (fresh subprocess each)
# --------------------------------------------------------------------------- #


def bench_memory(cfg: Config) -> Group:
    scratch = Scratch(cfg.base, "memory")
    size = cfg.state_mib * MiB
    group = Group("6", "peak extra RSS / state size", ratio_of=size)
    group.rows = [
        Row("torch.save+fsync", kind="mem"),
        Row("ckptman save (sync)", kind="mem"),
        Row("DCP async_save", kind="mem"),
        Row("ckptman async_save", kind="mem", goal="<= 1.10x", check=ratio_at_most(1.10)),
    ]
    kinds = {
        "torch.save+fsync": "torch_save",
        "ckptman save (sync)": "ckptman_sync",
        "DCP async_save": "dcp_async",
        "ckptman async_save": "ckptman_async",
    }

    def probe(kind: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "_memprobe.py"), kind, "--mib", str(cfg.state_mib),
             "--tensors", str(cfg.n_tensors), "--dir", scratch.root],
            capture_output=True, text=True, timeout=600,
        )
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"_memprobe.py {kind} failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
        return json.loads(lines[-1])

    def measure(label: str) -> Callable[[int], dict[str, float]]:
        def run(rep: int) -> dict[str, float]:
            result = probe(kinds[label])
            if "na" in result:
                raise NotImplementedError(result["na"])
            if "error" in result:
                raise RuntimeError(result["error"])
            return {label: float(result["peak_extra"])}

        return run

    def check_implemented(label: str) -> Callable[[], None]:
        def setup() -> None:
            if kinds[label] == "ckptman_async":
                from ckptman import CheckpointManager

                folder = scratch.new("probe")
                CheckpointManager(folder, async_save=True).close()  # TypeError until the keyword exists
                rm(folder)

        return setup

    contenders = [Contender([label], measure(label), setup=check_implemented(label)) for label in kinds]
    try:
        run_interleaved(group, contenders, cfg.repeats)
    finally:
        scratch.clean()
    group.notes.append(
        "each measurement in a fresh python process: build the state, warm up with a tiny save, then the peak RSS "
        "increase over save() + wait_until_finished() (DCP: + future.result()), sampled every 1 ms from "
        "/proc/self/statm and cross-checked with ru_maxrss; the ratio column is peak extra / state size"
    )
    return group


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #



def _git_state() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ckptman"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return f"{rev}{' + uncommitted changes in ckptman/' if dirty else ''}" if rev else "unknown"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> str:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _filesystem_of(path: str) -> str:
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, fstype = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return fstype


def header(cfg: Config, argv: list[str], started: float, load_start: str, load_end: str, elapsed: float) -> list[tuple[str, str]]:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return [
        ("command", "python " + " ".join(shlex.quote(a) for a in argv)),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))),
        ("runtime", f"{elapsed:.0f} s"),
        ("machine", f"{platform.node()}: {os.cpu_count()} CPUs ({affinity} usable), {_cpu_model()}, {_mem_total()} RAM, {platform.system()} {platform.release()}"),
        ("load average", f"{load_start} at start, {load_end} at end"),
        ("software", f"Python {platform.python_version()}, torch {torch.__version__}, fsspec {_version('fsspec')}, s3fs {_version('s3fs')}, moto {_version('moto')}, xxhash {_version('xxhash')}"),
        ("ckptman", f"{_version('ckptman')} at git {_git_state()}"),
        ("temp dir", f"{cfg.base} on {_filesystem_of(cfg.base)}"),
        ("settings", f"{cfg.repeats} repeats (median shown, min-max in brackets), state {cfg.state_mib} MiB = {cfg.n_tensors} float32 tensors, S3 dir {cfg.dir_files}x{cfg.dir_file_mib} MiB"),
    ]


def table_rows(groups: list[Group]) -> list[list[str]]:
    out = []
    for group in groups:
        for i, row in enumerate(group.rows):
            title = f"{group.key} {group.title}" if i == 0 else ""
            if row.status is not None:
                status = row.status
                if row.contender.startswith("  ") and i and group.rows[i - 1].status == row.status:
                    status = status.split(" ", 1)[0] + " (as above)"
                elif row.contender.startswith("  ") and any(r.status == row.status for r in group.rows[:i]):
                    status = status.split(" ", 1)[0] + " (as above)"
                out.append([title, row.contender, status, "", "", row.goal, group.met(row)])
                continue
            if not row.samples:
                out.append([title, row.contender, "not run", "", "", row.goal, group.met(row)])
                continue
            med = row.median
            spread = f"[{fmt_value(min(row.samples), row.kind).split()[0]}-{fmt_value(max(row.samples), row.kind)}]"
            ratio = group.ratio(row)
            out.append(
                [title, row.contender, fmt_value(med, row.kind), spread, f"{ratio:.2f}x" if ratio is not None else "",
                 row.goal, group.met(row)]
            )
    return out


COLUMNS = ["benchmark", "contender", "median", "(min-max)", "ratio", "goal", "met"]


def render_text(info: list[tuple[str, str]], groups: list[Group]) -> str:
    rows = table_rows(groups)
    lines = [f"{k + ':':<14}{v}" for k, v in info]
    lines.append("")
    # very long status texts (n/a, error) may overflow their column; size columns by normal rows
    sized = [r for r in rows if not r[2].startswith(("n/a", "error"))] or rows
    widths = [max(len(c), *(len(r[i]) for r in sized)) for i, c in enumerate(COLUMNS)]
    widths[0] = max(len(COLUMNS[0]), *(len(r[0]) for r in rows))
    widths[1] = max(len(COLUMNS[1]), *(len(r[1]) for r in rows))

    def fmt(cells: list[str]) -> str:
        if cells[2].startswith(("n/a", "error")):
            goal = f"   (goal {cells[5]}: {cells[6]})" if cells[5] else ""
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}{goal}"
        return "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()

    lines.append(fmt(COLUMNS))
    for group in groups:
        first = True
        for r in table_rows([group]):
            if first:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
                first = False
            lines.append(fmt(r))
    lines.append("")
    lines.append("Notes:")
    for group in groups:
        for note in group.notes:
            lines.append(f"  [{group.key}] {note}")
    return "\n".join(lines)


def render_markdown(info: list[tuple[str, str]], groups: list[Group]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {esc(v)}" for k, v in info]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] * 2) + "|"]
    for r in table_rows(groups):
        cells = [esc(c.strip()) for c in r]
        if r[1].startswith("  "):
            cells[1] = "&nbsp;&nbsp;" + cells[1]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for group in groups:
        for note in group.notes:
            lines.append(f"- [{group.key}] {esc(note)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(BENCHES)
    chosen = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name = BENCHES[int(part) - 1] if part.isdigit() and 1 <= int(part) <= len(BENCHES) else part
        if name not in BENCHES:
            raise SystemExit(f"--only: unknown benchmark {part!r}; choose from {', '.join(BENCHES)} (or 1-{len(BENCHES)})")
        chosen.append(name)
    return [b for b in BENCHES if b in chosen]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 64 MiB state, 16x4 MiB S3 directory")
    parser.add_argument("--repeats", type=int, help="repeats per contender (default 5, --quick 2)")
    parser.add_argument("--only", help=f"comma-separated subset: {', '.join(BENCHES)} (or numbers 1-6)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/performance.md)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to PATH as JSON")
    parser.add_argument("--dir", help="parent folder for temporary files (default: the system temp dir; use local disk)")
    parser.add_argument("--state-mib", type=int, help="state dict size in MiB (default 256, --quick 64)")
    parser.add_argument("--tensors", type=int, default=4, help="number of float32 tensors in the state dict (default 4)")
    parser.add_argument("--file-mib", type=int, help="size of each of the 16 S3 files in MiB (default 16, --quick 4)")
    parser.add_argument("--latency", type=float, default=0.02, help="proxy latency per request in s (default 0.02)")
    parser.add_argument("--bandwidth-mib", type=float, default=32, help="proxy bandwidth per connection and direction in MiB/s (default 32; 0: unlimited)")
    args = parser.parse_args(argv[1:])
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.tensors < 1:
        parser.error("--tensors must be >= 1")
    selected = parse_only(args.only)

    warnings.filterwarnings("ignore", message=DCP_WARNING)
    warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
    started = time.time()
    t_start = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    base = tempfile.mkdtemp(prefix="ckptman-bench-", dir=args.dir)
    cfg = Config.from_args(args, base)
    groups: list[Group] = []
    try:
        state = tiny = None
        if {"save", "async", "restore"} & set(selected):
            log(f"building a {cfg.state_mib} MiB state dict ...")
            state = make_state(cfg.state_mib, cfg.n_tensors)
            tiny = make_state(1, 2, seed=1)
            if abs(state_bytes(state) - cfg.state_mib * MiB) > 4 * cfg.n_tensors:
                raise SystemExit(f"state is {state_bytes(state)} bytes, not {cfg.state_mib} MiB")
        steps: list[tuple[str, Callable[[], Group | list[Group]]]] = [
            ("save", lambda: bench_save(cfg, state, tiny)),
            ("async", lambda: bench_async(cfg, state, tiny)),
            ("restore", lambda: bench_restore(cfg, state)),
            ("s3", lambda: bench_server(cfg, "s3")),
            ("should_save", lambda: bench_should_save(cfg)),
            ("memory", lambda: bench_memory(cfg)),
            ("seaweedfs", lambda: bench_server(cfg, "seaweedfs")),
            ("scale", lambda: bench_scale(cfg)),
        ]
        for name, run in steps:
            if name not in selected:
                continue
            log(f"[{BENCHES.index(name) + 1}] {name}")
            try:
                result = run()
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not lose the others
                log(f"  benchmark {name} failed: {describe(exc, 300)}")
                failed = Group(str(BENCHES.index(name) + 1), name)
                failed.rows = [Row("(benchmark)", status=f"error: {describe(exc, 100)}")]
                result = failed
            groups.extend(result if isinstance(result, list) else [result])
    finally:
        shutil.rmtree(base, ignore_errors=True)

    elapsed = time.perf_counter() - t_start
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info = header(cfg, argv, started, load_start, load_end, elapsed)
    print(render_markdown(info, groups) if args.markdown else render_text(info, groups))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "info": dict(info),
                    "groups": [
                        {
                            "key": g.key,
                            "title": g.title,
                            "notes": g.notes,
                            "rows": [
                                {"contender": r.contender.strip(), "kind": r.kind, "samples": r.samples, "status": r.status,
                                 "median": r.median, "ratio": g.ratio(r), "goal": r.goal, "met": g.met(r)}
                                for r in g.rows
                            ],
                        }
                        for g in groups
                    ],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
