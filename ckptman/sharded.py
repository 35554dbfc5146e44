"""Sharded state through PyTorch Distributed Checkpoint (DCP), committed by ckptman's manifest.

DCP writes each rank's shards (``__<rank>_<n>.distcp``) and, on the
coordinator, ``.metadata`` through its fsspec writer into the checkpoint
folder. DCP's own "commit" (renaming ``.metadata.tmp``) is not atomic on
object stores; ckptman does not rely on it: the folder counts only once
ckptman's manifest, listing and checksumming every DCP file, is written.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator, Mapping

from ckptman.distributed import Coordinator

_SHARD = re.compile(r"__(\d+)_\d+\.distcp")


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """With no_dist=True DCP still warns that it assumes one process: that is what was asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _process_group(ranks: Coordinator) -> dict[str, Any]:
    group = getattr(ranks, "group", None)
    return {"process_group": group} if group is not None else {"no_dist": True}


def save(state: dict[str, Any], url: str, storage_options: Mapping[str, Any], ranks: Coordinator, durable: bool) -> None:
    """Every rank calls this with its own (sharded) state; DCP decides who writes what."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    writer = FsspecWriter(url, sync_files=durable, **storage_options)
    with _single_process_is_intended():
        dcp.save(state, storage_writer=writer, **_process_group(ranks))


def load(state: dict[str, Any], url: str, storage_options: Mapping[str, Any], ranks: Coordinator) -> None:
    """Load in place into ``state`` (DCP reshards to this run's world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    with _single_process_is_intended():
        dcp.load(state, storage_reader=FsspecReader(url, **storage_options), **_process_group(ranks))


def files_of_rank(paths: list[str], rank: int) -> list[str]:
    """The DCP files a rank checksums: its own shards; the coordinator also everything else (``.metadata``)."""
    mine = []
    for path in paths:
        shard = _SHARD.fullmatch(path.rsplit("/", 1)[-1])
        owner = int(shard.group(1)) if shard else 0
        if owner == rank:
            mine.append(path)
    return mine
