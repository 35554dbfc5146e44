"""The commands that change a directory or copy out of it: ``rm``, ``gc``, ``restore``, ``publish``.

Deleting and cleaning up go through a writable CheckpointManager, so they
take the directory's lease (a running job's directory is refused with its
holder named) and keep the sidecar, ``latest`` and the recorded policy
consistent, exactly as the library does it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import posixpath
from dataclasses import dataclass
from typing import Any, TextIO

from ckptman import commit
from ckptman.cli import documents
from ckptman.cli.exitcodes import EXIT_OK
from ckptman.cli.output import emit_json, emit_lines, human_size
from ckptman.cli.rundir import RunDirectory, open_run
from ckptman.errors import CheckpointError
from ckptman.localdisk import TMP_PREFIX
from ckptman.manager import CheckpointManager
from ckptman.naming import NameFormat
from ckptman.storage import Storage


class RefusedError(CheckpointError, ValueError):
    """The command would do something it does only when told explicitly (``--force``, an empty ``--to``)."""


#: the folder names the CLI's writable manager recognises as its own (the library's default)
DEFAULT_NAME_FORMAT: str = inspect.signature(CheckpointManager.__init__).parameters["name_format"].default


# -- rm ---------------------------------------------------------------------------
def cmd_rm(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    steps = sorted(set(args.steps))
    for step in steps:
        run.reader.record(step)  # all exist before anything is deleted
    latest = run.reader.latest_step()
    if latest in steps and not args.force:
        raise RefusedError(
            f"step {latest} is the latest checkpoint in {run.reader.directory}, the one a restarted run resumes from; "
            "pass --force to delete it anyway"
        )
    with run.writer() as writer:
        for step in steps:
            writer.delete(step)
        remaining, new_latest = writer.all_steps(), writer.latest_step()
    if args.json:
        emit_json(
            {
                "schema": documents.SCHEMA_VERSION,
                "directory": run.reader.directory,
                "deleted": steps,
                "latest": new_latest,
                "steps": remaining,
            },
            out,
        )
    else:
        emit_lines([f"deleted step {step} from {run.reader.directory}" for step in steps], out)
        print(f"latest is now {'step ' + str(new_latest) if new_latest is not None else 'none'}", file=out)
    return EXIT_OK


# -- gc ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Leftovers:
    """What interrupted saves left: folders without manifest, temporary files, an out-of-date sidecar."""

    incomplete: tuple[str, ...]
    temporaries: tuple[str, ...]
    unreadable: tuple[str, ...]
    sidecar_stale: bool

    @property
    def removable(self) -> tuple[str, ...]:
        return self.incomplete + self.temporaries


def find_leftovers(run: RunDirectory) -> Leftovers:
    """What a writable manager removes or repairs when it opens (:meth:`ckptman.bookkeeping.Bookkeeper.scan`)."""
    storage = Storage(run.url, run.storage_options)
    found = commit.scan(storage, NameFormat(DEFAULT_NAME_FORMAT).matches)
    temporaries: list[str] = []
    if storage.is_local and os.path.isdir(storage.root):
        for folder in ["", *found.committed, *found.incomplete]:
            base = storage.path(folder)
            if os.path.isdir(base):
                temporaries += [posixpath.join(folder, n) if folder else n for n in os.listdir(base) if n.startswith(TMP_PREFIX)]
    stored = run.stored
    stale = stored is not None and [c["step"] for c in stored["checkpoints"]] != run.reader.all_steps()
    return Leftovers(tuple(found.incomplete), tuple(sorted(temporaries)), tuple(sorted(found.unreadable)), stale)


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    before = find_leftovers(run)
    if args.yes and (before.removable or before.sidecar_stale):
        run.writer().close()  # opening writable removes and repairs them, under the lease
        after = find_leftovers(run)
        removed = [item for item in before.removable if item not in after.removable]
        repaired = before.sidecar_stale and not after.sidecar_stale
    else:
        after, removed, repaired = before, [], False
    document: dict[str, Any] = {
        "schema": documents.SCHEMA_VERSION,
        "directory": run.reader.directory,
        "dry_run": not args.yes,
        "incomplete": list(before.incomplete),
        "temporaries": list(before.temporaries),
        "sidecar_stale": before.sidecar_stale,
        "removed": removed,
        "sidecar_repaired": repaired,
        "unreadable": list(before.unreadable),
    }
    if args.json:
        emit_json(document, out)
        return EXIT_OK
    directory = run.reader.directory
    lines = [f"{directory}/{item}: {'removed' if item in removed else 'would remove'}" for item in before.removable]
    if before.sidecar_stale:
        lines.append(f"{directory}/ckptman.json: {'rebuilt' if repaired else 'would rebuild'} from the manifests")
    lines += [f"{directory}/{name}: unreadable manifest, kept; inspect it and delete it by hand" for name in before.unreadable]
    if not (before.removable or before.sidecar_stale):
        lines.append(f"nothing to clean up in {directory}")
    elif not args.yes:
        lines.append("dry run: nothing was changed; run again with --yes to clean up")
    emit_lines(lines, out)
    return EXIT_OK


# -- restore ------------------------------------------------------------------------
def cmd_restore(args: argparse.Namespace, out: TextIO) -> int:
    target = os.path.abspath(args.to)
    if os.path.isfile(target) or (os.path.isdir(target) and os.listdir(target)):
        raise RefusedError(f"--to {args.to} exists and is not an empty directory; restore into a new or empty one")
    run = open_run(args)
    manifest = run.manifest(run.reader.record(args.step).step)
    run.reader.restore_directory(manifest.step, local_dir=target)
    if args.json:
        emit_json(
            {
                "schema": documents.SCHEMA_VERSION,
                "directory": run.reader.directory,
                **documents.checkpoint(manifest.record()),
                "to": target,
                "files": documents.files(manifest),
            },
            out,
        )
    else:
        print(
            f"restored {manifest.name} (step {manifest.step}, {manifest.kind}, {human_size(manifest.size)}, "
            f"{len(manifest.files)} files, verified) into {target}",
            file=out,
        )
    return EXIT_OK


# -- publish ------------------------------------------------------------------------
def cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    run = open_run(args)
    keys = [key.strip() for key in args.keys.split(",") if key.strip()] if args.keys else None
    if args.to is None:  # into <directory>/published/: a change to the directory, under the lease
        with run.writer() as writer:
            url = writer.publish(args.step, keys=keys)
    else:
        url = run.reader.publish(args.step, keys=keys, to=args.to)
    if args.json:
        emit_json(
            {"schema": documents.SCHEMA_VERSION, "directory": run.reader.directory, "step": args.step, "keys": keys, "url": url},
            out,
        )
    else:
        print(f"published step {args.step}{' keys ' + ','.join(keys) if keys else ''} as {url}", file=out)
    return EXIT_OK
