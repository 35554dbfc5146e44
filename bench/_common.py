"""Helpers shared by bench.py and its child processes (_memprobe.py, _s3server.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

MiB = 2**20
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")

AWS_KEY = "testing"
AWS_SECRET = "testing"
BUCKET = "ckptman-bench"

# Messages of DCP about running without a process group (expected: single process).
DCP_WARNING = r".*(torch\.distributed is disabled|process group|no_dist).*"


def make_state(total_mib: int, n_tensors: int = 4, seed: int = 0) -> dict[str, Any]:
    """A state dict of ``n_tensors`` float32 tensors totalling ``total_mib`` MiB (random, incompressible)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    per = total_mib * MiB // 4 // n_tensors
    return {f"layer{i}.weight": torch.rand(per, generator=gen) for i in range(n_tensors)}


def state_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def fsync_path(path: str) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict_from_page_cache(path: str) -> None:
    """Drop a file's (or every file below a folder's) clean pages from the page cache.

    ``posix_fadvise(DONTNEED)`` only affects these files (no global drop_caches
    on a shared machine); the pages are clean because every contender fsyncs.
    """
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(path: str) -> None:
    """Read a file (or every file below a folder) so its pages are cached."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs storage options for the moto server (directly or through the proxy)."""
    return {"key": AWS_KEY, "secret": AWS_SECRET, "client_kwargs": {"endpoint_url": endpoint}}


def is_not_implemented(exc: BaseException) -> bool:
    """The contender's API does not exist yet (e.g. an unknown keyword argument)."""
    return isinstance(exc, (TypeError, NotImplementedError))


def describe(exc: BaseException, limit: int = 110) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
