"""Crash harness: a training-like child process (tests/crash_child.py) is SIGKILLed at
random moments -- inside payload writes, the manifest write, ``latest``, the sidecar,
lease renewals, retention deletes and ``report()`` rewrites, or after a random delay --
on local disk, on S3 (moto, served from this process, so it survives the kill) and,
fewer times, on SeaweedFS (a second S3 implementation, its own server process).

After every kill a fresh writable manager (taking over the dead child's lease) must:

* list exactly one of the states the commit protocol allows given what the child
  had finished and what it was doing when it died, computed by replaying the
  child's progress through the pure policy (:func:`ckptman.policy.build_policy`)
  -- so only complete checkpoints, nothing committed lost, retention and best
  consistent with the committed history (an interrupted retention may only have
  deleted part of what it was deleting);
* restore the latest checkpoint (and one other) with exactly the bytes saved for
  that step; every committed checkpoint's checksums are verified once, and the
  sizes of all its files after every kill (committed files are never rewritten);
* report the best step the policy computes from the committed records;
* leave no leftovers: every object in the directory belongs to a committed
  checkpoint (manifest + listed files) or is ``ckptman.json`` / ``latest``
  (and the lease until the checking manager closes), and the sidecar and
  ``latest`` agree with the manifests.

Each directory sees a chain of successive children, each resuming where the
previous one died. Children are forked from a "zygote" process that imported
torch once (a fresh interpreter costs ~3 s of imports); set
``CKPTMAN_CRASH_SPAWN=1`` to start every child as a new interpreter instead.

Environment:
    CKPTMAN_CRASH_TRIALS  trials (children killed) per backend, default 32 (SeaweedFS: a quarter)
    CKPTMAN_CRASH_SEED    seed of the kill schedule, default 0; "random" picks one
    CKPTMAN_CRASH_SPAWN   1: a new interpreter per child instead of a fork
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import crash_child as cc
from ckptman import CheckpointManager, CheckpointWarning, DirectoryLockedError, LeaseWarning, jsonfmt
from ckptman.lease import LEASE_NAME
from ckptman.manifest import MANIFEST_NAME, Manifest
from ckptman.naming import LATEST_NAME
from ckptman.policy import build_policy, top_k
from ckptman.record import CheckpointRecord
from ckptman.state import SIDECAR_NAME, SidecarState

CHILD = Path(__file__).with_name("crash_child.py")
TRIALS = int(os.environ.get("CKPTMAN_CRASH_TRIALS", "32"))
_SEED = os.environ.get("CKPTMAN_CRASH_SEED", "0")
SEED = random.randrange(2**32) if _SEED == "random" else int(_SEED)
SPAWN = os.environ.get("CKPTMAN_CRASH_SPAWN", "") not in ("", "0") or not hasattr(os, "fork")

CHAIN = 8  # successive children per directory
CHILD_STEPS = 40  # step budget of one child (it finishes cleanly if never killed)
CHILD_LEASE = 1.5  # the child renews every 0.5 s
PARENT_LEASE = 0.3  # the checking manager's lease
S3_SETTLE = 0.15  # after a death, before looking at S3 (moto may still be serving a request the child sent)
CHILD_TIMEOUT = 120.0  # a child alive this long hangs: a failure
S3_BLOCK = 5 * 2**20  # the child's s3fs block size: the 6 MiB state.pt is a 2-part multipart upload

POLICY = build_policy(save_begin=0, mode=None, **cc.POLICY)
METRIC = POLICY.metrics[0]

# Where the kills go. Weights are relative; k is drawn from 1..KMAX (the k-th occurrence in the child).
WEIGHTS = {"payload": 4, "commit": 2.5, "report": 2, "latest": 1.5, "sidecar": 2, "delete": 3, "lock": 0.5, "random": 5}
KMAX = {"payload": 5, "commit": 3, "report": 2, "latest": 3, "sidecar": 4, "delete": 4, "lock": 2}

State = dict[int, tuple[str, dict[str, float]]]


# --------------------------------------------------------------------------- #
# The oracle: replay the child's progress through the pure policy
# --------------------------------------------------------------------------- #


def records(state: State) -> list[CheckpointRecord]:
    return [CheckpointRecord(s, cc.checkpoint_name(s), m, kind=k) for s, (k, m) in sorted(state.items())]  # type: ignore[arg-type]


def canonical(state: State) -> dict[int, tuple[str, dict[str, Any]]]:
    """Comparable form (NaN == NaN through the JSON encoding)."""
    return {s: (k, jsonfmt.encode_metrics(m)) for s, (k, m) in sorted(state.items())}


@dataclass(frozen=True)
class Stage:
    """A state an operation reaches, less any subset of ``deleting`` (its retention deletes, maybe interrupted).

    Only the set deleted is checked, not the order of the deletes.
    """

    base: State
    deleting: frozenset[int] = frozenset()

    def final(self) -> State:
        return {s: v for s, v in self.base.items() if s not in self.deleting}

    def admits(self, observed: State) -> bool:
        gone = set(self.base) - set(observed)
        if not set(observed) <= set(self.base) or not gone <= self.deleting:
            return False
        return canonical(observed) == canonical({s: self.base[s] for s in observed})

    def __str__(self) -> str:
        return f"{canonical(self.base)}" + (f" less any of {sorted(self.deleting)}" if self.deleting else "")


class Model:
    """The committed state as the child's manager sees it, and the stages each operation passes through."""

    def __init__(self) -> None:
        self.state: State = {}
        self.verified: set[int] = set()  # steps whose checksums the harness checked

    def _retention(self, state: State) -> Stage:
        kept = POLICY.retain(records(state))
        return Stage(state, frozenset(set(state) - set(kept)))

    def save(self, step: int) -> list[Stage]:
        """Every stage a save of ``step`` passes through; it ends at the last one's final state."""
        metrics = cc.save_metrics_for(step) or {}
        if not POLICY.wants(records(self.state), CheckpointRecord(step, cc.checkpoint_name(step), metrics)):
            return [Stage(self.state)]
        kind = "directory" if cc.is_directory_step(step) else "state"
        return [Stage(self.state), self._retention({**self.state, step: (kind, dict(metrics))})]

    def report(self, step: int) -> list[Stage]:
        kind, metrics = self.state[step]
        return [Stage(self.state), self._retention({**self.state, step: (kind, {**metrics, **(cc.report_for(step) or {})})})]

    def replay(self, lines: list[str]) -> tuple[list[Stage], str]:
        """Apply the child's finished operations; the states allowed now and what was in flight."""
        inflight: tuple[str, int] | None = None
        for line in lines:
            word, *rest = line.split()
            if word == "opened":
                latest = max(self.state) if self.state else None
                assert rest == [str(latest) if latest is not None else "none"], f"child opened {rest}, expected latest {latest}"
            elif word == "begin":
                assert inflight is None, f"{line!r} while {inflight} is in flight"
                inflight = (rest[0], int(rest[1]))
            elif word == "done":
                op, step = rest[0], int(rest[1])
                assert inflight == (op, step), f"{line!r} but in flight: {inflight}"
                stages = self.save(step) if op == "save" else self.report(step)
                if op == "save":
                    assert rest[2] == str(int(len(stages) > 1)), f"save({step}) returned {rest[2]}; the policy says {len(stages) > 1}"
                self.state = stages[-1].final()
                inflight = None
            elif word == "mismatch":
                raise AssertionError(f"the child restored wrong bytes: {line}")
        if inflight is None:
            return [Stage(self.state)], "between operations"
        op, step = inflight
        return (self.save(step) if op == "save" else self.report(step)), f"{op} {step}"


