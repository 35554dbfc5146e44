"""Streaming uploads to S3 (ckptman.multipart): parts go up while the file is written, on moto and SeaweedFS.

With 5 MiB parts (the smallest S3 accepts, set through s3fs's
``default_block_size``) a 17 MiB payload is a multipart upload of four parts,
several of them in flight at once. What must hold: the object is exactly the
bytes the manifest's checksum covers, it is one object (a multipart ETag
``"...-4"``), and a write that fails part-way publishes nothing and leaves no
multipart upload behind. Failures injected by the network (a part upload
failing, a completion failing, Ctrl-C) are in test_upload_abort.py.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import pytest
import torch
import xxhash
from conftest import Backend

from ckptman import CheckpointManager, CorruptCheckpointError, RetryPolicy
from ckptman.manifest import MANIFEST_NAME, Manifest
from ckptman.multipart import IN_FLIGHT, PartUpload, opener_for
from ckptman.storage import Storage

PART = 5 * 2**20
PAYLOAD = 17 * 2**20  # parts of 5, 5, 5 and 2 MiB


@pytest.fixture(params=["s3", "seaweedfs"])
def s3_like(request: pytest.FixtureRequest) -> Backend:
    """Each S3 server: moto and SeaweedFS."""
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")
    return backend


def options(backend: Backend) -> dict[str, Any]:
    return {**backend.storage_options, "default_block_size": PART}


def fresh_fs(backend: Backend) -> Any:
    return fsspec.filesystem("s3", skip_instance_cache=True, **backend.storage_options)


def open_uploads(backend: Backend) -> list[str]:
    fs = fresh_fs(backend)
    bucket, prefix = backend.path.split("/", 1)
    return sorted(u["Key"] for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith(f"{prefix}/"))


def test_saved_state_is_one_multipart_object_whose_bytes_match_the_manifest(s3_like: Backend) -> None:
    state = {"w": torch.arange(PAYLOAD // 4, dtype=torch.float32)}
    with CheckpointManager(s3_like.url, storage_options=options(s3_like)) as mgr:
        assert mgr.save(1, state, force=True)
        fs = fresh_fs(s3_like)
        folder = f"{s3_like.path}/{mgr.checkpoint_path(1).rsplit('/', 1)[1]}"
        (entry,) = Manifest.from_bytes(fs.cat_file(f"{folder}/{MANIFEST_NAME}"), folder).files
        path = f"{folder}/{entry.path}"
        data = fs.cat_file(path)
        assert len(data) == entry.size > 3 * PART
        assert entry.checksum == f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"
        assert fs.info(path)["ETag"].strip('"').endswith(f"-{-(-entry.size // PART)}")
        assert torch.equal(mgr.restore(1)["w"], state["w"])
    assert open_uploads(s3_like) == []


def test_directory_files_stream_as_parts_and_small_ones_as_one_put(s3_like: Backend, tmp_path: Any) -> None:
    big, small = os.urandom(PAYLOAD), os.urandom(PART)  # exactly one part: one PUT, no multipart upload
    with CheckpointManager(s3_like.url, storage_options=options(s3_like)) as mgr:
        with mgr.save_directory(1, force=True) as folder:
            for name, data in (("big.bin", big), ("small.bin", small)):
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
        fs = fresh_fs(s3_like)
        base = f"{s3_like.path}/{mgr.checkpoint_path(1).rsplit('/', 1)[1]}"
        assert "-" in fs.info(f"{base}/big.bin")["ETag"]
        assert "-" not in fs.info(f"{base}/small.bin")["ETag"]
        restored = mgr.restore_directory(1, local_dir=tmp_path / "back")
        for name, data in (("big.bin", big), ("small.bin", small)):
            with open(os.path.join(restored, name), "rb") as f:
                assert f.read() == data
    assert open_uploads(s3_like) == []


def test_a_producer_failing_after_parts_went_up_publishes_nothing_and_aborts(s3_like: Backend) -> None:
    storage = Storage(s3_like.url, options(s3_like), RetryPolicy(attempts=1))

    def produce(f: Any) -> None:
        for _ in range((IN_FLIGHT + 2) * PART // 2**20):  # more parts than may be in flight: some have landed
            f.write(os.urandom(2**20))
        raise ValueError("the producer gives up")

    with pytest.raises(ValueError, match="gives up"):
        storage.write_file("step_1/state.pt", produce)
    assert not fresh_fs(s3_like).exists(f"{s3_like.path}/step_1/state.pt")
    assert open_uploads(s3_like) == []


def test_parts_in_flight_are_bounded(s3_like: Backend) -> None:
    """Memory stays (IN_FLIGHT + 1) parts whatever the file's size: the producer waits for a part to land."""
    opener = opener_for(fresh_fs(s3_like))
    assert opener is not None
    upload = opener(f"{s3_like.path}/bounded.bin")
    assert isinstance(upload, PartUpload)
    most = 0
    try:
        for _ in range(3 * IN_FLIGHT):
            upload.write(bytes(16 * 2**20))
            most = max(most, len(upload._running))
    finally:
        upload.discard()
    assert 0 < most <= IN_FLIGHT
    assert open_uploads(s3_like) == []


def test_a_payload_that_grew_after_the_commit_fails_verification(s3_like: Backend) -> None:
    """The ranged download asks for one byte past the manifest's size, so extra bytes are a mismatch too."""
    with CheckpointManager(s3_like.url, storage_options=options(s3_like)) as mgr:
        assert mgr.save(1, {"w": torch.zeros(PAYLOAD // 4)}, force=True)
        fs = fresh_fs(s3_like)
        path = f"{s3_like.path}/{mgr.checkpoint_path(1).rsplit('/', 1)[1]}/state.pt"
        fs.pipe_file(path, fs.cat_file(path) + b"appended")
        with pytest.raises(CorruptCheckpointError, match="size mismatch"):
            mgr.restore(1)
