"""Smoke tests of the storage fixtures, using raw fsspec only.

They also pin down the backend behaviours ckptman relies on (or must work
around), so a change in s3fs/gcsfs or in a server (moto, SeaweedFS,
fake-gcs-server) shows up here first.
"""

from __future__ import annotations

import errno
import json
import posixpath
import fsspec
import pytest
from conftest import BACKEND_NAMES, BUCKET, REMOTE_BACKENDS, Backend


def _write(fs, path: str, data: bytes) -> None:
    # LocalFileSystem (auto_mkdir=False, the default) does not create parent
    # directories; object stores and memory do not need them.
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def _names(entries) -> list[str]:
    # NB: pass detail=False explicitly: MemoryFileSystem.ls defaults to
    # detail=True, s3fs/gcsfs/local default to detail=False.
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


# --------------------------------------------------------------------------- #
# Fixture sanity
# --------------------------------------------------------------------------- #


def test_backend_fixture_shape(backend: Backend, backend_factory):
    fs, root = backend.fs()
    assert backend.name in BACKEND_NAMES
    assert not fs.exists(root), "run dir must not exist yet"
    assert posixpath.basename(root) == "run"
    other = backend_factory(backend.name)
    assert other.url != backend.url and other.name == backend.name
    if backend.name == "local":
        assert "://" not in backend.url and backend.storage_options == {}
    elif backend.name == "memory":
        assert backend.url.startswith("memory://ckptman-") and backend.storage_options == {}
    elif backend.protocol == "s3":
        assert backend.url.startswith(f"s3://{BUCKET}/")
        assert backend.storage_options["client_kwargs"]["endpoint_url"].startswith("http://127.0.0.1:")
        assert fs.exists(BUCKET)
    else:
        assert backend.url.startswith(f"gs://{BUCKET}/")
        assert backend.storage_options["endpoint_url"].startswith("http://127.0.0.1:")
        assert fs.exists(BUCKET)
    # fsspec.open with the same options works on the URL directly.
    with fsspec.open(backend.join("probe.txt"), "wb", auto_mkdir=True, **backend.storage_options) as f:
        f.write(b"ok")
    with fsspec.open(backend.join("probe.txt"), "rb", **backend.storage_options) as f:
        assert f.read() == b"ok"


def test_fresh_instance_is_distinct(backend: Backend):
    fs1, _ = backend.fs()
    fs2, _ = backend.fs()
    fs3, _ = backend.fs(fresh=True)
    assert fs1 is fs2
    if backend.name != "local":  # LocalFileSystem is a cached singleton-ish
        assert fs3 is not fs1


# --------------------------------------------------------------------------- #
# Basic I/O
# --------------------------------------------------------------------------- #


def test_pipe_and_cat_file(backend: Backend):
    fs, root = backend.fs()
    path = f"{root}/step_1/manifest.json"
    payload = json.dumps({"step": 1}).encode()
    _write(fs, path, payload)
    assert fs.cat_file(path) == payload
    assert fs.exists(path) and fs.isfile(path)
    assert fs.size(path) == len(payload)
    info = fs.info(path)
    assert info["type"] == "file" and info["size"] == len(payload)
    # overwrite
    fs.pipe_file(path, b"{}")
    assert fs.cat_file(path) == b"{}"
    # ranged read
    _write(fs, f"{root}/blob", b"0123456789")
    assert fs.cat_file(f"{root}/blob", start=2, end=5) == b"234"


def test_open_wb_streaming_roundtrip(backend: Backend):
    fs, root = backend.fs()
    path = f"{root}/step_2/shard-00000.bin"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    # 6 MiB in 1 MiB writes: crosses S3's 5 MiB multipart threshold and
    # gcsfs' resumable-upload threshold.
    with fs.open(path, "wb") as f:
        for _ in range(6):
            f.write(chunk)
    assert fs.size(path) == 6 * len(chunk)
    with fs.open(path, "rb") as f:
        first = f.read(len(chunk))
        f.seek(5 * len(chunk))
        last = f.read()
    assert first == chunk and last == chunk