# --------------------------------------------------------------------------- #
# Children: forked from a zygote, or spawned
# --------------------------------------------------------------------------- #


class Child:
    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float) -> int: ...


class Zygote:
    """``crash_child.py --zygote``: imports once, forks a child per config."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.messages: queue.Queue[list[str] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.messages.put(line.split())
        self.messages.put(None)

    def next_message(self, timeout: float) -> list[str]:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the zygote said nothing for {timeout}s") from None
        if message is None:
            raise AssertionError(f"the zygote exited with {self.proc.wait()}")
        return message

    def start(self, config: dict[str, Any], log: Path) -> Child:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**config, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        word, pid = self.next_message(60)
        assert word == "pid", (word, pid)
        return ForkedChild(self, int(pid))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class ForkedChild(Child):
    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid
        self.exitcode: int | None = None

    def _take(self, message: list[str]) -> int:
        assert message[:2] == ["exit", str(self.pid)], message
        self.exitcode = int(message[2])
        return self.exitcode

    def poll(self) -> int | None:
        if self.exitcode is None:
            try:
                message = self.zygote.messages.get_nowait()
            except queue.Empty:
                return None
            if message is None:
                raise AssertionError(f"the zygote exited with {self.zygote.proc.wait()}")
            self._take(message)
        return self.exitcode

    def kill(self) -> None:
        # Not reaped until the zygote reports it, so the pid cannot have been reused.
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        if self.exitcode is None:
            self._take(self.zygote.next_message(timeout))
        assert self.exitcode is not None
        return self.exitcode


class SpawnedChild(Child):
    def __init__(self, config: dict[str, Any], log: Path, env: dict[str, str]) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), json.dumps(config)], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


# --------------------------------------------------------------------------- #
# Storage inspection
# --------------------------------------------------------------------------- #


def raw_files(backend: Any) -> dict[str, int]:
    """Every file/object below the run directory (relative path -> size), read fresh."""
    fs, root = backend.fs()
    root = root.rstrip("/")
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {path[len(root) + 1 :]: int(info["size"]) for path, info in fs.find(root, detail=True).items()}


def read_raw(backend: Any, rel: str) -> bytes | None:
    fs, root = backend.fs()
    fs.invalidate_cache()
    try:
        return fs.cat_file(f"{root.rstrip('/')}/{rel}")
    except FileNotFoundError:
        return None


def open_after_death(backend: Any, died: float) -> tuple[CheckpointManager, list[warnings.WarningMessage], bool]:
    """A fresh writable manager on a directory whose writer was just killed; its warnings; whether it had to wait."""

    def open_manager() -> CheckpointManager:
        return CheckpointManager(
            backend.url, storage_options=backend.storage_options, name_format=cc.NAME_FORMAT, lease_timeout=PARENT_LEASE, **cc.POLICY
        )

    waited = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mgr = open_manager()  # ckptman takes over the lease of a dead process on this host at once
        except DirectoryLockedError:  # otherwise once it is older than both lease timeouts
            waited = True
            time.sleep(max(0.0, died + max(CHILD_LEASE, PARENT_LEASE) + 0.2 - time.monotonic()))
            mgr = open_manager()
    return mgr, list(caught), waited


def expected_files(state: State) -> set[str]:
    """What a closed directory holding ``state`` contains: nothing else."""
    names = set()
    if state:
        names |= {SIDECAR_NAME, LATEST_NAME}
    for step, (kind, _metrics) in state.items():
        name = cc.checkpoint_name(step)
        payload = ["state.pt"] if kind == "state" else list(cc.files_for(step))
        names |= {f"{name}/{MANIFEST_NAME}", *(f"{name}/{path}" for path in payload)}
    return names


def describe_debris(files: dict[str, Any]) -> list[str]:
    """What a kill left for the next manager to clean up (statistics only)."""
    folders = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    complete = {rel.split("/", 1)[0] for rel in files if rel.endswith("/" + MANIFEST_NAME)}
    found = []
    if folders - complete:
        found.append("incomplete folder")
    if any(".ckptman-tmp-" in rel for rel in files):
        found.append("temporary file")
    if LEASE_NAME in files:
        found.append("stale lease")
    return found


# --------------------------------------------------------------------------- #
# One directory, many deaths
# --------------------------------------------------------------------------- #


@dataclass
class Stats:
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    inflight: collections.Counter[str] = field(default_factory=collections.Counter)
    debris: collections.Counter[str] = field(default_factory=collections.Counter)
    repaired: collections.Counter[str] = field(default_factory=collections.Counter)
    trials: int = 0
    killed: int = 0
    opened: int = 0  # children that opened the directory (held the lease)
    stalled: int = 0  # children killed before they opened it (a kill timed from the launch, or in the takeover)
    progressed: int = 0  # children that committed at least one new checkpoint before they died
    staging_leaked: int = 0
    missed: list[str] = field(default_factory=list)
    seconds: collections.Counter[str] = field(default_factory=collections.Counter)


def choose_kill(rng: random.Random, local: bool) -> dict[str, Any]:
    target = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    if target == "random":
        if rng.random() < 0.2:  # from the launch: opening, refresh, restore included
            return {"target": "random", "from": "launch", "delay": rng.uniform(0, 4.0 if SPAWN else 0.6)}
        # Within the first ~25 saves of the child (local saves take ~35 ms, S3 ones ~80 ms).
        return {"target": "random", "from": "ready", "delay": rng.uniform(0, 0.9 if local else 2.0)}
    atomic = ["before", "mid", "after"] if local else ["before", "after"]  # S3 writes are one PUT: no "mid"
    whens = {
        "payload": ["mid", "mid", "after"],
        "delete": ["before", "after"],
        "lock": ["mid", "after"] if local else ["after"],
    }.get(target, atomic)
    spec: dict[str, Any] = {"target": target, "when": rng.choice(whens), "k": rng.randint(1, KMAX[target])}
    if target == "payload" and spec["when"] == "mid":
        spec["frac"] = round(rng.uniform(0.02, 0.98), 3)
    return spec


class Harness:
    def __init__(self, backend_name: str, factory: Callable[[str], Any], workdir: Path, seed: int) -> None:
        self.backend_name = backend_name
        self.local = backend_name == "local"
        self.factory = factory
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.stats = Stats()
        self.env = dict(os.environ)
        self.zygote = None if SPAWN else Zygote(self.env)
        self.tmpdir = workdir / "child-tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()

    def run(self, trials: int) -> Stats:
        done = 0
        while done < trials:
            backend = self.factory(self.backend_name)
            model = Model()
            for _ in range(min(CHAIN, trials - done)):
                self.trial(backend, model, done)
                done += 1
            # Passed: free the disk / moto memory (a failed chain's directory stays for inspection).
            fs, root = backend.fs()
            fs.rm(root, recursive=True)
        return self.stats

    # -- one child -------------------------------------------------------------
    def trial(self, backend: Any, model: Model, index: int) -> None:
        kill = choose_kill(self.rng, self.local)
        options = dict(backend.storage_options)
        if backend.protocol == "s3":
            options["default_block_size"] = S3_BLOCK
        config = {
            "url": backend.url,
            "storage_options": options,
            "steps": CHILD_STEPS,
            "lease_timeout": CHILD_LEASE,
            "tmpdir": str(self.tmpdir),
            "kill": kill if kill["target"] != "random" else None,
        }
        log = self.workdir / f"child-{index:04d}.log"
        where = f"trial {index} (CKPTMAN_CRASH_SEED={self.seed}, {backend.name} {backend.url}, kill {kill}, log {log})"

        child: Child = SpawnedChild(config, log, self.env) if self.zygote is None else self.zygote.start(config, log)
        started = time.monotonic()
        deadline = started + kill["delay"] if kill.get("from") == "launch" else None
        killed_by_parent = False
        while child.poll() is None:
            now = time.monotonic()
            if deadline is None and kill.get("from") == "ready" and "ready" in read_lines(log):
                deadline = now + kill["delay"]
            if deadline is not None and now >= deadline:
                child.kill()
                killed_by_parent = True
                break
            if now - started > CHILD_TIMEOUT:
                child.kill()
                child.wait(30)
                raise AssertionError(f"{where}: the child hung\n{log.read_text()}")
            time.sleep(0.005)
        exitcode = child.wait(60)
        died = time.monotonic()
        lines = read_lines(log)
        text = log.read_text()
        hooks = [line for line in lines if line.startswith("hook ")]

        if hooks:
            assert exitcode == -signal.SIGKILL, f"{where}: hook fired but exit code {exitcode}\n{text}"
        elif exitcode == -signal.SIGKILL:
            assert killed_by_parent, f"{where}: SIGKILLed by nobody we know\n{text}"
        else:
            assert exitcode == 0 and lines[-1:] == ["finished"], f"{where}: the child failed (exit {exitcode})\n{text}"

        self.stats.trials += 1
        self.count_progress(lines, kill, where, text)
        try:
            allowed, inflight = model.replay(lines)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}\n{text}") from exc
        if exitcode == -signal.SIGKILL:
            self.stats.killed += 1
            if hooks:
                label = hooks[0].split()[1].split("#")[0]
            else:
                label = f"random/{inflight.split()[0] if inflight != 'between operations' else 'between'}"
                if "ready" not in lines:
                    label = "random/startup"
            self.stats.kills[label] += 1
            self.stats.inflight[inflight.split()[0]] += 1
        else:
            missed = kill["target"] + (f"/{kill['when']}#{kill['k']}" if "k" in kill else f" after {kill['delay']:.2f}s")
            self.stats.kills["none (finished its steps)"] += 1
            self.stats.missed.append(missed)
        self.stats.seconds["children"] += died - started
        self.check(backend, model, allowed, died, where, text)
        self.stats.seconds["checks"] += time.monotonic() - died

    def count_progress(self, lines: list[str], kill: dict[str, Any], where: str, text: str) -> None:
        """A child that cannot open the directory makes every later check vacuous: count it, and fail
        unless the kill was one that may land before the open: timed from the launch, or inside the
        lease's conditional replace (taking over the previous child's lease is part of opening)."""
        if any(line.startswith("opened ") for line in lines):
            self.stats.opened += 1
        else:
            early = kill.get("from") == "launch" or kill["target"] == "lock"
            assert early, f"{where}: the child never opened the directory\n{text}"
            self.stats.stalled += 1
        if any(line.startswith("done save ") and line.endswith(" 1") for line in lines):
            self.stats.progressed += 1

    # -- the fresh manager's view ------------------------------------------------
    def check(
        self, backend: Any, model: Model, allowed: list[Stage], died: float, where: str, log: str
    ) -> None:
        # Object stores: let the server finish any request the child had sent in full before it died.
        time.sleep(max(0.0, died + (S3_SETTLE if backend.has_buckets else 0.0) - time.monotonic()))
        before = raw_files(backend)
        debris = describe_debris(before)
        for item in debris:
            self.stats.debris[item] += 1
        sidecar_before, latest_before = read_raw(backend, SIDECAR_NAME), read_raw(backend, LATEST_NAME)

        context = f"{where}\nchild log:\n{log}\nfiles before the fresh manager opened:\n" + "\n".join(sorted(before))

        mgr, caught, waited = open_after_death(backend, died)
        if waited:
            self.stats.repaired["waited for the lease to expire"] += 1
        try:
            lease_warnings = [w for w in caught if issubclass(w.category, LeaseWarning)]
            if LEASE_NAME in before:
                assert lease_warnings, f"the dead child's lease was taken over without a LeaseWarning\n{context}"
            else:
                assert not lease_warnings, f"unexpected {lease_warnings[0].message}\n{context}"
            for w in caught:
                assert issubclass(w.category, (LeaseWarning, CheckpointWarning)), f"unexpected warning {w}\n{context}"
                assert "ignoring checkpoint folder" not in str(w.message), f"{w.message}\n{context}"

            observed: State = {s: (mgr.record(s).kind, dict(mgr.metrics(s))) for s in mgr.all_steps()}
            assert any(stage.admits(observed) for stage in allowed), (
                f"the directory holds {canonical(observed)}; after what the child did, only these states are possible:\n"
                + "\n".join(f"  {stage}" for stage in allowed)
                + f"\n{context}"
            )
            if canonical(observed) not in (canonical(allowed[0].base), canonical(allowed[-1].final())):
                self.stats.repaired["interrupted mid-operation"] += 1
            model.state = state = observed

            self.check_contents(mgr, model, state, context)
            self.check_metadata(backend, mgr, state, context)
            if {"incomplete folder", "temporary file"} & set(debris):
                self.stats.repaired["debris removed"] += 1
            if sidecar_before != read_raw(backend, SIDECAR_NAME):
                self.stats.repaired["sidecar rewritten"] += 1
            if latest_before != read_raw(backend, LATEST_NAME):
                self.stats.repaired["latest rewritten"] += 1
        finally:
            mgr.close()
        # After close(): no lease renewal (with its temporary file) can be in progress.
        self.check_leftovers(backend, state, context)
        leaked = [p for p in self.tmpdir.iterdir()]
        self.stats.staging_leaked += sum(1 for p in leaked if p.name.startswith("ckptman-"))
        for path in leaked:
            shutil.rmtree(path, ignore_errors=True)

    def check_contents(self, mgr: CheckpointManager, model: Model, state: State, context: str) -> None:
        # Committed files are never written again: checksum each checkpoint once (here, after its
        # first kill), then its file sizes every time (check_leftovers) and a random one in full below.
        model.verified &= set(state)
        for step in sorted(set(state) - model.verified):
            report = mgr.verify(step)
            assert report.ok, "\n".join(report.lines()) + f"\n{context}"
            model.verified.add(step)
        if not state:
            assert mgr.latest_step() is None
            return
        latest = max(state)
        assert mgr.latest_step() == latest
        steps = [latest]
        older = sorted(set(state) - {latest})
        if older:
            steps.append(self.rng.choice(older))
        for step in steps:
            kind = state[step][0]
            if kind == "state":
                restored = mgr.restore() if step == latest else mgr.restore(step)
                assert cc.states_equal(restored, cc.state_for(step)), f"restore({step}) returned other bytes\n{context}"
            else:
                target = self.workdir / f"restore-{step}"
                shutil.rmtree(target, ignore_errors=True)
                folder = mgr.restore_directory(step, local_dir=target)
                got = cc.read_tree(folder)
                assert got == cc.files_for(step), f"restore_directory({step}) returned {sorted(got)} / other bytes\n{context}"
                shutil.rmtree(target)

        best = POLICY.best(records(state))
        assert mgr.best_step() == (best.step if best else None), f"best_step() {mgr.best_step()} != {best}\n{context}"

    def check_metadata(self, backend: Any, mgr: CheckpointManager, state: State, context: str) -> None:
        raw = read_raw(backend, SIDECAR_NAME)
        latest = read_raw(backend, LATEST_NAME)
        if not state:
            assert raw is None and latest is None, f"sidecar/latest without any checkpoint\n{context}"
            return
        assert raw is not None and latest is not None, f"sidecar or latest missing after the fresh manager opened\n{context}"
        sidecar = SidecarState.from_bytes(raw, SIDECAR_NAME)
        listed: State = {r.step: (r.kind, dict(r.metrics)) for r in sidecar.checkpoints}
        assert canonical(listed) == canonical(state), f"sidecar lists {canonical(listed)}\n{context}"
        assert {r.step: r.name for r in sidecar.checkpoints} == {s: cc.checkpoint_name(s) for s in state}
        for record in sidecar.checkpoints:
            assert record.size == mgr.record(record.step).size, f"sidecar size of {record.step}\n{context}"
        assert sidecar.latest == cc.checkpoint_name(max(state)), f"sidecar latest {sidecar.latest}\n{context}"
        assert latest.decode().strip() == cc.checkpoint_name(max(state)), f"latest says {latest!r}\n{context}"
        best_steps = [r.step for r in top_k(records(state), METRIC, POLICY.keep_best)]
        assert sidecar.best == {METRIC.name: {"mode": METRIC.mode, "steps": best_steps}}, f"sidecar best {sidecar.best}\n{context}"
        assert mgr.state_dict() == sidecar.to_dict()

    def check_leftovers(self, backend: Any, state: State, context: str) -> None:
        """Exactly the committed files plus metadata remain (no lease: the checking manager closed)."""
        after = raw_files(backend)
        expected = expected_files(state)
        extra = sorted(set(after) - expected)
        assert not extra, f"leftovers after the fresh manager opened: {extra}\n{context}"
        missing = sorted(expected - set(after))
        assert not missing, f"files of committed checkpoints missing: {missing}\n{context}"
        for step in state:
            name = cc.checkpoint_name(step)
            raw = read_raw(backend, f"{name}/{MANIFEST_NAME}")
            assert raw is not None
            for entry in Manifest.from_bytes(raw, name).files:
                size = after[f"{name}/{entry.path}"]
                assert size == entry.size, f"{name}/{entry.path} has {size} bytes, its manifest says {entry.size}\n{context}"


def read_lines(log: Path) -> list[str]:
    """Complete lines of the child's log (a line is written by one write(2), so only the last can be partial)."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line]


