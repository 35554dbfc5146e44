"""The training-like child process of the crash harness (tests/test_crash.py).

Run as ``python tests/crash_child.py '<json config>'``: it opens a
CheckpointManager on ``config["url"]``, resumes from the latest committed
step (checking the restored bytes itself), and then trains: every step it
calls ``save()`` or ``save_directory()`` and sometimes ``report()``, with
state, files and metrics that are pure functions of the step number, so the
parent can recompute what any step must contain.

``python tests/crash_child.py --zygote`` imports torch and ckptman once and
then forks one child per JSON config line read from stdin (importing torch
costs seconds, a fork milliseconds). It answers ``pid <pid>`` when a child
starts and ``exit <pid> <exitcode>`` (negative: killed by that signal) when
it ends. One child at a time.

Progress goes to stdout, one ``os.write`` per line, so the parent knows what
was done before the process died:

    opened <latest step|none>      the manager is open (the lease is held)
    restored <step>                the latest checkpoint restored, bytes verified
    ready
    begin save <step>              about to call save()/save_directory()
    done save <step> <0|1>         it returned (1: committed)
    begin report <step> / done report <step>
    hook <label>                   the fault hook is about to SIGKILL this process
    finished                       the step budget is used up; closed cleanly

Fault injection (``config["kill"]``, test-only, in this process only): the
ckptman functions at the protocol's phase boundaries are wrapped so that the
k-th occurrence of a target SIGKILLs the process right there, ``before``,
``mid`` (local disk: the temporary file of an atomic write exists but is not
renamed yet; payload: part of the bytes are written) or ``after`` it:

    payload   Storage.write_file / write_many (every payload file: state.pt, each directory file)
    commit    ckptman.commit.commit (the manifest that makes a checkpoint exist)
    report    ckptman.commit.rewrite (a manifest replaced with later metrics)
    latest    Storage.write_atomic("latest")
    sidecar   Storage.write_atomic("ckptman.json")
    lock      Storage.replace_if("ckptman.lock") (taking over the previous child's lease; renewals)
    delete    each Storage.remove() inside ckptman.commit.uncommit (retention deletes)

Nothing in ckptman itself knows about this.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

# Shared with the parent: the same constants and pure functions decide what
# each step saves, so the parent can recompute the expected bytes.
POLICY: dict[str, Any] = {
    "save_interval_steps": 2,
    "keep_last": 2,
    "keep_every": 10,
    "best": "val/loss",
    "keep_best": 2,
}
NAME_FORMAT = "step_{step:08d}"
STATE_FLOATS = 3 * 2**19  # 6 MiB of float32: a save takes a noticeable time
SHARD_BYTES = 2 * 2**20
TARGETS = ("payload", "commit", "report", "latest", "sidecar", "lock", "delete")
WHENS = ("before", "mid", "after")


def checkpoint_name(step: int) -> str:
    return NAME_FORMAT.format(step=step)


def is_directory_step(step: int) -> bool:
    return step % 6 == 4


def loss_for(step: int) -> float:
    """An improving trend with large noise: new bests, worse values, NaN and inf now and then."""
    if step % 13 == 7:
        return math.nan
    if step % 29 == 11:
        return math.inf
    noise = random.Random(step * 1_000_003 + 17).random() - 0.5
    return round(3.0 / (1.0 + 0.05 * step) + 0.8 * noise, 6)


def save_metrics_for(step: int) -> dict[str, float] | None:
    """Metrics passed to save(); None for the steps evaluated after the save (see report_for)."""
    return None if report_for(step) is not None else {"val/loss": loss_for(step)}


def report_for(step: int) -> dict[str, float] | None:
    """Metrics reported after the step is committed, or None."""
    if is_directory_step(step) or step % 4 != 2:
        return None
    return {"val/loss": loss_for(step), "val/acc": round(1.0 - loss_for(step) / 4.0, 6)}


def final_metrics_for(step: int) -> dict[str, float]:
    return {**(save_metrics_for(step) or {}), **(report_for(step) or {})}


def state_for(step: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(STATE_FLOATS, generator=generator), "b": torch.arange(step, step + 8)}


def files_for(step: int) -> dict[str, bytes]:
    """The files of a save_directory() step, by relative path."""
    rnd = random.Random(step)
    return {
        "model/shard-0.bin": rnd.randbytes(SHARD_BYTES),
        "model/shard-1.bin": rnd.randbytes(SHARD_BYTES // 2 + step),
        "meta.json": json.dumps({"step": step, "loss": str(loss_for(step))}).encode(),
    }


def states_equal(restored: Any, expected: dict[str, Any]) -> bool:
    import torch

    if not isinstance(restored, dict) or set(restored) != set(expected):
        return False
    for key, value in expected.items():
        got = restored[key]
        if isinstance(value, torch.Tensor):
            if not (isinstance(got, torch.Tensor) and got.dtype == value.dtype and torch.equal(got, value)):
                return False
        elif got != value or type(got) is not type(value):
            return False
    return True


def read_tree(folder: str) -> dict[str, bytes]:
    found = {}
    for here, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return found


# --------------------------------------------------------------------------- #
# Progress and the fault hook
# --------------------------------------------------------------------------- #


def emit(line: str) -> None:
    """One line to stdout in a single write(2), so a kill never leaves half a line."""
    os.write(1, (line + "\n").encode())


def die(label: str) -> None:
    emit(f"hook {label}")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: SIGKILL cannot be caught
    os._exit(99)


class Hook:
    """SIGKILL this process at the k-th occurrence of one target, before / mid / after it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.target: str = spec["target"]
        self.when: str = spec["when"]
        self.k: int = int(spec["k"])
        self.frac: float = float(spec.get("frac", 0.5))
        if self.target not in TARGETS or self.when not in WHENS:
            raise ValueError(f"bad kill spec {spec!r}")
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.local = threading.local()

    def arm(self, target: str) -> str | None:
        """Count one occurrence of ``target``; the 'when' at which to die if it is the chosen one."""
        with self.lock:
            self.counts[target] = n = self.counts.get(target, 0) + 1
        return self.when if target == self.target and n == self.k else None

    def label(self, detail: str = "") -> str:
        return f"{self.target}/{self.when}#{self.k}" + (f" {detail}" if detail else "")

    def install(self) -> None:
        from ckptman import commit as commit_module
        from ckptman import localdisk
        from ckptman import storage as storage_module
        from ckptman.lease import LEASE_NAME
        from ckptman.manifest import MANIFEST_NAME
        from ckptman.naming import LATEST_NAME
        from ckptman.state import SIDECAR_NAME

        hook = self
        Storage = storage_module.Storage
        atomic_targets = {LATEST_NAME: "latest", SIDECAR_NAME: "sidecar"}

        def phase(target: str, call: Callable[[], Any], detail: str = "", mid_ok: bool = True) -> Any:
            when = hook.arm(target)
            if when == "before" or (when == "mid" and not mid_ok):
                die(hook.label(detail))
            previous = getattr(hook.local, "mid", None)
            hook.local.mid = hook.label(detail) if when == "mid" else None
            try:
                result = call()
            finally:
                hook.local.mid = previous
            if when == "after":
                die(hook.label(detail))
            return result

        # -- commit protocol steps (module functions, looked up at call time by the manager)
        original_commit, original_rewrite, original_uncommit = commit_module.commit, commit_module.rewrite, commit_module.uncommit

        def commit(storage: Any, manifest: Any) -> None:
            hook.local.context = "commit"
            try:
                phase("commit", lambda: original_commit(storage, manifest), manifest.name, mid_ok=storage.is_local)
            finally:
                hook.local.context = None

        def rewrite(storage: Any, manifest: Any) -> None:
            hook.local.context = "report"
            try:
                phase("report", lambda: original_rewrite(storage, manifest), manifest.name, mid_ok=storage.is_local)
            finally:
                hook.local.context = None

        def uncommit(storage: Any, name: str) -> None:
            hook.local.context = "delete"
            try:
                original_uncommit(storage, name)
            finally:
                hook.local.context = None

        commit_module.commit, commit_module.rewrite, commit_module.uncommit = commit, rewrite, uncommit

        # -- storage primitives
        original_write_atomic, original_remove, original_write_file = Storage.write_atomic, Storage.remove, Storage.write_file
        original_replace_if = Storage.replace_if
        original_write_temporary = localdisk.write_temporary

        def write_atomic(self: Any, rel: str, data: bytes) -> None:
            target = atomic_targets.get(rel)
            if target is None:  # manifests: attributed by commit()/rewrite() above
                return original_write_atomic(self, rel, data)
            return phase(target, lambda: original_write_atomic(self, rel, data), rel, mid_ok=self.is_local)

        def replace_if(self: Any, rel: str, data: bytes, expected: Any) -> bool:
            if rel != LEASE_NAME:
                return original_replace_if(self, rel, data, expected)
            return phase("lock", lambda: original_replace_if(self, rel, data, expected), rel, mid_ok=self.is_local)

        def write_temporary(folder: str, name: str, data: bytes) -> str:
            tmp = original_write_temporary(folder, name, data)
            label = getattr(hook.local, "mid", None)
            if label is not None and name in (MANIFEST_NAME, LATEST_NAME, SIDECAR_NAME, LEASE_NAME):
                die(label + " (temporary written, not renamed)")
            return tmp

        def remove(self: Any, rel: str, *, recursive: bool = False) -> None:
            if getattr(hook.local, "context", None) != "delete":
                return original_remove(self, rel, recursive=recursive)
            return phase("delete", lambda: original_remove(self, rel, recursive=recursive), rel, mid_ok=False)

        def write_file(self: Any, rel: str, produce: Callable[[Any], Any], stopped: Any = None) -> Any:
            when = hook.arm("payload")
            if when == "before":
                die(hook.label(rel))
            if when == "mid":
                inner = produce

                def produce(target: Any) -> Any:  # the same producer, cut short
                    return inner(_CutShort(target, int(hook.frac * payload_size(rel)), hook.label(rel)))

            result = original_write_file(self, rel, produce, stopped)
            if when == "after":
                die(hook.label(rel))
            return result

        original_write_many = Storage.write_many

        def write_many(self: Any, items: Any, limit: int) -> None:
            """The directory files stored together (one PUT each): a file's PUT is all or nothing, so
            ``mid`` dies as its bytes are read, like ``before``; ``after`` once the batch holding it is stored."""
            stored_then_die: list[str] = []

            def armed(rel: str, load: Callable[[], bytes]) -> Callable[[], bytes]:
                def load_or_die() -> bytes:
                    when = hook.arm("payload")
                    if when in ("before", "mid"):
                        die(hook.label(rel))
                    if when == "after":
                        stored_then_die.append(rel)
                    return load()

                return load_or_die

            original_write_many(self, [(rel, armed(rel, load)) for rel, load in items], limit)
            if stored_then_die:
                die(hook.label(stored_then_die[0]))

        Storage.write_atomic, Storage.remove, Storage.write_file = write_atomic, remove, write_file
        Storage.write_many = write_many
        Storage.replace_if = replace_if
        localdisk.write_temporary = write_temporary