def test_open_wb_visibility_before_close(backend: Backend):
    """Object stores publish the object only on close(); local/memory
    expose the (partial) file immediately."""
    fs, root = backend.fs()
    path = f"{root}/partial.bin"
    fs.makedirs(root, exist_ok=True)
    other, _ = backend.fs(fresh=True)
    f = fs.open(path, "wb", block_size=5 * 2**20)
    try:
        f.write(b"x" * (6 * 2**20))
        f.flush()  # s3: multipart part uploaded; gcs: resumable chunk sent
        visible = other.exists(path)
    finally:
        f.close()
    if backend.has_buckets:
        assert visible is False
    else:
        assert visible is True
    other.invalidate_cache()
    assert other.size(path) == 6 * 2**20


def test_cat_many_on_error_return(backend: Backend):
    fs, root = backend.fs()
    paths = [f"{root}/s{i}/manifest.json" for i in range(3)]
    for i, p in enumerate(paths):
        _write(fs, p, str(i).encode())
    missing = f"{root}/nope/manifest.json"
    out = fs.cat(paths + [missing], on_error="return")
    assert set(out) == set(paths) | {missing}, out.keys()
    for i, p in enumerate(paths):
        assert out[p] == str(i).encode()
    assert isinstance(out[missing], FileNotFoundError)
    # on_error="raise" (default)
    with pytest.raises(FileNotFoundError):
        fs.cat([paths[0], missing])


# --------------------------------------------------------------------------- #
# Listing
# --------------------------------------------------------------------------- #


def _populate(fs, root: str) -> None:
    for step in (1, 2, 10):
        _write(fs, f"{root}/step_{step}/manifest.json", b"{}")
        _write(fs, f"{root}/step_{step}/shard-0.bin", b"x" * step)
    _write(fs, f"{root}/step_3/shard-0.bin", b"incomplete")  # no manifest
    _write(fs, f"{root}/latest", b"step_10")


def test_glob_two_levels(backend: Backend):
    fs, root = backend.fs()
    _populate(fs, root)
    found = fs.glob(f"{root}/*/manifest.json")
    assert sorted(found) == sorted(f"{root}/step_{s}/manifest.json" for s in (1, 2, 10))
    # returned paths are in fs form (memory: leading "/"; no protocol)
    assert all("://" not in p for p in found)
    assert fs.glob(f"{root}/nothing/*/manifest.json") == []


def test_ls_directories(backend: Backend):
    fs, root = backend.fs()
    _populate(fs, root)
    listing = fs.ls(root, detail=True)
    by_name = {posixpath.basename(e["name"].rstrip("/")): e for e in listing}
    assert sorted(by_name) == ["latest", "step_1", "step_10", "step_2", "step_3"]
    for name, entry in by_name.items():
        expected = "file" if name == "latest" else "directory"
        assert entry["type"] == expected, entry
    assert _names(fs.ls(f"{root}/step_1", detail=False)) == ["manifest.json", "shard-0.bin"]
    # info() of a "directory"
    info = fs.info(f"{root}/step_1")
    assert info["type"] == "directory"
    assert fs.isdir(f"{root}/step_1") and not fs.isfile(f"{root}/step_1")
    # ls of a missing directory raises
    with pytest.raises(FileNotFoundError):
        fs.ls(f"{root}/missing")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/missing")
    # find = all files, recursively
    assert len(fs.find(root)) == 8


def test_rm_recursive(backend: Backend):
    fs, root = backend.fs()
    _populate(fs, root)
    fs.rm(f"{root}/step_2", recursive=True)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/step_2/manifest.json")
    assert fs.exists(f"{root}/step_1/manifest.json")
    # SeaweedFS keeps an emptied prefix as a folder (its filer's directory
    # entry): listed, exists() and isdir(); find() has only that entry.
    kept = backend.name == "seaweedfs"
    assert ("step_2" in _names(fs.ls(root, detail=False))) is kept
    assert fs.isdir(f"{root}/step_2") is kept
    fs.rm(root, recursive=True)
    fs.invalidate_cache()
    assert fs.exists(root) is kept
    assert fs.find(root) == ([root] if kept else [])
    if not kept:  # rm(recursive=True) of a missing path raises (on SeaweedFS it is still a folder)
        with pytest.raises(FileNotFoundError):
            fs.rm(f"{root}/step_2", recursive=True)


