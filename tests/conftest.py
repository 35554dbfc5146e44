"""Shared pytest fixtures: real (local, in-process) storage servers and
per-test run directories on four fsspec backends.

Backends
--------
``local``   plain path under pytest's ``tmp_path`` (LocalFileSystem).
``memory``  ``memory://ckptman-<uuid>/run`` (one global store per process).
``s3``      ``s3://ckptman-test/<uuid>/run`` on a moto server (127.0.0.1).
``gcs``     ``gs://ckptman-test/<uuid>/run`` on gcp-storage-emulator (127.0.0.1).

Usage
-----
::

    def test_x(backend):                  # runs 4x: local, memory, s3, gcs
        fs, root = backend.fs()           # cached fsspec instance + path of backend.url
        fs2, _ = backend.fs(fresh=True)   # new instance, empty listing cache
        backend.join("step_1", "manifest.json")   # URL below backend.url

    @pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
    def test_remote_only(backend): ...

    def test_one(s3_backend): ...         # also gcs_backend, local_backend, memory_backend

    def test_factory(backend_factory):
        a, b = backend_factory("gcs"), backend_factory("gcs")   # two fresh run dirs

``CKPTMAN_TEST_BACKENDS=local,memory`` restricts the default parametrization of
``backend`` (the named fixtures and ``backend_factory`` are not affected).

The servers start lazily (only when a test needs them) and once per session.
"""

from __future__ import annotations

import os

# Must be set before anything imports gcsfs: otherwise gcsfs probes every
# bucket for zonal/HNS support over gRPC and each first bucket access against
# the emulator hangs ~60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import fsspec.core
import pytest

