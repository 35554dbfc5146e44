"""Local-disk publishing: how a small file replaces another so readers never see a partial one.

A local file is visible as soon as it is opened, so metadata is written to a
temporary name in the same folder, fsynced, renamed over the target (or, to
create it only if absent, hard-linked to it: ``link`` fails if the name
exists) and the folder fsynced.
"""

from __future__ import annotations

import contextlib
import os
import uuid

TMP_PREFIX = ".ckptman-tmp-"


def write_temporary(folder: str, name: str, data: bytes) -> str:
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def publish_local(path: str, data: bytes, *, exclusive: bool) -> bool:
    """Temporary file and fsync, then rename over the target (or, exclusive, link it: fails if the name exists),
    then fsync the folder. Readers see the old bytes or the new ones, never a partial file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = write_temporary(folder, os.path.basename(path), data)
    try:
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(folder)
    return True


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
