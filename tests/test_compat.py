"""One on-storage format across versions (docs/storage-layout.md, "Compatibility across versions").

Backward: copies of ``tests/data/golden-0.1.0/run`` (written by ckptman 0.1.0,
see ``tests/data/make_golden_0_1_0.py``) read on every backend exactly as
``EXPECTED.json`` records, through the API and the CLI, and a writable manager
continues the run. Forward: 0.1.0 itself, extracted from git, reads what the
current code writes, or says "not supported" where a format version was bumped.
The sidecar's stored policy reads whatever keys a version wrote.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import pytest
from conftest import Backend

from ckptman import CheckpointManager, CheckpointWarning, ManifestError
from ckptman.cli import main
from ckptman.policy import build_policy, policy_from_config

pytestmark = pytest.mark.filterwarnings("error::ckptman.CheckpointWarning")

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden_0_1_0", DATA / "make_golden_0_1_0.py")
assert _spec is not None and _spec.loader is not None
golden_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_run)

GOLDEN_RUN = golden_run.OUTPUT / "run"
EXPECTED: dict[str, Any] = json.loads((golden_run.OUTPUT / "EXPECTED.json").read_text())
POLICY: dict[str, Any] = EXPECTED["policy"]
FOUND: dict[str, Any] = EXPECTED["found"]
UNSUPPORTED = "is not supported by this ckptman"  # 0.1.0's unknown-version error (jsonfmt.check_format)


# -- helpers ------------------------------------------------------------------------
def stored_digests(backend: Backend) -> dict[str, str]:
    """``relative path -> sha256`` of every object under the backend's run directory."""
    fs, root = backend.fs()
    fs.invalidate_cache()
    return {path[len(root) + 1 :]: hashlib.sha256(fs.cat_file(path)).hexdigest() for path in sorted(fs.find(root))}


def cli_options(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Storage options as ``--storage-option KEY=JSON`` arguments, nested dicts as dotted keys."""
    args: list[str] = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            args += cli_options(value, f"{prefix}{key}.")
        else:
            args += ["--storage-option", f"{prefix}{key}={json.dumps(value)}"]
    return args


def format_version(path: Path) -> int:
    version: int = json.loads(path.read_text())["version"]
    return version


def kept_by(found: Mapping[str, Any]) -> dict[int, list[str]]:
    return {int(step): entry["kept_by"] for step, entry in found["checkpoints"].items()}


def without_reasons(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "kept_by"}


@pytest.fixture
def golden(backend: Backend) -> Backend:
    """A fresh copy of the 0.1.0 run directory on ``backend``, uploaded as a user copies a bucket (fsspec ``put``)."""
    fs, root = backend.fs()
    fs.put(str(GOLDEN_RUN), root, recursive=True)
    assert stored_digests(backend) == golden_run.file_digests(GOLDEN_RUN)
    return backend


@pytest.fixture(scope="module")
def ckptman_0_1_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.1.0's ``ckptman`` package, extracted from git, for PYTHONPATH."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot extract ckptman 0.1.0 to run it")
    found = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", f"{golden_run.COMMIT}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {golden_run.COMMIT[:7]} (ckptman 0.1.0) is not in this clone (shallow?): cannot run 0.1.0")
    archive = subprocess.run(["git", "-C", str(repo), "archive", golden_run.COMMIT, "ckptman"], capture_output=True, check=True)
    target = tmp_path_factory.mktemp("ckptman-0.1.0")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


def read_with_0_1_0(package_root: Path, directory: str, policy: Mapping[str, Any]) -> dict[str, Any]:
    """0.1.0's ``ls --json``, ``verify`` and restores of ``directory``, in a subprocess (see make_golden_0_1_0.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(DATA / "make_golden_0_1_0.py"), "read", directory, json.dumps(policy)]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert Path(report["ckptman"]).is_relative_to(package_root), report["ckptman"]
    return report


def check_old_reader(report: Mapping[str, Any], found: Mapping[str, Any], bumped: set[str]) -> None:
    """0.1.0 reads ``found`` exactly, except files of a format version newer than it knows ("manifest",
    "state" for the sidecar): for those it must say "not supported", never misread them."""
    ls, verify = report["ls"], report["verify"]
    assert ls["code"] == 0, ls["stderr"]
    if "manifest" in bumped:  # every checkpoint is skipped with the error, and verify fails on them
        assert UNSUPPORTED in ls["stderr"] and report["found"]["steps"] == [] and verify["code"] == 1
        return
    assert verify["code"] == 0, verify
    assert report["found"] == found
    if "state" in bumped:  # the sidecar is ignored with the error; the manifests still list everything
        assert UNSUPPORTED in ls["stderr"]
        return
    assert "warning" not in ls["stderr"], ls["stderr"]
    assert {c["step"]: c["reasons"] for c in json.loads(ls["stdout"])["checkpoints"]} == kept_by(found)


# -- backward: the current code on 0.1.0's directory -------------------------------------
@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "writable"])
def test_reads_0_1_0_directory(golden: Backend, read_only: bool) -> None:
    """Same steps, metrics (NaN stays NaN), best steps, kept-by reasons and byte-identical restores;
    opening it, even writable, changes nothing on storage (the 0.1.0 sidecar is current) and leaves no lock."""
    found = golden_run.read_back(golden.url, POLICY, golden.storage_options, read_only=read_only)
    assert found == FOUND
    assert stored_digests(golden) == golden_run.file_digests(GOLDEN_RUN)