BUCKET = "ckptman-test"
GCS_PROJECT = "ckptman-test"
BACKEND_NAMES = ("local", "memory", "s3", "gcs")
REMOTE_BACKENDS = ("s3", "gcs")

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _selected_backends() -> list[str]:
    raw = os.environ.get("CKPTMAN_TEST_BACKENDS", "").strip()
    if not raw:
        return list(BACKEND_NAMES)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = set(names) - set(BACKEND_NAMES)
    if unknown:
        raise ValueError(f"CKPTMAN_TEST_BACKENDS: unknown backend(s) {sorted(unknown)}")
    return names


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
        return {"local": "file", "memory": "memory", "s3": "s3", "gcs": "gs"}[self.name]

    def bucket_url(self, bucket: str, *parts: str) -> str:
        """URL ``<proto>://<bucket>/<parts...>`` on this backend (s3/gcs only).

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

    def with_url(self, url: str) -> "Backend":
        """Same backend/options, different URL."""
        return Backend(self.name, url, dict(self.storage_options))


# --------------------------------------------------------------------------- #
# Server helpers
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on 127.0.0.1:{port} did not come up")
            time.sleep(0.02)


def _start_with_retries(start: Callable[[int], Any], attempts: int = 5) -> tuple[Any, int]:
    """Call ``start(port)`` on a fresh free port; retry if the port got taken."""
    last: BaseException | None = None
    for _ in range(attempts):
        port = _free_port()
        try:
            server = start(port)
        except OSError as exc:  # EADDRINUSE race between _free_port and bind
            last = exc
            continue
        _wait_for_port(port)
        return server, port
    raise RuntimeError(f"could not start server: {last!r}")


_gcs_emulator_patched = False


def _patch_gcs_emulator() -> None:
    """Teach gcp-storage-emulator two things real GCS does and gcsfs uses.

    1. ``POST b/{bucket}/o/{src}/moveTo/o/{dst}`` (objects.move). gcsfs'
       ``mv``/``mv_file`` calls it first; unpatched the emulator answers 501,
       which gcsfs retries 6x with exponential backoff (~32 s per file) before
       falling back to copy+delete.
    2. ``ifGenerationMatch=0`` (create-only) on uploads, used by gcsfs for
       ``pipe_file(..., mode="create")`` and ``open(..., "xb")``. Unpatched the
       emulator ignores it and silently overwrites. Real GCS answers 412,
       which gcsfs maps to ``FileExistsError``. (Approximation: checked when
       a simple upload arrives, when a resumable upload is initiated and on
       each resumable chunk; real GCS checks at finalisation.)
    3. ``DELETE`` on a resumable-upload session URL (cancel), which gcsfs
       sends from ``GCSFile.discard()`` -- e.g. when an ``fs.transaction``
       is left by an exception. Unpatched: 501, retried 6x (~32 s), then
       ``HttpError``. Real GCS answers 499, which gcsfs accepts.
    """
    global _gcs_emulator_patched
    if _gcs_emulator_patched:
        return
    from gcp_storage_emulator import server as gserver
    from gcp_storage_emulator import settings as gsettings
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    POST, DELETE = "POST", "DELETE"

    class _ClientClosedRequest:  # HTTPStatus has no 499
        value = 499
        phrase = "Client Closed Request"

    def cancel_upload(request, response, storage, *args, **kwargs):
        upload_ids = request.query.get("upload_id")
        if not upload_ids:
            response.status = HTTPStatus.BAD_REQUEST
            return
        try:
            storage.delete_resumable_file_obj(upload_ids[0])
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        response.status = _ClientClosedRequest

    def move(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        src = request.params["object_id"]
        dst = request.params["dest_object_id"]
        try:
            obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        objects._delete(storage, bucket, src)
        response.json(obj)

    def _object_name(request) -> str | None:
        names = request.query.get("name")
        if names:
            return names[0]
        data = request.data
        if isinstance(data, dict):
            meta = data.get("meta")
            if isinstance(meta, dict) and meta.get("name"):
                return meta["name"]
            if data.get("name"):
                return data["name"]
        return None

    def with_create_only(handler):
        def wrapped(request, response, storage, *args, **kwargs):
            gm = request.query.get("ifGenerationMatch")
            if gm and gm[0] == "0":
                name = _object_name(request)
                if name is not None:
                    try:
                        storage.get_file_obj(request.params["bucket_name"], name)
                    except NotFound:
                        pass
                    else:
                        response.status = HTTPStatus.PRECONDITION_FAILED
                        response.json(
                            {
                                "error": {
                                    "code": 412,
                                    "message": "At least one of the pre-conditions "
                                    "you specified did not hold.",
                                }
                            }
                        )
                        return None
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    wrapped_handlers = {
        objects.insert: with_create_only(objects.insert),
        objects.upload_partial: with_create_only(objects.upload_partial),
    }
    move_routes = tuple(
        (
            rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
            rf"(?P<dest_object_id>.*[^/]+)$",
            {POST: move},
        )
        for prefix in (gsettings.API_ENDPOINT, "")
    )
    new_handlers = []
    for regex, handlers in gserver.HANDLERS:
        patched = {m: wrapped_handlers.get(h, h) for m, h in handlers.items()}
        if objects.upload_partial in handlers.values():  # the /upload/.../o route
            patched.setdefault(DELETE, cancel_upload)
        new_handlers.append((regex, patched))
    # Router.handle reads the module global at request time.
    gserver.HANDLERS = move_routes + tuple(new_handlers)
    _gcs_emulator_patched = True


def _quiet_disconnects(httpd) -> None:
    """gcsfs' info() races a GET-object against a listing and cancels the
    loser; the single-threaded emulator then prints BrokenPipe tracebacks.
    Swallow client-disconnect errors only."""
    import sys

    original = httpd.handle_error

    def handle_error(request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return
        original(request, client_address)

    httpd.handle_error = handle_error


# --------------------------------------------------------------------------- #
# Session-scoped servers (lazy: only started when requested)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start a moto S3 server on 127.0.0.1; yield ``http://127.0.0.1:<port>``.

    Also sets dummy AWS credentials + region in ``os.environ`` for the session
    (restored afterwards). Bucket ``ckptman-test`` is created by ``s3_bucket``.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    mp = pytest.MonkeyPatch()
    for key, value in _AWS_ENV.items():
        mp.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)

    def start(port: int):
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        srv.start()
        return srv

    server, port = _start_with_retries(start)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        mp.undo()


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": _AWS_ENV["AWS_ACCESS_KEY_ID"],
        "secret": _AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        # No "region_name" here: s3fs.mkdir would then send
        # LocationConstraint=us-east-1, which S3 (and moto) reject.
        "client_kwargs": {"endpoint_url": endpoint},
    }


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """Create bucket ``ckptman-test`` once per session; return its name."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_storage_options(s3_endpoint))
    fs.mkdir(BUCKET)
    return BUCKET


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """Start gcp-storage-emulator (in memory) on 127.0.0.1 with default bucket
    ``ckptman-test``; yield ``http://127.0.0.1:<port>``."""
    from gcp_storage_emulator.server import create_server

    _patch_gcs_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)

    def start(port: int):
        srv = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        srv._api.daemon = True  # never keep the interpreter alive
        srv.start()
        httpd = getattr(srv._api, "_httpd", None)
        if httpd is not None:
            _quiet_disconnects(httpd)
        return srv

    server, port = _start_with_retries(start)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def gcs_storage_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "token": "anon", "project": GCS_PROJECT}


# --------------------------------------------------------------------------- #
# Backend construction
# --------------------------------------------------------------------------- #


def make_backend(
    name: str,
    tmp_path: Path | None,
    request: pytest.FixtureRequest,
    *,
    cleanup: bool = True,
) -> Backend:
    """Build a :class:`Backend` with a fresh, unique, non-existent run dir.

    Starts the needed server lazily via ``request.getfixturevalue``. With
    ``cleanup`` the run's unique parent prefix is removed after the test
    (best effort). ``tmp_path`` is only used for ``local`` (``None``: taken
    from the ``tmp_path`` fixture).
    """
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
    elif name == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        backend = Backend("s3", f"s3://{bucket}/{uid}/run", s3_storage_options(endpoint))
        cleanup_url = f"s3://{bucket}/{uid}"
    elif name == "gcs":
        endpoint = request.getfixturevalue("gcs_endpoint")
        backend = Backend("gcs", f"gs://{BUCKET}/{uid}/run", gcs_storage_options(endpoint))
        cleanup_url = f"gs://{BUCKET}/{uid}"
    else:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")

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


@pytest.fixture(params=_selected_backends(), ids=lambda n: n)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh run dir on each backend (``local``, ``memory``, ``s3``, ``gcs``).

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
        "key": _AWS_ENV["AWS_ACCESS_KEY_ID"],
        "secret": _AWS_ENV["AWS_SECRET_ACCESS_KEY"],
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