def summary(name: str, seed: int, stats: Stats, seconds: float) -> str:
    out = [
        (
            f"crash harness [{name}] seed {seed}: {stats.trials} trials, {stats.killed} SIGKILLs in {seconds:.1f}s"
            f" ({'spawned interpreters' if SPAWN else 'forked from a zygote'})"
        )
    ]
    out.append(f"  children: {stats.opened} opened the directory, {stats.stalled} were killed before, {stats.progressed} committed")
    out.append("  kills by phase: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.kills.items())))
    out.append("  operation in flight: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.inflight.items())))
    out.append("  debris found: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.debris.items())))
    out.append("  repaired on open: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.repaired.items())))
    out.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stats.seconds.items())))
    out.append(f"  kills planned but not reached: {stats.missed}")
    out.append(f"  save_directory staging folders leaked by kills: {stats.staging_leaked}")
    return "\n".join(out)


# SeaweedFS runs a reduced count: a second S3 implementation, a separate server process.
TRIALS_PER_BACKEND = {"local": TRIALS, "s3": TRIALS, "seaweedfs": max(1, TRIALS // 4)}


@pytest.mark.parametrize("backend_name", list(TRIALS_PER_BACKEND))
def test_sigkill_at_random_moments_leaves_a_recoverable_directory(
    backend_name: str, backend_factory: Callable[[str], Any], tmp_path: Path
) -> None:
    trials = TRIALS_PER_BACKEND[backend_name]
    harness = Harness(backend_name, backend_factory, tmp_path, SEED)
    backend_factory(backend_name)  # start the server (and set its credentials) before the children start
    started = time.monotonic()
    try:
        stats = harness.run(trials)
    finally:
        harness.close()
    report = summary(backend_name, SEED, stats, time.monotonic() - started)
    print("\n" + report)
    # The harness must actually kill: most trials end in a SIGKILL, in many different phases.
    assert stats.killed >= trials * 2 // 3, report
    assert len([k for k in stats.kills if not k.startswith("none")]) >= min(6, trials // 3), report
    # ... and the children must get somewhere between the kills: a run that cannot resume fails here.
    assert stats.opened >= trials * 3 // 4 and stats.progressed >= trials // 2, report


def test_killed_report_leaves_no_temporary_in_the_checkpoint_folder(local_backend: Any, tmp_path: Path) -> None:
    """Found by the harness: a kill inside report()'s manifest rewrite on local disk left
    '<checkpoint>/.ckptman-tmp-<hex>-ckptman-manifest.json' in a committed folder, which
    refresh() did not clean (it looked for temporaries at the top level only)."""
    config = {
        "url": local_backend.url,
        "steps": 4,
        "tmpdir": str(tmp_path / "child-tmp"),
        "lease_timeout": CHILD_LEASE,
        "kill": {"target": "report", "when": "mid", "k": 1},
    }
    child = SpawnedChild(config, tmp_path / "child.log", dict(os.environ))
    assert child.wait(120) == -signal.SIGKILL, (tmp_path / "child.log").read_text()
    died = time.monotonic()
    stray = [rel for rel in raw_files(local_backend) if ".ckptman-tmp-" in rel]
    assert [rel.split("/")[0] for rel in stray] == ["step_00000002"], stray  # the kill left one, in a committed folder
    mgr, caught, _ = open_after_death(local_backend, died)
    with mgr:
        assert [w for w in caught if issubclass(w.category, LeaseWarning)]
        assert mgr.all_steps() == [1, 2]
        leftovers = [rel for rel in raw_files(local_backend) if ".ckptman-tmp-" in rel]
        assert leftovers == [], leftovers