def test_exists_missing(backend: Backend):
    fs, root = backend.fs()
    assert fs.exists(root) is False
    assert fs.exists(f"{root}/a/b/manifest.json") is False
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/a/b/manifest.json")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{root}/a/b/manifest.json", "rb")


# --------------------------------------------------------------------------- #
# Caches
# --------------------------------------------------------------------------- #


def test_invalidate_cache_and_second_instance(backend: Backend):
    fs, root = backend.fs()
    _write(fs, f"{root}/step_1/manifest.json", b"{}")
    assert _names(fs.ls(root, detail=False)) == ["step_1"]  # populates fs' listing cache

    other, other_root = backend.fs(fresh=True)
    assert other is not fs or backend.name == "local"
    assert other_root == root
    _write(other, f"{root}/step_2/manifest.json", b"{}")

    stale = _names(fs.ls(root, detail=False))
    if backend.has_buckets:
        # s3fs/gcsfs cache listings per instance and never expire them by
        # default: the first instance does not see the other's write.
        assert stale == ["step_1"]
    else:
        assert stale == ["step_1", "step_2"]

    fs.invalidate_cache(root)
    assert _names(fs.ls(root, detail=False)) == ["step_1", "step_2"]
    assert sorted(fs.glob(f"{root}/*/manifest.json")) == [
        f"{root}/step_1/manifest.json",
        f"{root}/step_2/manifest.json",
    ]
    # invalidate_cache() without args also works
    _write(other, f"{root}/step_3/manifest.json", b"{}")
    fs.invalidate_cache()
    assert _names(fs.ls(root, detail=False)) == ["step_1", "step_2", "step_3"]
    # reading a file by exact path never goes through the listing cache
    _write(other, f"{root}/step_4/manifest.json", b"4")
    assert fs.cat_file(f"{root}/step_4/manifest.json") == b"4"


# --------------------------------------------------------------------------- #
# Semantics ckptman needs to know about
# --------------------------------------------------------------------------- #


def test_exclusive_create(backend: Backend):
    """pipe_file(mode="create") -- ckptman's create-only write -- refuses to
    overwrite everywhere; open("xb") everywhere but on fake-gcs-server. What
    the refusal raises depends on the server."""
    fs, root = backend.fs()
    path = f"{root}/LOCK"
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(path, b"first", mode="create")
    if backend.name == "seaweedfs":
        # A correct 412, but its XML lacks the <Condition> element s3fs
        # requires to map it to FileExistsError.
        refused: tuple[type[OSError], str | None] = (OSError, "pre-conditions you specified did not hold")
    else:
        refused = (FileExistsError, None)
    with pytest.raises(refused[0], match=refused[1]) as raised:
        fs.pipe_file(path, b"second", mode="create")
    if backend.name == "seaweedfs":
        assert raised.value.errno == errno.EINVAL and not isinstance(raised.value, FileExistsError)
    if backend.name == "gcs":
        # gcsfs sends ifGenerationMatch=0 with the resumable upload "xb"
        # starts; fake-gcs-server enforces it on multipart uploads only.
        with fs.open(path, "xb") as f:
            f.write(b"third")
        assert fs.cat_file(path) == b"third"
        return
    with pytest.raises(refused[0], match=refused[1]):
        with fs.open(path, "xb") as f:
            f.write(b"third")
    assert fs.cat_file(path) == b"first"


def test_mv_file(backend: Backend):
    fs, root = backend.fs()
    _write(fs, f"{root}/tmp/manifest.json.tmp", b"{}")
    fs.mv(f"{root}/tmp/manifest.json.tmp", f"{root}/tmp/manifest.json")
    assert fs.cat_file(f"{root}/tmp/manifest.json") == b"{}"
    assert not fs.exists(f"{root}/tmp/manifest.json.tmp")


