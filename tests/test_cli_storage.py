"""The CLI against object stores that are wrong in the ways users get them wrong.

Each case runs the real console script and asserts the message (what to
pass) and the exit code, and that an unreachable endpoint fails within
seconds: nothing listening, and a socket that accepts but never answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import ckptman, storage_flags, write_run

from ckptman.cli import options

BUCKET_URL = "s3://ckptman-test/nothing/run"


@pytest.fixture
def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound once for a free number, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes TCP connections (the kernel's backlog) but never sends a byte."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_nothing_listening_fails_fast_and_says_where(closed_port: int) -> None:
    start = time.monotonic()
    result = ckptman("ls", BUCKET_URL, "--endpoint-url", f"http://127.0.0.1:{closed_port}")
    assert time.monotonic() - start < 10
    assert result.code == 2
    assert f"cannot reach endpoint http://127.0.0.1:{closed_port}: Connection refused" in result.err
    assert "--endpoint-url" in result.err


def test_an_endpoint_that_never_answers_fails_within_seconds(silent_port: int) -> None:
    start = time.monotonic()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent_port}"}  # the variable works like the flag
    result = ckptman("verify", BUCKET_URL, env=env)
    assert time.monotonic() - start < 12
    assert result.code == 2
    assert f"endpoint http://127.0.0.1:{silent_port} accepts connections but sent no answer within 3s" in result.err


def test_an_unknown_storage_option_is_named(s3_backend: Any) -> None:
    result = ckptman("ls", s3_backend.url, "--storage-option", "endpoint=http://127.0.0.1:1")
    assert result.code == 2
    assert result.err.startswith("ckptman: error: unknown storage option 'endpoint' for s3://; its filesystem takes:")
    assert "endpoint_url" in result.err and "could not reach" not in result.err


def test_a_shortcut_and_the_same_storage_option_conflict(s3_backend: Any) -> None:
    endpoint = storage_flags(s3_backend)[1]
    result = ckptman(
        "ls", s3_backend.url, "--endpoint-url", endpoint, "--storage-option", f"client_kwargs.endpoint_url={endpoint}"
    )
    assert result.code == 2 and "--endpoint-url and --storage-option client_kwargs.endpoint_url both set it" in result.err


def test_missing_credentials_say_what_to_pass(s3_backend: Any, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    result = ckptman("ls", s3_backend.url, *storage_flags(s3_backend), env=env)
    assert result.code == 2
    assert f"ckptman: error: no credentials for {s3_backend.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.err
    assert "--profile" in result.err and "--anon" in result.err


def test_an_unknown_profile_is_named(s3_backend: Any) -> None:
    result = ckptman("ls", s3_backend.url, "--profile", "no-such-profile", *storage_flags(s3_backend))
    assert result.code == 2 and "no-such-profile" in result.err and "~/.aws/config" in result.err


def test_shortcuts_spell_each_protocol_and_timeouts_are_bounded() -> None:
    """--endpoint-url/--anon/--profile per protocol; the CLI's timeouts never override the user's."""

    def args(items: list[str], endpoint: str | None, profile: str | None, anon: bool) -> argparse.Namespace:
        return argparse.Namespace(
            storage_option=[options.parse_storage_option(item) for item in items],
            endpoint_url=endpoint,
            profile=profile,
            anon=anon,
        )

    endpoint = "http://127.0.0.1:9000"
    s3 = options.storage_options("s3://bucket/run", args(["config_kwargs.read_timeout=99"], endpoint, "dev", True))
    assert s3["client_kwargs"] == {"endpoint_url": endpoint} and s3["anon"] is True and s3["profile"] == "dev"
    assert s3["config_kwargs"]["read_timeout"] == 99 and s3["config_kwargs"]["connect_timeout"] == 5
    assert s3["config_kwargs"]["retries"] == {"max_attempts": 2, "mode": "standard"}
    gcs = options.storage_options("gs://bucket/run", args([], endpoint, None, True))
    assert gcs == {"endpoint_url": endpoint, "token": "anon", "requests_timeout": 20}
    assert options.storage_options("/tmp/run", args([], None, None, False)) == {}


def test_storage_options_parse_json_and_nest() -> None:
    items = [
        options.parse_storage_option("anon=true"),
        options.parse_storage_option("client_kwargs.endpoint_url=http://localhost:9000"),
        options.parse_storage_option("client_kwargs.region_name=eu-west-1"),
        options.parse_storage_option("block_size=1024"),
    ]
    assert options.build_storage_options(items) == {
        "anon": True,
        "client_kwargs": {"endpoint_url": "http://localhost:9000", "region_name": "eu-west-1"},
        "block_size": 1024,
    }


def test_a_missing_s3fs_names_what_installs_it() -> None:
    """``pip install 'ckptman[s3]'`` does not work while ckptman is on no package index; the message says what does."""
    code = "import sys; sys.modules['s3fs'] = None; import ckptman.cli; sys.exit(ckptman.cli.main(['ls', 's3://bucket/run']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "pip install s3fs (or, from a ckptman checkout, pip install -e '.[s3]')" in done.stderr


def test_gcs_through_the_shortcuts(gcs_backend: Any) -> None:
    """``--endpoint-url`` and ``--anon`` spelled for gcsfs (``endpoint_url``, ``token=anon``), with its bounded timeout."""
    write_run(gcs_backend)
    endpoint = gcs_backend.storage_options["endpoint_url"]
    flags = ["--endpoint-url", endpoint, "--anon", "--storage-option", f"project={gcs_backend.storage_options['project']}"]
    listed = ckptman("ls", gcs_backend.url, "--json", *flags).json()
    assert [c["step"] for c in listed["checkpoints"]] == [20, 30, 40]
    profile = ckptman("ls", gcs_backend.url, "--profile", "dev", *flags)
    assert profile.code == 2 and "GOOGLE_APPLICATION_CREDENTIALS" in profile.err
