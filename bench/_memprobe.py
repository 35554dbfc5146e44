"""Child process of bench.py: peak extra host memory (RSS) of ONE save, in a fresh process.

    python bench/_memprobe.py CONTENDER --mib 256 --tensors 4 --dir /tmp/x

CONTENDER is one of: torch_save, ckptman_sync, ckptman_async, dcp_async; with
``--endpoint http://127.0.0.1:PORT`` (an S3 server, bucket ckptman-bench) also
torch_s3 (torch.save into an s3fs file) and ckptman_s3 (a synchronous save there).

The state is built and a tiny warm-up save is done first (imports, lazy
initialisation, thread pools), then the RSS baseline is taken and the one
measured save runs (plus ``wait_until_finished()`` / the DCP future).  The peak
is the larger of

* a sampler thread reading ``/proc/self/statm`` every 1 ms (it can only run
  when the saving code lets go of the GIL), and
* ``ru_maxrss`` after the save, when the save raised the process's lifetime
  peak (exact, but useless when an earlier moment was higher).

Prints one JSON line: ``{"peak_extra": bytes, "state": bytes, ...}`` or
``{"na": "..."}`` / ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DCP_WARNING, describe, fsync_path, is_not_implemented, make_state, state_bytes  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._f = open("/proc/self/statm", "rb", buffering=0)  # noqa: SIM115
        self._done = threading.Event()
        self.peak = self.rss()

    def rss(self) -> int:
        self._f.seek(0)
        return int(self._f.read().split()[1]) * PAGE

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def finish(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, self.rss())
        self._f.close()
        return self.peak


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def saver(kind: str, base: str, endpoint: str | None = None):
    """A function ``save(state, n)`` doing one complete save (returns when durable)."""
    import torch

    if kind in ("torch_s3", "ckptman_s3"):
        import uuid

        import fsspec
        from _common import BUCKET, s3_options

        from ckptman import CheckpointManager

        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        opts = s3_options(endpoint or "")
        fs = fsspec.filesystem("s3", **opts)
        prefix = f"{BUCKET}/{uuid.uuid4().hex}"
        if kind == "torch_s3":

            def save(state, n):
                with fs.open(f"{prefix}/t{n}/state.pt", "wb") as f:
                    torch.save(state, f)

            save.close = lambda: fs.rm(prefix, recursive=True)  # type: ignore[attr-defined]
            return save
        mgr = CheckpointManager(f"s3://{prefix}/run", storage_options=opts, progress=False)

        def save(state, n):
            if not mgr.save(n, state, force=True):
                raise RuntimeError("save() returned False")
            mgr.delete(n)

        def close() -> None:
            mgr.close()
            fs.rm(prefix, recursive=True)

        save.close = close  # type: ignore[attr-defined]
        return save

    if kind == "torch_save":

        def save(state, n):
            folder = os.path.join(base, f"t{n}")
            os.makedirs(folder)
            path = os.path.join(folder, "state.pt")
            torch.save(state, path)
            fsync_path(path)
            fsync_path(folder)

        return save
    if kind in ("ckptman_sync", "ckptman_async"):
        import inspect

        from ckptman import CheckpointManager

        kwargs: dict = {"async_save": True} if kind == "ckptman_async" else {}
        if "progress" in inspect.signature(CheckpointManager).parameters:
            kwargs["progress"] = False  # no progress bars (they would draw on a terminal)
        # One manager for the warm-up and the measured save, as in a training loop.
        mgr = CheckpointManager(os.path.join(base, "ckptman"), **kwargs)

        def save(state, n):
            if not mgr.save(n, state):
                raise RuntimeError("save() returned False")
            mgr.wait_until_finished()
            if mgr.all_steps() != [n]:
                raise RuntimeError(f"committed steps {mgr.all_steps()}, not [{n}]")
            mgr.delete(n)

        save.close = mgr.close  # type: ignore[attr-defined]
        return save
    if kind == "dcp_async":
        import torch.distributed.checkpoint as dcp

        def save(state, n):
            result = dcp.async_save(state, checkpoint_id=os.path.join(base, f"d{n}"), no_dist=True)
            getattr(result, "upload_completion", result).result()

        return save
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("contender", choices=("torch_save", "ckptman_sync", "ckptman_async", "dcp_async", "torch_s3", "ckptman_s3"))
    parser.add_argument("--endpoint", help="S3 endpoint for torch_s3 / ckptman_s3")
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=DCP_WARNING)
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix=f"{args.contender}-", dir=args.dir)

    try:
        save = saver(args.contender, base, args.endpoint)
        save(make_state(1, 2, seed=1), 0)  # warm-up: imports, thread pools, first-call costs
    except Exception as exc:  # noqa: BLE001
        key = "na" if is_not_implemented(exc) else "error"
        print(json.dumps({key: describe(exc)}))
        return

    state = make_state(args.mib, args.tensors)
    size = state_bytes(state)
    gc.collect()
    time.sleep(0.05)
    sampler = Sampler()
    baseline = sampler.rss()
    before_max = maxrss()
    sampler.start()
    t0 = time.perf_counter()
    try:
        save(state, 1)
    except Exception as exc:  # noqa: BLE001
        sampler.finish()
        print(json.dumps({"error": describe(exc)}))
        return
    elapsed = time.perf_counter() - t0
    sampled = sampler.finish()
    after_max = maxrss()
    getattr(save, "close", lambda: None)()
    peak = max(sampled, after_max if after_max > before_max else 0)
    shutil.rmtree(base, ignore_errors=True)
    print(
        json.dumps(
            {
                "peak_extra": peak - baseline,
                "state": size,
                "baseline_rss": baseline,
                "sampled_peak": sampled,
                "maxrss_before": before_max,
                "maxrss_after": after_max,
                "elapsed": elapsed,
            }
        )
    )


if __name__ == "__main__":
    main()
