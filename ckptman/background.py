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
from typing import TYPE_CHECKING, Any, Callable

from ckptman import distributed
from ckptman.record import CheckpointRecord

if TYPE_CHECKING:
    import torch


class Snapshotter:
    """Copies state into host memory the training loop cannot touch, reusing last save's buffers.

    Copying into memory that is already allocated (and faulted in) is several
    times faster than into fresh tensors, which is most of the time an async
    save blocks the loop. The buffers of one snapshot are kept for the next:
    memory stays at one extra copy of the state, as with DCP's cached staging.
    Reuse is safe because a new snapshot is only taken after the previous
    save finished with it.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def take(self, state: Any) -> Any:
        """Containers rebuilt with their own types, tensors copied to CPU, other leaves deep-copied."""
        import torch  # only async saves snapshot tensors: importing ckptman stays fast

        used: dict[tuple[Any, ...], torch.Tensor] = {}

        def copy_tensor(path: tuple[Any, ...], tensor: torch.Tensor) -> torch.Tensor:
            if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
                return tensor.detach().clone()  # DTensor and other subclasses: their own copy keeps their layout
            key = (path, tensor.dtype, tuple(tensor.shape))
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            buffer.copy_(tensor.detach())
            used[key] = buffer
            return buffer

        def walk(path: tuple[Any, ...], value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return copy_tensor(path, value)
            if isinstance(value, dict):
                rebuilt = copy.copy(value)  # keeps OrderedDict/defaultdict and their attributes
                for key, item in value.items():
                    rebuilt[key] = walk((*path, key), item)
                return rebuilt
            if isinstance(value, list):
                return [walk((*path, i), item) for i, item in enumerate(value)]
            if isinstance(value, tuple):
                items = [walk((*path, i), item) for i, item in enumerate(value)]
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            if isinstance(value, (str, bytes, int, float, bool, type(None))):
                return value
            return copy.deepcopy(value)

        snapshot = walk((), state)
        self._buffers = used
        return snapshot


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

        def save() -> None:
            with distributed.during(f"the save of step {record.step}"):  # named if a peer rank is lost
                task()

        if self._executor is None:
            save()
            return
        with self._lock:
            self._inflight = record
            self._pending = self._executor.submit(save)

    def wait(self) -> None:
        """Block until the task in flight is done; raise its error (once)."""
        with self._lock:
            pending, self._pending = self._pending, None
            record = self._inflight
        if pending is None:
            return
        error = pending.exception()
        if error is not None:
            if hasattr(error, "add_note"):  # Python 3.11+; 3.10 raises it without the note
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
