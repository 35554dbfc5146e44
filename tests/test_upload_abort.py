"""An upload that fails while the process lives is aborted: no multipart upload stays in progress (and billed).

Against moto behind the fault proxy of tests/netproxy.py (``flaky_s3_backend``),
with 5 MiB parts, so every payload file here really is a multipart upload.
After each failed save the run directory's in-progress multipart uploads are
listed straight from moto: none may remain. Where the link is throttled, a
part takes about 1.6 s, long enough for a failure or an interrupt to arrive
while the other files are still on their way. What a SIGKILL leaves behind
(nothing can abort then) is in docs/guarantees.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import fsspec
import pytest
import torch
from conftest import Backend, s3_storage_options, sigint_once
from netproxy import match

from ckptman import CheckpointManager, RetryPolicy, StorageError
from ckptman.transfer import CHUNK

PART = 5 * 2**20  # s3fs's block size here: the smallest part S3 accepts
FILE = 2 * CHUNK + 2**20  # ckptman writes CHUNK bytes at a time: parts of 8, 8 and 1 MiB
LINK = 5 * 2**20  # bytes/s per connection and direction when throttled
# An interrupt must land while the upload runs, even on a loaded machine where the thread that sends it lags
# by a second: ckptman sends a file's parts over several connections at once, so throttle those harder.
INTERRUPTED_LINK = 2**20
ONCE = RetryPolicy(attempts=1)
TWICE = RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.01)
PART_UPLOAD = match(method="PUT", query_contains="partNumber=")
COMPLETION = match(method="POST", query_contains="uploadId=")


def manager(backend: Backend, retry: RetryPolicy = ONCE, **kwargs: Any) -> CheckpointManager:
    options = {**backend.storage_options, "default_block_size": PART}
    return CheckpointManager(backend.url, storage_options=options, retry=retry, **kwargs)


def open_uploads(backend: Backend, s3_endpoint: str) -> list[str]:
    """Keys below the run directory with a multipart upload in progress, asked of moto directly."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_storage_options(s3_endpoint))
    bucket, prefix = backend.path.split("/", 1)
    return sorted(upload["Key"] for upload in fs.list_multipart_uploads(bucket) if upload["Key"].startswith(f"{prefix}/"))


def seen(proxy: Any, predicate: Any) -> int:
    return sum(1 for r in proxy.records if predicate(r.method, r.target, r.headers))


def big_state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(FILE // 4)}


def write_files(folder: str, names: list[str]) -> None:
    for name in names:
        Path(folder, name).write_bytes(bytes(FILE))


@pytest.fixture
def interrupt_once_uploading(s3_proxy: Any) -> Iterator[None]:
    """SIGINT this process (as Ctrl-C would) once the first part upload has begun; the link is throttled
    so that the save is still far from done then (a 5 MiB part takes about 5 s)."""
    s3_proxy.configure(bandwidth=INTERRUPTED_LINK)
    with sigint_once(lambda: seen(s3_proxy, PART_UPLOAD) > 0):
        yield


def test_part_upload_failing_on_every_attempt_aborts_each_attempt(
    flaky_s3_backend: Backend, s3_proxy: Any, s3_endpoint: str
) -> None:
    # torch.save writes the tensor in one call: part 1 is uploaded while it writes, the last part on close.
    s3_proxy.configure(fail_rate=1.0, faults=("500",), match=match(method="PUT", query_contains="partNumber=1"))
    mgr = manager(flaky_s3_backend, retry=TWICE)
    with pytest.raises(StorageError, match="state.pt"):
        mgr.save(1, big_state(), force=True)
    mgr.close()
    assert seen(s3_proxy, match(method="POST", query_contains="uploads")) == 2  # a multipart upload per attempt
    assert open_uploads(flaky_s3_backend, s3_endpoint) == []


def test_failed_completion_is_aborted_before_the_retry(flaky_s3_backend: Backend, s3_proxy: Any, s3_endpoint: str) -> None:
    s3_proxy.fail_next(1, "500", match=COMPLETION)
    with manager(flaky_s3_backend, retry=TWICE) as mgr:
        assert mgr.save(1, big_state(), force=True)  # the retry succeeds
    assert open_uploads(flaky_s3_backend, s3_endpoint) == []


def test_directory_upload_failing_on_one_file_stops_and_aborts_the_others(
    flaky_s3_backend: Backend, s3_proxy: Any, s3_endpoint: str
) -> None:
    s3_proxy.configure(
        bandwidth=LINK, fail_rate=1.0, faults=("500",), match=match(method="PUT", path_contains="/bad.bin", query_contains="partNumber=")
    )
    mgr = manager(flaky_s3_backend, max_concurrency=4)
    with pytest.raises(StorageError, match="bad.bin"):
        with mgr.save_directory(1, force=True) as folder:
            write_files(folder, ["a.bin", "b.bin", "c.bin", "bad.bin"])
    mgr.close()
    assert seen(s3_proxy, COMPLETION) == 0  # no sibling went on to finish a file nobody will commit
    assert open_uploads(flaky_s3_backend, s3_endpoint) == []


def test_interrupted_directory_upload_aborts_every_file(
    flaky_s3_backend: Backend, s3_proxy: Any, s3_endpoint: str, interrupt_once_uploading: None
) -> None:
    mgr = manager(flaky_s3_backend, max_concurrency=4)
    with pytest.raises(KeyboardInterrupt):
        with mgr.save_directory(1, force=True) as folder:
            write_files(folder, ["a.bin", "b.bin", "c.bin"])
    mgr.close()
    assert seen(s3_proxy, COMPLETION) == 0
    assert open_uploads(flaky_s3_backend, s3_endpoint) == []


def test_interrupted_save_aborts_its_upload(
    flaky_s3_backend: Backend, s3_proxy: Any, s3_endpoint: str, interrupt_once_uploading: None
) -> None:
    mgr = manager(flaky_s3_backend)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(1, big_state(), force=True)
    mgr.close()
    assert seen(s3_proxy, COMPLETION) == 0
    assert open_uploads(flaky_s3_backend, s3_endpoint) == []