def test_rm_file_missing(backend: Backend):
    fs, root = backend.fs()
    fs.makedirs(root, exist_ok=True)
    if backend.protocol == "s3":
        fs.rm_file(f"{root}/missing")  # S3 DELETE is idempotent: no error
    else:
        with pytest.raises(FileNotFoundError):
            fs.rm_file(f"{root}/missing")


def test_local_needs_parent_dirs(backend: Backend):
    fs, root = backend.fs()
    path = f"{root}/deep/er/file"
    if backend.name == "local":
        with pytest.raises(FileNotFoundError):
            fs.pipe_file(path, b"x")
        local_auto, _ = fsspec.core.url_to_fs(backend.url, auto_mkdir=True)
        local_auto.pipe_file(path, b"x")
    else:
        fs.pipe_file(path, b"x")  # no directories needed
    assert fs.cat_file(path) == b"x"


def test_empty_directories(backend: Backend):
    """makedirs leaves nothing behind on object stores."""
    fs, root = backend.fs()
    fs.makedirs(f"{root}/empty", exist_ok=True)
    if backend.has_buckets:
        assert not fs.exists(f"{root}/empty")
    else:
        assert fs.isdir(f"{root}/empty")
        assert fs.ls(f"{root}/empty") == []


@pytest.mark.parametrize("backend", REMOTE_BACKENDS, indirect=True)
def test_missing_bucket(backend: Backend):
    url = backend.missing_bucket_url()
    assert url is not None
    fs, path = fsspec.core.url_to_fs(url, **backend.storage_options)
    bucket = path.split("/", 1)[0]
    assert fs.exists(bucket) is False
    assert fs.exists(path) is False
    with pytest.raises(FileNotFoundError):
        fs.info(bucket)
    with pytest.raises(FileNotFoundError):
        fs.pipe_file(f"{path}/manifest.json", b"{}")
    with pytest.raises(FileNotFoundError):
        with fs.open(f"{path}/shard.bin", "wb") as f:
            f.write(b"x")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{path}/manifest.json")
    with pytest.raises(FileNotFoundError):
        fs.ls(path)
    if backend.protocol == "s3":
        assert fs.glob(f"{path}/*/manifest.json") == []
    else:  # gcsfs: listing a missing bucket raises even inside glob
        with pytest.raises(FileNotFoundError):
            fs.glob(f"{path}/*/manifest.json")
    with pytest.raises(FileNotFoundError):  # both: find() on a missing bucket
        fs.find(path)
    # makedirs: s3fs creates the bucket, gcsfs does nothing.
    fs.makedirs(path, exist_ok=True)
    fs.invalidate_cache()
    if backend.protocol == "s3":
        assert fs.exists(bucket)
        fs.rmdir(bucket)
    else:
        assert not fs.exists(bucket)


def test_local_and_memory_have_no_buckets(local_backend: Backend, memory_backend: Backend):
    for b in (local_backend, memory_backend):
        assert not b.has_buckets
        assert b.missing_bucket_url() is None
        with pytest.raises(ValueError):
            b.bucket_url("x")


def test_named_backend_fixtures(s3_backend: Backend, seaweedfs_backend: Backend, gcs_backend: Backend):
    assert s3_backend.name == "s3" and s3_backend.url.startswith("s3://")
    assert seaweedfs_backend.name == "seaweedfs" and seaweedfs_backend.url.startswith("s3://")
    assert gcs_backend.name == "gcs" and gcs_backend.url.startswith("gs://")
    assert s3_backend.bucket_url("other", "x") == "s3://other/x"
    assert seaweedfs_backend.bucket_url("other", "x") == "s3://other/x"
    assert gcs_backend.bucket_url("other") == "gs://other"
    # two S3 servers, two fsspec instances (the endpoint is part of the cache key)
    assert s3_backend.fs()[0] is not seaweedfs_backend.fs()[0]


@pytest.mark.parametrize("backend", REMOTE_BACKENDS, indirect=True)
def test_bucket_info(backend: Backend):
    fs, _ = backend.fs()
    info = fs.info(BUCKET)
    assert info["type"] == "directory" and info["size"] == 0
    assert fs.isdir(BUCKET)


# --------------------------------------------------------------------------- #
# Failure atomicity
# --------------------------------------------------------------------------- #


