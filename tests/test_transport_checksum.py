"""The S3 client's response CRC32, skipped only where ckptman checks every byte itself (ckptman.transport_checksum).

On moto through tests/netproxy.py, which records every request's headers and
can damage a response body on the way (the ``flip`` fault). What must hold:
payload GETs of a restore or a verify ask for no checksum, every other GET
still does (manifests, ``latest``, the sidecar, the lease, and the DCP files a
sharded save hashes for its manifest); a payload file damaged on the way is
read once more and the restore succeeds, counted once; one damaged in storage
still fails, naming it, after exactly two reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import botocore.exceptions
import pytest
import torch
from conftest import Backend, read_tree, write_tree
from netproxy import match

from ckptman import (
    CheckpointManager,
    CorruptCheckpointError,
    RetryPolicy,
    transport_checksum,
)
from ckptman.prefetch import RANGE

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.02)
MiB = 2**20
CHECKSUM_MODE = "x-amz-checksum-mode"


def whole_gets(proxy: Any) -> list[Any]:
    """GETs of whole objects (no Range, not a listing): the ones botocore would check a CRC32 of."""
    return [r for r in proxy.records if r.method == "GET" and "range" not in r.headers and "list-type" not in r.target]


def asks_for_checksum(record: Any) -> bool:
    return record.headers.get(CHECKSUM_MODE, "").upper() == "ENABLED"


class TestHook:
    """transport_checksum.skip_response_checksum, the request-building hook, without I/O."""

    @staticmethod
    def built(operation: str) -> dict[str, str]:
        params = {"Bucket": "b", "Key": "k", "ChecksumMode": "ENABLED"}
        transport_checksum.skip_response_checksum(params, SimpleNamespace(name=operation))
        return params

    def test_outside_a_checked_read_every_request_is_left_as_botocore_built_it(self) -> None:
        assert self.built("GetObject")["ChecksumMode"] == "ENABLED"

    async def _inside(self, operation: str) -> dict[str, str]:
        async with transport_checksum.checked_by_caller(object(), "memory://x"):  # not S3: only the context is set
            return self.built(operation)

    def test_inside_a_checked_read_only_get_object_loses_its_checksum_mode(self) -> None:
        import asyncio

        assert "ChecksumMode" not in asyncio.run(self._inside("GetObject"))
        assert asyncio.run(self._inside("HeadObject"))["ChecksumMode"] == "ENABLED"
        assert self.built("GetObject")["ChecksumMode"] == "ENABLED"  # the context ended with the block


def test_the_flip_fault_is_damage_botocore_catches_by_default(flaky_s3_backend: Backend, s3_proxy: Any) -> None:
    """What the skipped CRC32 caught: a whole GET fails its check; a ranged one (never checked) brings the damage."""
    fs, root = flaky_s3_backend.fs()
    data = os.urandom(300_000)
    fs.pipe_file(f"{root}/obj.bin", data)
    s3_proxy.configure(fail_rate=1.0, faults=("flip",), match=match(method="GET", path_contains="/obj.bin"))
    with pytest.raises(botocore.exceptions.FlexibleChecksumError):
        fs.cat_file(f"{root}/obj.bin")
    damaged = fs.cat_file(f"{root}/obj.bin", start=0, end=1000)
    assert damaged[0] == data[0] ^ 0xFF and damaged[1:] == data[1:1000]


def test_payload_gets_ask_for_no_checksum_and_every_other_get_still_does(
    flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path
) -> None:
    files = {"part/a.bin": os.urandom(1000), "part/b.bin": os.urandom(2 * MiB)}
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        mgr.save(2, {"w": torch.arange(1000.0)}, force=True)
        s3_proxy.reset_stats()
        assert read_tree(mgr.restore_directory(1, local_dir=tmp_path / "back")) == files
        assert torch.equal(mgr.restore(2)["w"], torch.arange(1000.0))
        assert mgr.verify().ok
        mgr.refresh()
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, read_only=True) as reader:
        assert reader.latest_step() == 2
    gets = whole_gets(s3_proxy)
    payload = [r for r in gets if r.target.split("?")[0].endswith((".bin", "/state.pt"))]
    other = [r for r in gets if r not in payload]
    assert len(payload) == 2 * 2 + 1 * 2  # the directory restored and verified, the state restored and verified
    assert not any(asks_for_checksum(r) for r in payload)
    assert other and all(asks_for_checksum(r) for r in other), [r.target for r in other if not asks_for_checksum(r)]


def test_the_dcp_files_a_sharded_save_hashes_for_its_manifest_keep_the_checksum(
    flaky_s3_backend: Backend, s3_proxy: Any
) -> None:
    """Those reads make the checksums every later check trusts: nothing checks them but the server's CRC32."""
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        s3_proxy.reset_stats()
        assert mgr.save(1, {"w": torch.arange(12.0)}, sharded=True)
        hashed = [r for r in whole_gets(s3_proxy) if "/step_00000001/" in r.target and "manifest" not in r.target]
        assert hashed and all(asks_for_checksum(r) for r in hashed)
        s3_proxy.reset_stats()
        assert mgr.verify(1).ok
        checked = [r for r in whole_gets(s3_proxy) if r.target.split("?")[0].endswith((".distcp", ".metadata"))]
        assert checked and not any(asks_for_checksum(r) for r in checked)