def payload_size(rel: str) -> int:
    """About how many bytes the payload file ``<name>/<path>`` gets."""
    name, _, path = rel.partition("/")
    if path == "state.pt":
        return STATE_FLOATS * 4
    step = int(name.rsplit("_", 1)[1])
    return len(files_for(step).get(path, b"x" * 64))


class _CutShort:
    """A payload target that dies once ``limit`` bytes have been passed on to storage."""

    def __init__(self, target: Any, limit: int, label: str) -> None:
        self.target = target
        self.limit = limit
        self.label = label
        self.written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        limit = self.limit
        if self.written + view.nbytes > limit:
            keep = max(0, limit - self.written)
            self.target.write(view[:keep])
            self.target.flush()
            die(f"{self.label} after {self.written + keep} bytes")
        self.target.write(view)
        self.written += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.target.flush()


# --------------------------------------------------------------------------- #
# The training loop
# --------------------------------------------------------------------------- #


def run(config: dict[str, Any]) -> int:
    from ckptman import CheckpointManager

    if config.get("tmpdir"):
        os.makedirs(config["tmpdir"], exist_ok=True)
        tempfile.tempdir = config["tmpdir"]
    if config.get("kill"):
        Hook(config["kill"]).install()

    mgr = CheckpointManager(
        config["url"],
        storage_options=config.get("storage_options") or {},
        name_format=NAME_FORMAT,
        lease_timeout=config.get("lease_timeout", 2.0),
        **POLICY,
    )
    latest = mgr.latest_step()
    emit(f"opened {'none' if latest is None else latest}")
    if latest is not None:
        if mgr.record(latest).kind == "state":
            restored = mgr.restore()
            if not states_equal(restored, state_for(latest)):
                emit(f"mismatch restored state of step {latest}")
                return 3
        else:
            target = tempfile.mkdtemp(prefix="crash-restore-")
            folder = mgr.restore_directory(latest, local_dir=target)
            if read_tree(folder) != files_for(latest):
                emit(f"mismatch restored files of step {latest}")
                return 3
        emit(f"restored {latest}")
    emit("ready")

    first = 1 if latest is None else latest + 1
    for step in range(first, first + int(config.get("steps", 20))):
        emit(f"begin save {step}")
        if is_directory_step(step):
            with mgr.save_directory(step, metrics=save_metrics_for(step)) as folder:
                if folder is not None:
                    for rel, data in files_for(step).items():
                        path = os.path.join(folder, *rel.split("/"))
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with open(path, "wb") as f:
                            f.write(data)
            committed = folder is not None
        else:
            committed = mgr.save(step, state_for(step), metrics=save_metrics_for(step))
        emit(f"done save {step} {int(committed)}")
        report = report_for(step)
        if committed and report is not None:
            emit(f"begin report {step}")
            mgr.report(step, report)
            emit(f"done report {step}")
    mgr.close()
    emit("finished")
    return 0


def run_guarded(config: dict[str, Any]) -> int:
    try:
        return run(config)
    except BaseException:  # noqa: BLE001 - reported to the parent through the log and the exit code
        traceback.print_exc()
        return 1


# --------------------------------------------------------------------------- #
# Zygote: import once, fork per trial
# --------------------------------------------------------------------------- #


def zygote() -> None:
    import torch  # noqa: F401 - the expensive import, done once

    import ckptman.manager  # noqa: F401

    with contextlib.suppress(ImportError):
        import s3fs  # noqa: F401
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        config = json.loads(line)
        out.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                code = run_guarded(config)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
        out.flush()


def main(argv: list[str]) -> int:
    if argv[1:] == ["--zygote"]:
        zygote()
        return 0
    if len(argv) != 2:
        print(f"usage: {argv[0]} '<json config>' | --zygote", file=sys.stderr)
        return 2
    return run_guarded(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