def test_cli_on_0_1_0_directory(golden: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    """``ckptman ls`` rebuilds the policy from 0.1.0's sidecar; ``ckptman verify`` checks every file."""
    options = cli_options(golden.storage_options)
    assert main(["ls", "--json", golden.url, *options]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err, err
    listed = json.loads(out)
    assert {c["step"]: c["reasons"] for c in listed["checkpoints"]} == kept_by(FOUND)
    metrics = {str(c["step"]): {k: float(v) for k, v in c["metrics"].items()} for c in listed["checkpoints"]}  # "NaN" -> nan
    assert {step: golden_run.json_metrics(values) for step, values in metrics.items()} == {
        step: entry["metrics"] for step, entry in FOUND["checkpoints"].items()
    }
    assert listed["best"] == {name: [step] for name, step in FOUND["best"].items()}

    assert main(["ls", golden.url, *options]) == 0
    out, err = capsys.readouterr()
    assert all(entry["name"] in out for entry in FOUND["checkpoints"].values()) and "warning" not in err, err

    assert main(["verify", "--json", golden.url, *options]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [c["step"] for c in report["checkpoints"]] == FOUND["steps"]


def test_continues_0_1_0_run(golden: Backend) -> None:
    """A writable manager with the same policy saves on, rotates 0.1.0's checkpoints and keeps the best right."""
    recency = {"latest", f"last {POLICY['keep_last']}"}
    worse = {"val/loss": 10.0, "val/acc": 0.0}  # worse than every 0.1.0 value: never best
    archived = {step for step, reasons in kept_by(FOUND).items() if not set(reasons) <= recency}
    old_best = FOUND["best"]["val/loss"]
    assert FOUND["checkpoints"][str(old_best)]["kept_by"] == ["best val/loss #1"]  # premise of the last check
    with CheckpointManager(golden.url, storage_options=golden.storage_options, **POLICY) as mgr:
        assert mgr.save(80, golden_run.state_at(80), metrics=worse)
        with mgr.save_directory(90, metrics=worse) as folder:
            assert folder is not None
            golden_run.write_files(folder, golden_run.files_at(90))
        # The 0.1.0 checkpoints kept only for being newest are rotated away; the best stay best.
        assert mgr.all_steps() == sorted(archived | {80, 90})
        assert {name: mgr.best_step(name) for name in POLICY["best"]} == FOUND["best"]

        best = {"val/loss": 0.01, "val/acc": 0.0}
        assert mgr.save(100, golden_run.state_at(100), metrics=best)
        assert mgr.best_step("val/loss") == 100 and mgr.best_step("val/acc") == FOUND["best"]["val/acc"]
        assert old_best not in mgr.all_steps()  # 0.1.0's directory checkpoint, deleted by the new best
        assert mgr.verify().ok

    after = golden_run.read_back(golden.url, POLICY, golden.storage_options)
    assert after["steps"] == sorted(archived - {old_best} | {90, 100})
    for step in archived - {old_best}:
        assert without_reasons(after["checkpoints"][str(step)]) == without_reasons(FOUND["checkpoints"][str(step)])
    golden_run.check_saved({"checkpoints": {s: after["checkpoints"][s] for s in ("90", "100")}}, {90: worse, 100: best})


# -- forward: 0.1.0 on what the current code writes ---------------------------------------
#: What the current code writes for 0.1.0 to read, as (policy, pass epoch=): add a case for every new
#: setting or field it can store. The epoch trigger's setting makes the sidecar version 2; ``epoch`` is a
#: manifest field 0.1.0 ignores.
WRITERS: dict[str, tuple[dict[str, Any], bool]] = {
    "golden-policy": (POLICY, False),
    "defaults": ({}, False),
    "epochs": ({**POLICY, "save_interval_epochs": 1}, True),
}


@pytest.mark.parametrize("policy, epochs", WRITERS.values(), ids=WRITERS.keys())
def test_0_1_0_reads_what_this_version_writes(ckptman_0_1_0: Path, tmp_path: Path, policy: dict[str, Any], epochs: bool) -> None:
    directory = str(tmp_path / "run")
    with CheckpointManager(directory, **policy) as mgr:
        given = golden_run.write_run(mgr, epochs=epochs)
    found = golden_run.read_back(directory, policy)
    golden_run.check_saved(found, given)
    report = read_with_0_1_0(ckptman_0_1_0, directory, policy)
    written = {
        "manifest": max(map(format_version, Path(directory).glob("*/ckptman-manifest.json"))),
        "state": format_version(Path(directory, "ckptman.json")),
    }
    check_old_reader(report, found, {name for name, version in written.items() if version > report["versions"][name]})


@pytest.mark.parametrize("bumped", ["manifest", "state"])
def test_0_1_0_refuses_a_newer_format_version(ckptman_0_1_0: Path, tmp_path: Path, bumped: str) -> None:
    """The escape hatch of the rule: a bumped version makes 0.1.0 say "not supported" instead of misreading."""
    directory = tmp_path / "run"
    shutil.copytree(GOLDEN_RUN, directory)
    files = directory.glob("step_*/ckptman-manifest.json") if bumped == "manifest" else [directory / "ckptman.json"]
    for path in files:
        document = json.loads(path.read_text())
        path.write_text(json.dumps({**document, "version": document["version"] + 1}))
    check_old_reader(read_with_0_1_0(ckptman_0_1_0, str(directory), POLICY), FOUND, {bumped})


# -- the sidecar's stored policy config -----------------------------------------------------
STORED_CONFIG: dict[str, Any] = json.loads((GOLDEN_RUN / "ckptman.json").read_text())["policy"]["config"]


def test_build_policy_defaults_are_the_managers() -> None:
    """Every stored setting can be missing: build_policy's defaults, which must be the manager's."""
    manager = inspect.signature(CheckpointManager).parameters
    for name, parameter in inspect.signature(build_policy).parameters.items():
        assert parameter.default is not inspect.Parameter.empty, name
        assert name in manager, f"build_policy({name}=...) is not a CheckpointManager argument"
        assert parameter.default == manager[name].default, name


@pytest.mark.parametrize("config", [STORED_CONFIG, build_policy(keep_last=3, best="loss").config], ids=["0.1.0", "current"])
def test_stored_config_round_trips(config: Mapping[str, Any]) -> None:
    policy = policy_from_config(config, "sidecar")  # no warning: the module turns them into errors
    assert policy == build_policy(**config) and policy.config == config


@pytest.mark.parametrize("config", [{}, {"keep_last": 2}, {"save_interval_steps": 10, "best": ["val/loss"]}])
def test_missing_config_keys_take_their_defaults(config: Mapping[str, Any]) -> None:
    policy = policy_from_config(config, "sidecar")  # 0.1.0 raised "must be an object with keys [...]"
    assert policy == build_policy(**config) and policy.config == build_policy(**config).config


def test_unknown_config_keys_warn_and_are_ignored() -> None:
    with pytest.warns(CheckpointWarning, match="save_interval_fortnights"):
        policy = policy_from_config({**STORED_CONFIG, "save_interval_fortnights": 2}, "sidecar")
    assert policy == build_policy(**STORED_CONFIG) and policy.config == STORED_CONFIG


@pytest.mark.parametrize(
    "key, value", [("keep_last", "2"), ("save_interval_steps", True), ("keep_best", 0), ("keep_every", 1.5), ("best", 5)]
)
def test_wrong_config_type_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ManifestError, match=rf"policy\.config.*{key}"):
        policy_from_config({**STORED_CONFIG, key: value}, "sidecar")


def test_config_must_be_an_object() -> None:
    with pytest.raises(ManifestError, match=r"'policy\.config' must be an object"):
        policy_from_config(["keep_last", 2], "sidecar")


def test_ls_reads_a_sidecar_from_a_newer_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A setting this version does not know is one warning line; the listing is unchanged."""
    directory = tmp_path / "run"
    shutil.copytree(GOLDEN_RUN, directory)
    sidecar = json.loads((directory / "ckptman.json").read_text())
    sidecar["policy"]["config"]["save_interval_fortnights"] = 2
    (directory / "ckptman.json").write_text(json.dumps(sidecar))
    with warnings.catch_warnings():
        warnings.simplefilter("default", CheckpointWarning)  # shown by the CLI, not raised
        assert main(["ls", "--json", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert "ckptman: warning:" in err and "save_interval_fortnights" in err
    assert {c["step"]: c["reasons"] for c in json.loads(out)["checkpoints"]} == kept_by(FOUND)