def test_bytes_damaged_on_the_way_are_read_once_more_and_the_restore_succeeds_counted_once(
    flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One damaged GET each: a batched file, a file over one range (ranged GETs), and a state's state.pt.

    66 MiB in all, so that the restore logs its total (progress.LONG_TRANSFER): a second read that counted again would log 129 MiB.
    """
    files = {"part/a.bin": os.urandom(3 * MiB), "part/b.bin": os.urandom(3 * MiB), "big.bin": os.urandom(3 * RANGE + 12 * MiB)}
    total = sum(map(len, files.values())) >> 20
    state = {"w": torch.randn(1000)}
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        mgr.save(2, state, force=True)
        s3_proxy.fail_next(1, "flip", match(method="GET", path_contains="part/b.bin"))
        s3_proxy.fail_next(1, "flip", match(method="GET", path_contains="big.bin"))
        s3_proxy.fail_next(1, "flip", match(method="GET", path_contains="step_00000002/state.pt"))
        with caplog.at_level(logging.INFO, logger="ckptman"):
            restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
            back = mgr.restore()
    assert s3_proxy.stats.faults["flip"] == 3
    assert read_tree(restored) == files
    assert torch.equal(back["w"], state["w"])  # the newest, not a fallback to an older checkpoint
    assert caplog.text.count("reading it once more") == 3
    assert caplog.text.count("read again matches its manifest entry") == 3
    assert f"download 3 files: {total} MiB in" in caplog.text


def test_a_file_damaged_on_every_read_fails_naming_it_after_two_reads(flaky_s3_backend: Backend, s3_proxy: Any, tmp_path: Path) -> None:
    """Damage that a second read does not undo is damage in storage: a CorruptCheckpointError naming the file."""
    files = {"part/a.bin": os.urandom(1000), "part/b.bin": os.urandom(1000)}
    with CheckpointManager(flaky_s3_backend.url, storage_options=flaky_s3_backend.storage_options, retry=FAST) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            write_tree(folder, files)
        s3_proxy.configure(fail_rate=1.0, faults=("flip",), match=match(method="GET", path_contains="part/b.bin"))
        with pytest.raises(CorruptCheckpointError, match=r"part/b\.bin: checksum mismatch"):
            mgr.restore_directory(1, local_dir=tmp_path / "back")
        s3_proxy.heal()
        assert not os.path.exists(tmp_path / "back" / "part" / "a.bin")  # no half-restored folder left behind
        report = mgr.verify(1)
    assert report.ok
    assert s3_proxy.stats.faults["flip"] == 2
