"""Write ``tests/data/golden-0.1.0/``: a run directory written by ckptman 0.1.0, and what it holds.

Users' buckets hold directories written by 0.1.0 (commit 4ccabb2), and every
later version must read them: ``tests/test_compat.py`` opens copies of
``golden-0.1.0/run/`` with the current code and compares what it finds with
``golden-0.1.0/EXPECTED.json``. The output is committed; it was produced once,
from the repository root, with torch 2.13.0+cpu, by::

    rm -rf /tmp/ckptman-0.1.0 && mkdir /tmp/ckptman-0.1.0
    git archive 4ccabb2 ckptman | tar -x -C /tmp/ckptman-0.1.0
    PYTHONPATH=/tmp/ckptman-0.1.0 .venv/bin/python tests/data/make_golden_0_1_0.py

It refuses to run on any ``ckptman`` package but 0.1.0's exact sources, and
refuses to overwrite an existing ``golden-0.1.0/``.

EXPECTED.json is not typed in: it is :func:`read_back` of the written
directory, through 0.1.0's public API, after checking that every restored
tensor and file equals what was saved. ``test_compat.py`` imports this module
for the run itself (:func:`write_run`, which the current code replays for
0.1.0 to read) and for :func:`read_back`, so both sides hash alike; and it runs
``make_golden_0_1_0.py read DIRECTORY POLICY_JSON`` under 0.1.0, which prints
:func:`report_as_reader` as JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

COMMIT = "4ccabb2a14fd2bfefc0fa278183b3292f9600452"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUTPUT = HERE / "golden-0.1.0"
MAX_BYTES = 200_000

#: CheckpointManager keyword arguments of the golden run: periodic saves, rotation, an archive, two tracked metrics.
POLICY: dict[str, Any] = {"save_interval_steps": 10, "keep_last": 2, "keep_every": 30, "best": ["val/loss", "val/acc"]}


def state_at(step: int) -> dict[str, Any]:
    """A small seeded training state: tensors of three dtypes and plain Python values."""
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {
            "weight": torch.randn(8, 4, generator=generator),
            "bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        },
        "optimizer": {"lr": 0.1, "momentum": [0.9, 0.99], "steps": torch.arange(step, step + 3)},
        "step": step,
        "tag": f"step {step}",
    }


def files_at(step: int) -> dict[str, bytes]:
    """A ``save_directory()`` payload: a binary file, nested folders, an empty file."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        "weights.bin": torch.randn(16, generator=generator).numpy().tobytes(),
        "nested/deeper/config.json": json.dumps({"step": step, "layers": [4, 8]}).encode(),
        "nested/empty.txt": b"",
    }


