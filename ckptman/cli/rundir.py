"""The run directory a command works on: opened through CheckpointManager, checked to be one.

A read-only manager on a path that does not exist sees "no checkpoints",
which would let a CI check on a misspelt path pass; here a missing path and
a checkpoint folder given instead of its run directory are errors with a
hint. Commands that change the directory open a writable manager with the
policy the writer recorded (so the sidecar keeps it) after those checks, so
nothing is ever created at a wrong path.
"""

from __future__ import annotations

import argparse
import inspect
import posixpath
import warnings
from dataclasses import dataclass
from typing import Any

from ckptman.cli import options as cli_options
from ckptman.cli import reach
from ckptman.errors import CheckpointError, CheckpointWarning
from ckptman.manager import CheckpointManager
from ckptman.manifest import MANIFEST_NAME, Manifest
from ckptman.policy import Policy, policy_from_config
from ckptman.state import SIDECAR_NAME


class NotARunDirectoryError(CheckpointError, FileNotFoundError):
    """The path does not exist, or is a checkpoint folder rather than the run directory holding it."""


@dataclass
class RunDirectory:
    """A directory with committed checkpoints (or an existing empty one), read-only, and its writer's policy."""

    url: str
    storage_options: dict[str, Any]
    reader: CheckpointManager

    @property
    def stored(self) -> dict[str, Any] | None:
        return self.reader.stored_state()

    def config(self) -> dict[str, Any]:
        """The writer's manager arguments from the sidecar ({} without one): what ``rm`` and ``gc`` reopen with."""
        stored = self.stored
        raw = stored["policy"].get("config") if stored else None
        if not isinstance(raw, dict):
            return {}
        self.policy()  # warns about settings this version does not know, and checks the rest
        known = inspect.signature(CheckpointManager.__init__).parameters
        return {key: value for key, value in raw.items() if key in known}

    def policy(self) -> Policy | None:
        """The writer's policy rebuilt from the sidecar, or None without one."""
        stored = self.stored
        if stored is None:
            return None
        return policy_from_config(stored["policy"].get("config"), f"{self.reader.directory}/{SIDECAR_NAME}")

    def writer(self) -> CheckpointManager:
        """A writable manager (it takes the lease) with the writer's recorded policy."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)  # the reader has shown them already
            config = self.config()
            return CheckpointManager(self.url, storage_options=self.storage_options, **config)

    def manifest(self, step: int) -> Manifest:
        """A committed checkpoint's manifest as stored (what ``info`` shows)."""
        fs, root = self.filesystem()
        name = self.reader.record(step).name
        return Manifest.from_bytes(fs.cat_file(posixpath.join(root, name, MANIFEST_NAME)), f"{self.reader.directory}/{name}")

    def filesystem(self) -> tuple[Any, str]:
        """fsspec's filesystem and path of the directory (the manager's own instance, from fsspec's cache)."""
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, str(path).rstrip("/")


def open_run(args: argparse.Namespace, *, must_exist: bool = True) -> RunDirectory:
    """Open ``args.directory`` read-only with the command line's storage options; refuse what is not a run directory."""
    options = cli_options.storage_options(args.directory, args)
    reach.check_reachable(args.directory, options)
    with reach.explained(args.directory):
        reader = CheckpointManager(args.directory, storage_options=options, read_only=True)
        run = RunDirectory(args.directory, options, reader)
        if must_exist and not reader.all_steps():
            _check_is_run_directory(run)
    return run


def _check_is_run_directory(run: RunDirectory) -> None:
    fs, path = run.filesystem()
    url = run.reader.directory
    if fs.exists(posixpath.join(path, MANIFEST_NAME)):
        parent = url.rsplit("/", 1)[0]
        raise NotARunDirectoryError(
            f"{url} is a checkpoint folder, not a run directory: give the run directory that holds it, {parent}"
        )
    if not fs.exists(path):
        raise NotARunDirectoryError(
            f"{url} does not exist; check the path (a run directory is the one you passed to CheckpointManager: "
            f"it holds {SIDECAR_NAME} and one folder per checkpoint)"
        )

