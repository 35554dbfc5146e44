"""The object-store benchmarks of bench.py: every S3 transfer ckptman does, against the s3fs call a user would make.

Run on two servers, each in its own process (``_s3server.py``):

* ``s3``: moto behind tests/netproxy.py's NetProxy (latency and a bandwidth cap
  per connection: a simulated wide-area link, where concurrency pays);
* ``seaweedfs``: a real S3 server (SeaweedFS's gateway, filer and volume
  server in one ``weed server``) on 127.0.0.1, no link simulation: there the
  server's CPU is what limits every client.

For each: a directory checkpoint up (goal 1) and back (goal 2), a state dict
saved (goal 3) and restored (goal 4), many small files (goal 5); ``scale``
repeats the state transfers at 64 MiB to 1 GiB (goal 6).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Iterator

from _common import BUCKET, HERE, MiB, make_state, s3_options
from _driver import Config, Contender, Group, Row, Scratch, _version, log, manager, ratio_at_most, rm, run_interleaved

from ckptman.multipart import IN_FLIGHT, PART_SIZE
from ckptman.storage import DEFAULT_IN_FLIGHT, sized_connection_pool

#: the botocore pool ckptman opens for its default max_concurrency (botocore's own default is 10)
POOLED = sized_connection_pool("s3://bucket", {}, DEFAULT_IN_FLIGHT)["config_kwargs"]["max_pool_connections"]
POOLED_PUT = f"  s3fs put, pool of {POOLED}"
POOLED_GET = f"  s3fs get, pool of {POOLED}"
PUT_SERIALIZED = "  s3fs put of the bytes, serialized before"
BYTES_ALONE = f"  the bytes alone, {PART_SIZE // MiB} MiB parts {IN_FLIGHT} at once"


class ChildServer:
    """bench/_s3server.py in a subprocess (moto, SeaweedFS or the proxy); stopped by closing its stdin."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_s3server.py"), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.stop()
            raise RuntimeError(f"_s3server.py {' '.join(args)} did not start (exit code {self.proc.returncode})")
        self.port: int = json.loads(line)["port"]

    def ask(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{what}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stats(self) -> dict[str, Any]:
        return self.ask("stats")

    def stop(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()


class Server:
    """One S3 endpoint for the contenders (``opts``), and a direct client for checks and cleanup."""

    def __init__(self, name: str, cfg: Config) -> None:
        import fsspec

        self.name, self.proxy, self.weed = name, None, None
        self.children: list[ChildServer] = []
        self.cpu: dict[str, list[tuple[float, float]]] = {}  # label -> (client, server) CPU seconds per run
        if name == "s3":
            moto = self._start(["moto"])
            self.proxy = self._start(
                ["proxy", "--upstream-port", str(moto.port), "--latency", str(cfg.latency), "--bandwidth", str(cfg.bandwidth)]
            )
            direct_port, port = moto.port, self.proxy.port
        else:
            self.weed = self._start(["seaweedfs", "--dir", cfg.base])
            direct_port = port = self.weed.port
        self.direct_opts = s3_options(f"http://127.0.0.1:{direct_port}")
        self.direct = fsspec.filesystem("s3", skip_instance_cache=True, **self.direct_opts)
        if name == "s3":
            self.direct.mkdir(BUCKET)
        self.opts = s3_options(f"http://127.0.0.1:{port}")
        self.fs = fsspec.filesystem("s3", **self.opts)  # what a user gets for these options: botocore's pool of 10
        # s3fs with the connection pool ckptman opens for max_concurrency=16 (storage.sized_connection_pool)
        self.pooled = fsspec.filesystem("s3", **{**self.opts, "config_kwargs": {"max_pool_connections": POOLED}})

    def _start(self, args: list[str]) -> ChildServer:
        child = ChildServer(args)
        self.children.append(child)
        return child

    @property
    def label(self) -> str:
        return "moto+proxy" if self.name == "s3" else "SeaweedFS"

    def prefix(self) -> str:
        return f"{BUCKET}/{uuid.uuid4().hex}"

    def remove(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.direct.rm(prefix, recursive=True)
        self.direct.invalidate_cache()
        self.fs.invalidate_cache()
        self.pooled.invalidate_cache()

    @contextlib.contextmanager
    def metered(self, label: str) -> Iterator[None]:
        """Record the client's and (SeaweedFS) the server's CPU seconds over the timed region."""
        if self.weed is None:
            yield
            return
        client, server = os.times(), self.weed.ask("cpu")["cpu"]
        yield
        after = os.times()
        used = after.user - client.user + after.system - client.system
        self.cpu.setdefault(label, []).append((used, self.weed.ask("cpu")["cpu"] - server))

    def timed(self, meter: str, call: Callable[[], object]) -> float:
        """Seconds ``call()`` took, its client and server CPU recorded under ``meter`` (:meth:`metered`)."""
        with self.metered(meter):
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0

    def settle(self, idle_share: float = 0.05, window: float = 0.25, longest: float = 20.0) -> None:
        """Wait (untimed) until SeaweedFS uses under ``idle_share`` of a core: the deletes and volume
        housekeeping one measurement leaves must not run into the next. No-op on moto (no meter)."""
        if self.weed is None:
            return
        deadline = time.monotonic() + longest
        before = self.weed.ask("cpu")["cpu"]
        while time.monotonic() < deadline:
            time.sleep(window)
            now = self.weed.ask("cpu")["cpu"]
            if now - before < idle_share * window:
                return
            before = now

    def cpu_note(self, labels: list[str]) -> str | None:
        """'client / server CPU s per run' of the labels measured, medians; None without a server meter."""
        import statistics

        parts = [
            f"{label} {statistics.median(c for c, _ in runs):.2f} / {statistics.median(s for _, s in runs):.2f} s"
            for label in labels
            if (runs := self.cpu.get(label))
        ]
        return "CPU per run, client / server process (median): " + "; ".join(parts) if parts else None

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


@contextlib.contextmanager
def s3_environment() -> Iterator[None]:
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    yield


def write_files(folder: str, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs):
        with open(os.path.join(folder, f"shard_{i:03d}.bin"), "wb") as f:
            f.write(blob)


class OpenManager:
    """A CheckpointManager on the server kept open over all repeats (as in training); each save deleted again."""

    def __init__(self, server: Server, **kwargs: Any) -> None:
        self.server, self.prefix, self.step, self.mgr = server, server.prefix(), 0, None
        self.kwargs = kwargs

    def open(self) -> Any:
        self.mgr = manager(f"s3://{self.prefix}/run", storage_options=self.server.opts, **self.kwargs)
        return self.mgr

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def close(self) -> None:
        try:
            if self.mgr is not None:
                self.mgr.close()
        finally:
            self.server.remove(self.prefix)


def _group(key: str, server: Server, title: str) -> Group:
    server.cpu.clear()
    return Group(key, f"{title} ({server.label})")


def _cpu_note(group: Group, server: Server, labels: list[str]) -> None:
    note = server.cpu_note(labels)
    if note:
        group.notes.append(note)


# --------------------------------------------------------------------------- #
# goals 1 and 5: a directory checkpoint up
# --------------------------------------------------------------------------- #


def directory_upload(cfg: Config, server: Server, key: str, count: int, size: int, title: str) -> Group:
    group = _group(key, server, title)
    group.rows = [
        Row("s3fs put", baseline=True),
        Row("ckptman upload+commit", goal="<= 1.00x", check=ratio_at_most(1.00)),
        Row("  ckptman whole block"),
        Row(POOLED_PUT),
    ]
    if server.proxy is not None:
        group.rows.append(Row("  s3fs put, no proxy"))
    scratch = Scratch(cfg.base, "upload")
    blobs = [os.urandom(size) for _ in range(count)]
    tiny = [os.urandom(1024)]
    requests: dict[str, str] = {}

    def counted(label: str, call: Callable[[], None]) -> None:
        proxy = server.proxy
        if proxy is None or label in requests:
            call()
            return
        before = proxy.stats()
        call()
        after = proxy.stats()
        requests[label] = f"{after['requests'] - before['requests']} requests"

    def put(data: list[bytes], fs: Any, label: str) -> dict[str, float]:
        src, prefix = scratch.new("src"), server.prefix()
        write_files(src, data)
        timing: dict[str, float] = {}

        def call() -> None:
            timing[label] = server.timed(label if len(data) > 1 else "warm-up", lambda: fs.put(src + "/", prefix, recursive=True))

        try:
            counted(label, call) if len(data) > 1 else call()
            return timing
        finally:
            rm(src)
            server.remove(prefix)

    ck = OpenManager(server)

    def ckptman_dir(data: list[bytes]) -> dict[str, float]:
        mgr, step = ck.mgr, ck.next_step()
        timing: dict[str, float] = {}

        def call() -> None:
            t0 = time.perf_counter()
            with mgr.save_directory(step) as folder:
                write_files(folder, data)
                meter = server.metered("ckptman upload+commit" if len(data) > 1 else "warm-up")
                meter.__enter__()
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            meter.__exit__(None, None, None)
            timing.update({"ckptman upload+commit": t2 - t1, "  ckptman whole block": t2 - t0})

        counted("ckptman", call) if len(data) > 1 else call()
        if mgr.all_steps() != [step]:
            raise RuntimeError(f"committed steps are {mgr.all_steps()}, not [{step}]")
        mgr.delete(step)
        return timing

    contenders = [
        Contender(["s3fs put"], lambda rep: put(blobs, server.fs, "s3fs put"), setup=lambda: put(tiny, server.fs, "s3fs put")),
        Contender(
            ["ckptman upload+commit", "  ckptman whole block"],
            lambda rep: ckptman_dir(blobs),
            setup=lambda: (ck.open(), ckptman_dir(tiny)) and None,
            teardown=ck.close,
        ),
    ]
    contenders.append(Contender([POOLED_PUT], lambda rep: put(blobs, server.pooled, POOLED_PUT), setup=lambda: put(tiny, server.pooled, POOLED_PUT)))
    if server.proxy is not None:
        label = "  s3fs put, no proxy"
        contenders.append(Contender([label], lambda rep: put(blobs, server.direct, label), setup=lambda: put(tiny, server.direct, label)))
    try:
        run_interleaved(group, contenders, cfg.repeats, server.settle)
    finally:
        scratch.clean()
    _cpu_note(group, server, ["s3fs put", "ckptman upload+commit"])
    group.notes.append(
        f"{count} files of {size / MiB:g} MiB; s3fs put = fs.put(local_dir, prefix, recursive=True) of files written "
        "(untimed) just before; upload+commit = from the end of writing the same files inside "
        "`with mgr.save_directory(step)` to its exit (upload with xxh3 checksums, manifest, 'latest', sidecar); "
        f"whole block adds mkdtemp and the local writes; '{POOLED_PUT.strip()}' = the same s3fs put with "
        f"config_kwargs max_pool_connections={POOLED}, the pool ckptman opens for its default max_concurrency=16 "
        "(botocore's default is 10)"
        + ("; 'no proxy' goes straight to moto: the ceiling of this machine's loopback S3" if server.proxy else "")
        + (f"; requests per save through the proxy: {', '.join(f'{k} {v}' for k, v in requests.items())}" if requests else "")
    )
    return group


# --------------------------------------------------------------------------- #
# goal 2: a directory checkpoint back
# --------------------------------------------------------------------------- #


def directory_restore(cfg: Config, server: Server, key: str) -> Group:
    count, size = cfg.dir_files, cfg.dir_file_mib * MiB
    group = _group(key, server, f"restore dir {count}x{cfg.dir_file_mib} MiB")
    group.rows = [
        Row("s3fs get", baseline=True),
        Row("ckptman restore_directory", goal="<= 1.00x", check=ratio_at_most(1.00)),
        Row(POOLED_GET),
    ]
    scratch = Scratch(cfg.base, "download")
    blobs = [os.urandom(size) for _ in range(count)]
    plain = server.prefix()
    src = scratch.new("src")
    write_files(src, blobs)
    server.fs.put(src + "/", plain, recursive=True)
    names = sorted(os.listdir(src))
    ck = OpenManager(server)

    def timed(label: str, fetch: Callable[[str], None]) -> Callable[[int], dict[str, float]]:
        """A measurement of ``fetch(local_dir)`` into a new folder, its files counted, removed afterwards (untimed)."""

        def measure(rep: int) -> dict[str, float]:
            target = scratch.new("get", create=False)
            try:
                elapsed = server.timed(label.strip(), lambda: fetch(target))
                if sorted(os.listdir(target)) != names:
                    raise RuntimeError(f"{label.strip()} fetched {os.listdir(target)}")
                return {label: elapsed}
            finally:
                rm(target)

        return measure

    def setup() -> None:
        mgr = ck.open()
        with mgr.save_directory(1) as folder:
            write_files(folder, blobs)

    try:
        contenders = [
            Contender(["s3fs get"], timed("s3fs get", lambda target: server.fs.get(plain + "/", target + "/", recursive=True))),
            Contender(
                ["ckptman restore_directory"],
                timed("ckptman restore_directory", lambda target: ck.mgr.restore_directory(1, local_dir=target)),
                setup,
                ck.close,
            ),
            Contender([POOLED_GET], timed(POOLED_GET, lambda target: server.pooled.get(plain + "/", target + "/", recursive=True))),
        ]
        run_interleaved(group, contenders, cfg.repeats, server.settle)
    finally:
        scratch.clean()
        server.remove(plain)
    _cpu_note(group, server, ["s3fs get", "ckptman restore_directory"])
    group.notes.append(
        "s3fs get = fs.get(prefix, local_dir, recursive=True), unverified; ckptman = mgr.restore_directory(step, "
        "local_dir=...), every file checked against its size and xxh3 checksum while it streams; each into a new "
        f"folder; '{POOLED_GET.strip()}' = the same s3fs get with "
        f"config_kwargs max_pool_connections={POOLED}, the pool ckptman opens for its default max_concurrency="
        f"{DEFAULT_IN_FLIGHT} (botocore's default is 10). s3fs's GETs have botocore compute the CRC32 of every "
        "body (response_checksum_validation='when_supported', its default); ckptman's payload GETs skip it, their "
        "bytes being checked against the manifest's xxh3 (ckptman.transport_checksum)"
    )
    return group


# --------------------------------------------------------------------------- #
# goals 3 and 4: a state dict saved and restored
# --------------------------------------------------------------------------- #


def state_save(cfg: Config, server: Server, key: str, mib: int, repeats: int) -> Group:
    import torch

    group = _group(key, server, f"save {mib} MiB state")
    group.rows = [
        Row("torch.save into s3fs file", baseline=True),
        Row("ckptman save", goal="<= 0.75x", check=ratio_at_most(0.75)),
        Row("ckptman async_save, blocked", goal="<= 0.25x", check=ratio_at_most(0.25)),
        Row("  async until committed"),
        Row(PUT_SERIALIZED),
        Row(BYTES_ALONE),
    ]
    state, tiny = make_state(mib, cfg.n_tensors), make_state(1, 2, seed=1)
    ck, background = OpenManager(server), OpenManager(server, async_save=True)
    serialized = Scratch(cfg.base, "serialized")
    local_copy = os.path.join(serialized.new("state"), "state.pt")
    torch.save(state, local_copy)
    with open(local_copy, "rb") as f:
        parts = list(iter(lambda: f.read(PART_SIZE), b""))  # the same bytes, in memory, cut as ckptman cuts them

    def timed_upload(label: str, meter: str, upload: Callable[[str], None]) -> Callable[[int], dict[str, float]]:
        """A measurement of ``upload(path)`` storing the serialized state at a fresh path (removed afterwards, untimed)."""

        def measure(rep: int) -> dict[str, float]:
            prefix = server.prefix()
            try:
                return {label: server.timed(meter, lambda: upload(f"{prefix}/state.pt"))}
            finally:
                server.remove(prefix)

        return measure

    def plain(s: dict) -> dict[str, float]:
        prefix = server.prefix()

        def write() -> None:
            with server.fs.open(f"{prefix}/state.pt", "wb") as f:
                torch.save(s, f)

        try:
            return {"torch.save into s3fs file": server.timed("torch.save into s3fs file" if s is state else "warm-up", write)}
        finally:
            server.remove(prefix)

    def save(s: dict) -> dict[str, float]:
        step = ck.next_step()
        saved: list[bool] = []
        elapsed = server.timed("ckptman save" if s is state else "warm-up", lambda: saved.append(ck.mgr.save(step, s, force=True)))
        _check_committed(ck, step, saved[0])
        return {"ckptman save": elapsed}

    def save_async(s: dict) -> dict[str, float]:
        step = background.next_step()
        t0 = time.perf_counter()
        ok = background.mgr.save(step, s, force=True)
        t1 = time.perf_counter()
        background.mgr.wait_until_finished()
        t2 = time.perf_counter()
        _check_committed(background, step, ok)
        return {"ckptman async_save, blocked": t1 - t0, "  async until committed": t2 - t0}

    contenders = [
        Contender(["torch.save into s3fs file"], lambda rep: plain(state), setup=lambda: plain(tiny) and None),
        Contender(["ckptman save"], lambda rep: save(state), setup=lambda: (ck.open(), save(tiny)) and None, teardown=ck.close),
        Contender(
            ["ckptman async_save, blocked", "  async until committed"],
            lambda rep: save_async(state),
            setup=lambda: (background.open(), save_async(tiny)) and None,
            teardown=background.close,
        ),
        Contender([PUT_SERIALIZED], timed_upload(PUT_SERIALIZED, "upload only", lambda path: server.fs.put_file(local_copy, path))),
        Contender([BYTES_ALONE], timed_upload(BYTES_ALONE, "bytes alone", lambda path: upload_parts(server.pooled, path, parts, IN_FLIGHT))),
    ]
    try:
        run_interleaved(group, contenders, repeats, server.settle)
    finally:
        serialized.clean()
    _cpu_note(group, server, ["torch.save into s3fs file", "ckptman save", "upload only", "bytes alone"])
    saved, alone = group.row("ckptman save").median, group.row(BYTES_ALONE).median
    if saved and alone:
        group.notes.append(f"ckptman save took {saved / alone:.2f}x the time of '{BYTES_ALONE.strip()}'")
    group.notes.append(
        f"{cfg.n_tensors} float32 tensors; torch.save(state, f) into fs.open(path, 'wb') (s3fs's buffered file: "
        "50 MiB parts, each uploaded while serialization waits); ckptman save = mgr.save(step, state) to commit: "
        "torch.save streamed through the xxh3 hash into a multipart upload whose 8 MiB parts go up concurrently "
        "(4 at a time) while serialization goes on, then manifest, 'latest', sidecar; async_save = the same with "
        "CheckpointManager(..., async_save=True): blocked until save() returns (the host-memory snapshot), each "
        "waited for (wait_until_finished) before the next measurement; 's3fs put of the bytes' = fs.put_file of the "
        "same state serialized to local disk beforehand (s3fs's concurrent multipart upload, 50 MiB parts); "
        f"'{BYTES_ALONE.strip()}' = the plainest client: the same serialized bytes, already in memory as "
        f"{PART_SIZE // MiB} MiB parts, uploaded through s3fs's botocore client (create, {IN_FLIGHT} UploadPart "
        "requests at a time, complete) with nothing else to do: no serialization, no hashing, no commit. No save "
        "of this state can be faster; on SeaweedFS, where the server's CPU is the limit, it is the ceiling"
    )
    return group


def upload_parts(fs: Any, path: str, parts: list[bytes], at_once: int) -> None:
    """A multipart upload of bytes already cut into parts, ``at_once`` parts in flight: the S3 API and nothing else."""
    import asyncio

    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def upload() -> None:
        upload_id = (await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"]
        gate = asyncio.Semaphore(at_once)

        async def send(number: int, body: bytes) -> dict[str, Any]:
            async with gate:
                out = await fs._call_s3(
                    "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
            return {"PartNumber": number, "ETag": out["ETag"]}

        done = await asyncio.gather(*(send(number, body) for number, body in enumerate(parts, start=1)))
        await fs._call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(done)}
        )

    sync(fs.loop, upload)


def _check_committed(ck: OpenManager, step: int, ok: bool) -> None:
    """The save really committed (and only it), then it is deleted again, untimed."""
    if not ok or ck.mgr.all_steps() != [step]:
        raise RuntimeError(f"save({step}) returned {ok}; committed steps {ck.mgr.all_steps()}")
    ck.mgr.delete(step)


def state_restore(cfg: Config, server: Server, key: str, mib: int, repeats: int) -> Group:
    import torch

    group = _group(key, server, f"restore {mib} MiB state + copy into model")
    group.rows = [
        Row("s3fs get_file + torch.load", baseline=True),
        Row("ckptman restore", goal="<= 1.00x", check=ratio_at_most(1.00)),
    ]
    state = make_state(mib, cfg.n_tensors)
    model = {k: torch.empty_like(v) for k, v in state.items()}
    scratch = Scratch(cfg.base, "state-restore")
    plain = server.prefix()
    with server.fs.open(f"{plain}/state.pt", "wb") as f:
        torch.save(state, f)
    ck = OpenManager(server)

    def copy_into_model(loaded: dict) -> None:
        for k, target in model.items():  # what load_state_dict does: every byte is touched
            target.copy_(loaded[k])

    def get(rep: int) -> dict[str, float]:
        folder = scratch.new("get")
        try:
            t0 = time.perf_counter()
            path = os.path.join(folder, "state.pt")
            server.fs.get_file(f"{plain}/state.pt", path)
            copy_into_model(torch.load(path, weights_only=True))
            return {"s3fs get_file + torch.load": time.perf_counter() - t0}
        finally:
            rm(folder)

    def setup() -> None:
        ck.open().save(1, state, force=True)

    def restore(rep: int) -> dict[str, float]:
        t0 = time.perf_counter()
        copy_into_model(ck.mgr.restore(1))
        return {"ckptman restore": time.perf_counter() - t0}

    try:
        run_interleaved(group, [Contender(["s3fs get_file + torch.load"], get), Contender(["ckptman restore"], restore, setup, ck.close)], repeats, server.settle)
    finally:
        scratch.clean()
        server.remove(plain)
    group.notes.append(
        "both weights_only=True and followed by copy_() of every tensor into preallocated ones (load_state_dict); "
        "ckptman restore = mgr.restore(step): download checked against size and xxh3 checksum, then torch.load(mmap=True)"
    )
    return group


# --------------------------------------------------------------------------- #
# goal 6: memory of a synchronous save to S3 (fresh process each)
# --------------------------------------------------------------------------- #


def ranged_get_cost(cfg: Config, server: Server, key: str, mib: int, repeats: int) -> Group:
    """What one 16 MiB ranged GET costs the server, from a 16 MiB object and from a ``mib`` MiB one.

    On moto the second is far slower: it reads the whole object for every
    GET and slices the range out, so reading a large object in ranges costs it
    (number of ranges) x (object size). Asked of the server directly, no proxy.
    """
    from ckptman.prefetch import RANGE

    small_label, large_label = f"range of a {RANGE // MiB} MiB object", f"same range of a {mib} MiB object"
    group = Group(key, f"one {RANGE // MiB} MiB ranged GET ({server.label}, direct)")
    group.rows = [Row(small_label, baseline=True), Row(large_label)]
    prefix = server.prefix()
    small, large = f"{prefix}/small.bin", f"{prefix}/large.bin"
    server.direct.pipe_file(small, os.urandom(RANGE))
    with server.direct.open(large, "wb") as f:
        block = os.urandom(64 * MiB)
        for _ in range(mib // 64):
            f.write(block)

    def timed(label: str, path: str) -> Callable[[int], dict[str, float]]:
        def run(rep: int) -> dict[str, float]:
            t0 = time.perf_counter()
            server.direct.cat_file(path, start=0, end=RANGE)
            return {label: time.perf_counter() - t0}

        return run

    try:
        run_interleaved(group, [Contender([small_label], timed(small_label, small)), Contender([large_label], timed(large_label, large))], repeats)
    finally:
        server.remove(prefix)
    group.notes.append(
        f"fs.cat_file(path, start=0, end={RANGE // MiB} MiB) straight to the server: the same bytes either way. moto "
        "reads the whole object for each GET (FakeKey.value) before slicing the range out, so ckptman's ranged "
        f"restore of a {mib} MiB object ({mib * MiB // RANGE} ranges, 4 in flight) costs moto {mib * MiB // RANGE} reads of it "
        "where s3fs get_file's single GET costs one: a property of moto, not of S3"
    )
    return group


def save_memory(cfg: Config, server: Server, key: str, mib: int, repeats: int) -> Group:
    group = Group(key, f"peak extra RSS / state, sync save of {mib} MiB ({server.label})", ratio_of=mib * MiB)
    group.rows = [
        Row("torch.save into s3fs file", kind="mem"),
        Row("ckptman save (sync)", kind="mem", goal="<= 0.10x", check=ratio_at_most(0.10)),
    ]
    scratch = Scratch(cfg.base, "s3-memory")
    endpoint = server.opts["client_kwargs"]["endpoint_url"]

    def measure(label: str, kind: str) -> Callable[[int], dict[str, float]]:
        def run(rep: int) -> dict[str, float]:
            out = subprocess.run(
                [sys.executable, os.path.join(HERE, "_memprobe.py"), kind, "--mib", str(mib), "--tensors",
                 str(cfg.n_tensors), "--dir", scratch.root, "--endpoint", endpoint],
                capture_output=True, text=True, timeout=900,
            )
            lines = out.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if out.returncode == 0 and lines else {"error": out.stderr.strip()[-300:]}
            if "peak_extra" not in result:
                raise RuntimeError(f"_memprobe.py {kind}: {result}")
            return {label: float(result["peak_extra"])}

        return run

    try:
        run_interleaved(
            group,
            [Contender(["torch.save into s3fs file"], measure("torch.save into s3fs file", "torch_s3")),
             Contender(["ckptman save (sync)"], measure("ckptman save (sync)", "ckptman_s3"))],
            repeats,
        )
    finally:
        scratch.clean()
    group.notes.append(
        "each in a fresh process (bench/_memprobe.py): peak RSS increase over one save, sampled every 1 ms and "
        "cross-checked with ru_maxrss; ratio = peak extra / state size. ckptman holds at most 4 parts in flight + "
        "1 filling (8 MiB each); s3fs's file buffers up to one 50 MiB block (plus botocore's copies of it)"
    )
    return group


# --------------------------------------------------------------------------- #
# the suites
# --------------------------------------------------------------------------- #


def bench_server(cfg: Config, name: str) -> list[Group]:
    """Goals 1 to 5 on one server; group keys 4a-4e (moto+proxy) or 7a-7e (SeaweedFS)."""
    prefix = "4" if name == "s3" else "7"
    groups: list[Group] = []
    with s3_environment():
        server = Server(name, cfg)
        try:
            steps: list[tuple[str, Callable[[str], Group]]] = [
                ("a", lambda k: directory_upload(
                    cfg, server, k, cfg.dir_files, cfg.dir_file_mib * MiB, f"dir checkpoint {cfg.dir_files}x{cfg.dir_file_mib} MiB")),
                ("b", lambda k: directory_upload(
                    cfg, server, k, cfg.small_files, cfg.small_file_kib * 1024, f"small files {cfg.small_files}x{cfg.small_file_kib} KiB")),
                ("c", lambda k: state_save(cfg, server, k, cfg.state_mib, cfg.repeats)),
                ("d", lambda k: state_restore(cfg, server, k, cfg.state_mib, cfg.repeats)),
                ("e", lambda k: directory_restore(cfg, server, k)),
            ]
            for letter, run in steps:
                log(f"[{prefix}{letter}] {server.label}")
                groups.append(run(prefix + letter))
        finally:
            server.stop()
    notes = groups[0].notes
    if name == "s3":
        notes.append(
            f"moto {_version('moto')} and tests/netproxy.py NetProxy each in their own process; proxy latency "
            f"{cfg.latency * 1000:.0f} ms per request, bandwidth "
            + (f"{cfg.bandwidth / MiB:.0f} MiB/s per connection and direction" if cfg.bandwidth else "unlimited")
        )
    else:
        notes.append("SeaweedFS `weed server` (master, volume, filer, S3 gateway in one process) on 127.0.0.1, data on local disk")
    return groups


def bench_scale(cfg: Config) -> list[Group]:
    """Goal 6: the state transfers at growing sizes on both servers (3 repeats each)."""
    groups: list[Group] = []
    repeats = min(cfg.repeats, 3)
    with s3_environment():
        for name, prefix in (("s3", "8"), ("seaweedfs", "9")):
            server = Server(name, cfg)
            try:
                for i, mib in enumerate(cfg.scale_mibs):
                    log(f"[{prefix}] {server.label} {mib} MiB")
                    groups.append(state_save(cfg, server, f"{prefix}{'abcdef'[2 * i]}", mib, repeats))
                    groups.append(state_restore(cfg, server, f"{prefix}{'abcdef'[2 * i + 1]}", mib, repeats))
                if name == "s3":
                    largest = max(cfg.scale_mibs)
                    log(f"[{prefix}r] {server.label} cost of one ranged GET")
                    groups.append(ranged_get_cost(cfg, server, f"{prefix}r", largest, repeats))
                if name == "seaweedfs":
                    largest = max(cfg.scale_mibs)
                    log(f"[{prefix}m] {server.label} memory of a {largest} MiB save")
                    groups.append(save_memory(cfg, server, f"{prefix}m", largest, min(repeats, 2)))
            finally:
                server.stop()
    return groups