def write_run(mgr: Any, *, epochs: bool = False) -> dict[int, dict[str, float]]:
    """The golden run's calls on an open writable manager; returns the metrics given per saved step.

    Only API that 0.1.0 has, unless ``epochs`` (a later version's ``epoch=``,
    one epoch per 10 steps, so manifests record it). With :data:`POLICY`, step
    45 is saved off the interval as a new best val/acc, step 30 records a NaN,
    step 20's accuracy comes later by ``report()``, and retention deletes
    steps 10, 40 and 50.
    """
    nan = float("nan")
    plan: list[tuple[int, str, dict[str, float]]] = [
        (10, "state", {"val/loss": 0.9, "val/acc": 0.5}),
        (20, "directory", {"val/loss": 0.6}),
        (30, "state", {"val/loss": nan, "val/acc": 0.55}),
        (40, "state", {"val/loss": 0.7, "val/acc": 0.8}),
        (45, "state", {"val/loss": 0.72, "val/acc": 0.9}),
        (50, "state", {"val/loss": 0.65, "val/acc": 0.6}),
        (60, "directory", {"val/loss": 0.8, "val/acc": 0.7}),
        (70, "state", {"val/loss": 0.75}),
    ]
    given: dict[int, dict[str, float]] = {}
    for step, kind, metrics in plan:
        extra = {"epoch": step // 10} if epochs else {}
        if kind == "state":
            saved = mgr.save(step, state_at(step), metrics=metrics, **extra)
        else:
            with mgr.save_directory(step, metrics=metrics, **extra) as folder:
                saved = folder is not None
                if saved:
                    write_files(folder, files_at(step))
        if saved:
            given[step] = dict(metrics)
        if step == 30:  # step 20's evaluation finishes late
            mgr.report(20, {"val/acc": 0.65})
            given[20]["val/acc"] = 0.65
    mgr.wait_until_finished()
    return given


def write_files(folder: str, files: Mapping[str, bytes]) -> None:
    """``relative/posix/path -> bytes`` into a ``save_directory()`` folder, sub-folders included."""
    for path, data in files.items():
        target = Path(folder, *path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def fingerprint(obj: Any, path: str = "") -> dict[str, str]:
    """A nested state flattened to ``key/path -> description``; a tensor by dtype, shape and sha256 of its bytes."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {path: f"tensor {obj.dtype} {list(obj.shape)} sha256:{hashlib.sha256(data).hexdigest()}"}
    if isinstance(obj, Mapping):
        return {k: v for key in sorted(obj) for k, v in fingerprint(obj[key], f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in fingerprint(item, f"{path}/{i}").items()}
    return {path: f"{type(obj).__name__} {obj!r}"}


def file_digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``relative/posix/path -> sha256`` of every file below ``folder``."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def json_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """Non-finite values as strings ("nan"), so documents compare with ``==`` and dump as strict JSON."""
    return {name: value if math.isfinite(value) else str(value) for name, value in sorted(metrics.items())}


def read_back(
    directory: str, policy: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None, read_only: bool = True
) -> dict[str, Any]:
    """What a manager with ``policy`` finds in ``directory``, restores included (public API of every version)."""
    from ckptman import CheckpointManager

    with CheckpointManager(directory, storage_options=dict(storage_options or {}), read_only=read_only, **policy) as mgr:
        kept = mgr.kept_reasons()  # before any restore, which pins its step ("resumed from")
        checkpoints: dict[str, Any] = {}
        for step in mgr.all_steps():
            record = mgr.record(step)
            entry: dict[str, Any] = {
                "name": record.name,
                "kind": record.kind,
                "created": record.created,
                "size": record.size,
                "metrics": json_metrics(mgr.metrics(step)),
                "kept_by": list(kept[step]),
            }
            if record.kind == "state":
                entry["state"] = fingerprint(mgr.restore(step))
            else:
                with tempfile.TemporaryDirectory(prefix="ckptman-golden-") as local:
                    entry["files"] = file_digests(mgr.restore_directory(step, local_dir=local))
            checkpoints[str(step)] = entry
        return {
            "steps": mgr.all_steps(),
            "latest": mgr.latest_step(),
            "best": {name: mgr.best_step(name) for name in policy.get("best") or ()},
            "checkpoints": checkpoints,
        }


def check_saved(found: Mapping[str, Any], given: Mapping[int, Mapping[str, float]]) -> None:
    """Every checkpoint found holds exactly the state, files and metrics that were saved for it."""
    for step_key, entry in found["checkpoints"].items():
        step = int(step_key)
        if entry["metrics"] != json_metrics(given[step]):
            raise AssertionError(f"step {step}: metrics {entry['metrics']} != saved {json_metrics(given[step])}")
        if entry["kind"] == "state":
            if entry["state"] != fingerprint(state_at(step)):
                raise AssertionError(f"step {step}: restored state differs from the saved one")
        else:
            saved = {path: hashlib.sha256(data).hexdigest() for path, data in files_at(step).items()}
            if entry["files"] != saved:
                raise AssertionError(f"step {step}: restored files {entry['files']} != saved {saved}")


def report_as_reader(directory: str, policy: Mapping[str, Any]) -> dict[str, Any]:
    """What the imported ckptman makes of ``directory``: its ``ls --json`` and ``verify``, then :func:`read_back`.

    Settings of ``policy`` that this ckptman lacks (a later version's trigger)
    are left out: they do not change which checkpoints it keeps.
    """
    import ckptman
    from ckptman import CheckpointManager, cli, manifest, state

    report: dict[str, Any] = {"ckptman": ckptman.__file__, "versions": {"manifest": manifest.VERSION, "state": state.VERSION}}
    for command in (["ls", "--json"], ["verify"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*command, directory])
        report[command[0]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    known = inspect.signature(CheckpointManager).parameters
    report["found"] = read_back(directory, {key: value for key, value in policy.items() if key in known})
    return report


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def require_ckptman_0_1_0() -> None:
    """The imported ``ckptman`` must be 0.1.0's sources byte for byte, not this working tree."""
    import ckptman

    package = Path(ckptman.__file__).resolve().parent
    if package == (REPO / "ckptman").resolve():
        sys.exit(f"imported the working tree's ckptman ({package}); run with PYTHONPATH=<0.1.0 sources>, see the docstring")
    for rel in git("ls-tree", "-r", "--name-only", COMMIT, "ckptman").decode().split():
        if (package.parent / rel).read_bytes() != git("show", f"{COMMIT}:{rel}"):
            sys.exit(f"{package.parent / rel} differs from {rel} at {COMMIT} (ckptman 0.1.0)")
    if ckptman.__version__ != "0.1.0":
        sys.exit(f"ckptman {ckptman.__version__} imported, expected 0.1.0")


def main() -> None:
    require_ckptman_0_1_0()
    if OUTPUT.exists():
        sys.exit(f"{OUTPUT} exists; remove it first to regenerate (and commit the new output)")
    from ckptman import CheckpointManager

    run = OUTPUT / "run"
    with CheckpointManager(str(run), **POLICY) as mgr:
        given = write_run(mgr)
    found = read_back(str(run), POLICY)
    check_saved(found, given)
    deleted = sorted(set(given) - set(found["steps"]))
    leftovers = [p.name for p in run.iterdir() if p.name == "ckptman.lock" or p.name.startswith(".ckptman-tmp")]
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    entries = found["checkpoints"].values()
    problems = [
        problem
        for problem, bad in [
            ("retention deleted nothing", not deleted),
            ("no kept checkpoint records a NaN", not any("nan" in e["metrics"].values() for e in entries)),
            ("not both kinds kept", {e["kind"] for e in entries} != {"state", "directory"}),
            (f"left {leftovers}", bool(leftovers)),
            (f"{size} bytes > {MAX_BYTES}", size > MAX_BYTES),
        ]
        if bad
    ]
    if problems:
        sys.exit(f"the run is not the intended golden run: {'; '.join(problems)}")
    expected = {
        "written_by": {"ckptman": "0.1.0", "commit": COMMIT, "torch": torch.__version__},
        "policy": POLICY,
        "saved": sorted(given),
        "deleted_by_retention": deleted,
        "found": found,
    }
    (OUTPUT / "EXPECTED.json").write_text(json.dumps(expected, indent=2, sort_keys=True, allow_nan=False) + "\n")
    print(f"wrote {OUTPUT}: steps {found['steps']}, deleted {deleted}, {size} bytes")


if __name__ == "__main__":
    if sys.argv[1:2] == ["read"]:
        print(json.dumps(report_as_reader(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        main()