def test_exception_inside_open_block_still_commits(backend: Backend):
    """``with fs.open(p, "wb")`` closes -- i.e. publishes -- the partial file
    even when the block raises. Write to a temp name or use fs.transaction."""
    fs, root = backend.fs()
    fs.makedirs(root, exist_ok=True)
    path = f"{root}/partial.bin"
    with pytest.raises(RuntimeError):
        with fs.open(path, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"partial"


def test_transaction_discards_on_exception(backend: Backend):
    """Inside ``fs.transaction`` files are committed only when the block
    exits cleanly (s3: multipart aborted; gcs: resumable session cancelled;
    local: temp file removed; memory: never stored)."""
    fs, root = backend.fs()
    fs.makedirs(root, exist_ok=True)
    path = f"{root}/tx.bin"
    with pytest.raises(RuntimeError):
        with fs.transaction:
            with fs.open(path, "wb") as f:
                f.write(b"x" * 1024)
            raise RuntimeError("boom")
    fs.invalidate_cache()
    assert not fs.exists(path)
    with fs.transaction:
        with fs.open(path, "wb") as f:
            f.write(b"ok")
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"ok"


def test_mv_directory(backend: Backend):
    fs, root = backend.fs()
    _write(fs, f"{root}/tmp_step/a", b"a")
    _write(fs, f"{root}/tmp_step/b", b"b")
    if backend.protocol == "s3":
        # s3fs tries CopyObject on the pseudo-directory key itself -> NoSuchKey.
        # The files are copied, the source is NOT removed.
        with pytest.raises(FileNotFoundError):
            fs.mv(f"{root}/tmp_step", f"{root}/step_1", recursive=True)
        fs.invalidate_cache()
        assert _names(fs.ls(f"{root}/step_1", detail=False)) == ["a", "b"]
        assert fs.exists(f"{root}/tmp_step/a")
    else:
        # (gcsfs tries objects.move first; fake-gcs-server answers 400, gcsfs
        # logs it and copies + deletes)
        fs.mv(f"{root}/tmp_step", f"{root}/step_1", recursive=True)
        fs.invalidate_cache()
        assert _names(fs.ls(f"{root}/step_1", detail=False)) == ["a", "b"]
        assert not fs.exists(f"{root}/tmp_step")


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_gcsfs_root_listing_poisons_cache(backend: Backend):
    """gcsfs bug: after ``fs.ls("")`` (bucket listing, cached with names like
    "bucket/") info()/isdir()/exists() of keys directly under a bucket fail on
    that instance until ``invalidate_cache("")``."""
    fs, root = backend.fs(fresh=True)
    _write(fs, f"{root}/manifest.json", b"{}")
    top = root.split("/")[0] + "/" + root.split("/")[1]  # ckptman-test/<uuid>
    assert fs.info(top)["type"] == "directory"
    fs.ls("")
    with pytest.raises(FileNotFoundError):
        fs.info(top)
    assert fs.exists(top) is False  # wrong!
    fs.invalidate_cache("")
    assert fs.info(top)["type"] == "directory"
    assert fs.exists(top) is True


def test_patching_fs_methods(backend: Backend, monkeypatch: pytest.MonkeyPatch):
    """Async filesystems (s3fs, gcsfs) get most sync methods (rm on s3fs,
    cat_file/pipe_file/ls/info on both, ...) as *instance* attributes
    (fsspec.asyn.mirror_sync_methods), so ``monkeypatch.setattr(type(fs), ...)``
    does not affect them. Patch the instance: backend.fs() returns the same
    cached instance that ``url_to_fs(url, **storage_options)`` gives ckptman."""
    fs, root = backend.fs()
    same, _ = fsspec.core.url_to_fs(backend.url, **dict(backend.storage_options))
    assert same is fs
    if backend.has_buckets:
        assert "cat_file" in vars(fs)
    _write(fs, f"{root}/f", b"1")

    def boom(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(fs, "cat_file", boom)
    with pytest.raises(OSError, match="simulated"):
        same.cat_file(f"{root}/f")
    monkeypatch.undo()
    assert fs.cat_file(f"{root}/f") == b"1"
