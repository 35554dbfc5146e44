"""Asynchronous saves: host-memory snapshots and one background writer.

``save(async_save=True)`` blocks the training loop only while the state is
copied to host memory; serialization, upload, commit and retention run on a
single background thread. At most one save is in flight (the next waits for
it), which bounds memory to one extra copy of the state. An error in the
background is raised by the manager's next call, exactly once, never lost.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from ckptman.record import CheckpointRecord


def snapshot(state: Any) -> Any:
    """A copy of ``state`` the training loop may mutate freely: tensors copied to CPU memory.

    Containers are rebuilt with their own types; a tensor reached twice (or two
    identical views) is copied once. Non-tensor leaves are deep-copied.
    """
    memo: dict[Any, Any] = {}

    def copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key not in memo:
            memo[key] = tensor.detach().to("cpu", copy=True)
        return memo[key]

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copy_tensor(value)
        if isinstance(value, dict):
            rebuilt = copy.copy(value)  # keeps OrderedDict/defaultdict and their attributes
            for key, item in value.items():
                rebuilt[key] = walk(item)
            return rebuilt
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, tuple):
            items = [walk(item) for item in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, (str, bytes, int, float, bool, type(None))):
            return value
        return copy.deepcopy(value)

    return walk(state)


class BackgroundWriter:
    """Runs save tasks one at a time, off the caller's thread (or inline when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptman-save") if enabled else None
        self._pending: Future[None] | None = None
        self._inflight: CheckpointRecord | None = None
        self._lock = threading.Lock()

    @property
    def inflight(self) -> CheckpointRecord | None:
        """The checkpoint being written now (not yet committed), if any."""
        pending = self._pending
        return self._inflight if pending is not None and not pending.done() else None

    def submit(self, task: Callable[[], None], record: CheckpointRecord) -> None:
        """Run ``task`` after the previous one; inline when asynchronous saving is off."""
        self.wait()
        if self._executor is None:
            task()
            return
        with self._lock:
            self._inflight = record
            self._pending = self._executor.submit(task)

    def wait(self) -> None:
        """Block until the task in flight is done; raise its error (once)."""
        with self._lock:
            pending, self._pending = self._pending, None
            record = self._inflight
        if pending is None:
            return
        error = pending.exception()
        if error is not None:
            error.add_note(f"ckptman: raised by the background save of step {record.step if record else '?'}")
            raise error

    def raise_if_failed(self) -> None:
        """Without blocking: raise the error of a background save that already failed."""
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
