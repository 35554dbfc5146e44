"""``CkptmanCheckpointHook``: mmengine's ``CheckpointHook`` with ckptman underneath.

``import ckptman.mmengine`` registers the hook in mmengine's ``HOOKS``; swap it in with
``default_hooks=dict(checkpoint=dict(type="CkptmanCheckpointHook", out_dir="s3://bucket/runs", ...))``.

It is a subclass taking the seed hook's arguments with their meaning: *when*
to save is mmengine's rule (``interval``, ``by_epoch``, ``save_begin``,
``save_last``); each save is one ``mgr.save(step, <the runner's checkpoint
dict>, epoch=..., force=True)`` where the step is the iterations completed; a
validation whose ``save_best`` metric is a new best saves (or reports to) the
checkpoint of that step. The best is kept by retention, not copied to a
``best_*.pth``; ``max_keep_ckpts`` is ``keep_last``, with the best and the
latest always protected. Best scores and paths come from the directory's
manifests on every restart, never from ``message_hub``.

The checkpoint dict is the runner's own (``Runner`` and ``FlexibleRunner`` build it
in ``save_checkpoint``, run the ``before_save_checkpoint`` hooks, then write it
through mmengine's file backends): the hook calls ``runner.save_checkpoint`` and,
in its own ``before_save_checkpoint``, after the remaining hooks, takes the dict
and stops the call before mmengine serializes or writes anything. The dict is
stored with :mod:`ckptman.plainstate` encoding, so it loads with
``weights_only=True`` (mmengine #1655: message_hub's ``HistoryBuffer``).

Resume: ``Runner(resume=True)`` and ``FlexibleRunner(resume=True)`` read the local
file ``work_dir/last_checkpoint``. After every commit (and, for ``Runner``, in
``before_run``, which precedes its resume) the hook writes ``ckptman://<dir>`` there;
``ckptman://`` is registered with mmengine's ``CheckpointLoader``, which then loads
ckptman's latest *verified* checkpoint of that directory (falling back past
corrupted ones, which are then removed), decoded. ``ckptman://<dir>?step=N``
loads step N; both also work as ``load_from``. ``FlexibleRunner`` resumes
before any hook runs, so on a fresh ``work_dir`` pass ``resume="ckptman://<dir>"``.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

from ckptman.adapting import remove_dead_branch
from ckptman.distributed import THIS_PROCESS
from ckptman.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InvalidStepError,
    PolicyConfigError,
)
from ckptman.manager import CheckpointManager
from ckptman.plainstate import Codec, decode, encode
from ckptman.policy.best import Metric, coerce_metrics, enters_top_k
from ckptman.record import CheckpointRecord

__all__ = ["SCHEME", "CkptmanCheckpointHook", "load_from_ckptman"]

SCHEME = "ckptman://"
"""``ckptman://<directory>`` names the latest verified checkpoint of a directory for mmengine's loaders."""
_TOKEN_FILE = "last_checkpoint"  # what mmengine's find_latest_checkpoint reads in work_dir
_CAPTURE_NAME = "ckptman-capture.pth"  # never written: the capture stops save_checkpoint before the write
_MODES = {"greater": "max", "less": "min"}

_HISTORY_BUFFER = Codec(
    "mmengine.HistoryBuffer",
    HistoryBuffer,
    lambda buf: {"log": buf.data[0], "count": buf.data[1], "max_length": buf.max_length},
    lambda fields: HistoryBuffer(fields["log"], fields["count"], fields["max_length"]),
)
_CODECS = (_HISTORY_BUFFER,)


class _Captured(Exception):
    """Carries the runner's checkpoint dict out of ``save_checkpoint`` before mmengine writes it."""

    def __init__(self, checkpoint: dict[str, Any]) -> None:
        super().__init__("checkpoint captured by CkptmanCheckpointHook")
        self.checkpoint = checkpoint


@HOOKS.register_module()
class CkptmanCheckpointHook(CheckpointHook):
    """Drop-in for mmengine's ``CheckpointHook`` that commits through ckptman to any fsspec URL.

    ``out_dir`` (default ``work_dir``) may be any fsspec URL; as in the seed hook the
    run folder is ``out_dir/<basename of work_dir>`` when it is set.
    ``storage_options`` (fsspec's, e.g. ``{"client_kwargs": {"endpoint_url": ...}}``)
    replaces ``backend_args``. ``filename_tmpl`` only shaped file names and is
    ignored: checkpoint folders are named by ckptman.
    """

    def __init__(
        self,
        interval: int = -1,
        by_epoch: bool = True,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        out_dir: str | os.PathLike[str] | None = None,
        max_keep_ckpts: int = -1,
        save_last: bool = True,
        save_best: str | list[str] | None = None,
        rule: str | list[str] | None = None,
        greater_keys: Sequence[str] | None = None,
        less_keys: Sequence[str] | None = None,
        file_client_args: dict[str, Any] | None = None,
        filename_tmpl: str | None = None,
        backend_args: dict[str, Any] | None = None,
        published_keys: str | list[str] | None = None,
        save_begin: int = 0,
        *,
        storage_options: Mapping[str, Any] | None = None,
        lease_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        for name, value in (("backend_args", backend_args), ("file_client_args", file_client_args)):
            if value is not None:
                raise PolicyConfigError(
                    f"CkptmanCheckpointHook does not use mmengine's file backends, so {name} has no effect: "
                    "pass fsspec's storage_options instead (e.g. storage_options={'client_kwargs': "
                    "{'endpoint_url': 'http://127.0.0.1:9000'}} for an S3-compatible server)"
                )
        if out_dir is not None and not (isinstance(out_dir, (str, os.PathLike)) and os.fspath(out_dir)):
            raise PolicyConfigError(f"out_dir must be a path or fsspec URL, got {out_dir!r}")
        if isinstance(max_keep_ckpts, bool) or not isinstance(max_keep_ckpts, int):
            raise PolicyConfigError(f"max_keep_ckpts must be an int (-1 keeps all), got {max_keep_ckpts!r}")
        super().__init__(
            interval=interval,
            by_epoch=by_epoch,
            save_optimizer=save_optimizer,
            save_param_scheduler=save_param_scheduler,
            out_dir=None if out_dir is None else os.fspath(out_dir),
            max_keep_ckpts=max_keep_ckpts,
            save_last=save_last,
            save_best=save_best,
            rule=rule,
            greater_keys=greater_keys,
            less_keys=less_keys,
            filename_tmpl=filename_tmpl,
            published_keys=published_keys,
            save_begin=save_begin,
            **kwargs,
        )
        self.out_dir: str | None = self.out_dir  # a path or URL until bound, then the run folder's URL
        self._storage_options = dict(storage_options or {})
        self._lease_timeout = lease_timeout
        self._url: str | None = None  # the directory the manager is open on
        self._run_folder: str | None = None  # where out_dir/work_dir say it should be
        self._mgr: CheckpointManager | None = None
        self._capturing = False
        self._closed = False  # after_run released the lease; a new train() reopens
        self._writable = is_main_process()  # mmengine saves on the main process only
        _LIVE_HOOKS.append(weakref.ref(self))

    # -- the manager -------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The manager of the run folder (writable on the main process, read-only elsewhere)."""
        if self._mgr is None:
            raise CheckpointError("CkptmanCheckpointHook has no directory yet: it is bound when training starts")
        return self._mgr

    def _tracked(self) -> list[Metric]:
        """The ``save_best`` metrics with their modes; empty until ``"auto"`` has seen its first evaluation."""
        if not self.save_best or "auto" in self.key_indicators:
            return []
        return [Metric(key, _MODES[rule]) for key, rule in zip(self.key_indicators, self.rules)]  # type: ignore[arg-type]

    def _bind(self, url: str) -> CheckpointManager:
        """Open the manager of ``url`` once; a second, different directory is a configuration error."""
        if self._mgr is not None and not self._closed:
            if url.rstrip("/") != self._url:
                raise PolicyConfigError(
                    f"CkptmanCheckpointHook resumed from {self._url} but out_dir/work_dir resolve to {url}: "
                    "resume from the run folder the hook writes to, or set out_dir to it"
                )
            return self._mgr
        self._url, self._closed = url.rstrip("/"), False
        tracked = self._tracked()
        self._mgr = CheckpointManager(
            self._url,
            storage_options=self._storage_options,
            keep_last=self.max_keep_ckpts if self.max_keep_ckpts > 0 else None,
            best=[m.name for m in tracked] or None,
            mode={m.name: m.mode for m in tracked} or None,
            keep_best=1,
            read_only=not self._writable,
            lease_timeout=self._lease_timeout,
            process_group=THIS_PROCESS,
        )
        return self._mgr

    def _resolve(self, runner: Any) -> CheckpointManager:
        """The seed's rule: ``work_dir``, or ``out_dir/<basename of work_dir>`` when ``out_dir`` is set."""
        if self._run_folder is None:
            out, work_dir = self.out_dir, runner.work_dir
            folder = work_dir if out is None or out == work_dir else posixpath.join(out.rstrip("/"), os.path.basename(work_dir.rstrip(os.sep)))
            self._run_folder = folder if "://" in folder else os.path.abspath(folder)
        mgr = self._bind(self._run_folder)
        self.out_dir = mgr.directory
        return mgr

    # -- hook events -------------------------------------------------------------------
    def before_run(self, runner: Any) -> None:
        """``Runner`` resumes after this: point ``work_dir/last_checkpoint`` at this directory (or clear it)."""
        self._resolve(runner)
        self._point_resume_at_latest(runner)

    def before_train(self, runner: Any) -> None:
        mgr = self._resolve(runner)
        runner.logger.info(f"Checkpoints will be saved to {mgr.directory} by ckptman.")
        self._publish_progress(runner)

    def after_train_epoch(self, runner: Any) -> None:
        if self.by_epoch and (
            self.every_n_epochs(runner, self.interval, self.save_begin) or (self.save_last and self.is_last_train_epoch(runner))
        ):
            self._save(runner, step=runner.iter, epoch=runner.epoch + 1)

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if not self.by_epoch and (
            self.every_n_train_iters(runner, self.interval, self.save_begin)
            or (self.save_last and self.is_last_train_iter(runner))
        ):
            self._save(runner, step=runner.iter + 1, epoch=runner.epoch)

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        """A new best saves the checkpoint of this step, or adds the scores to it when it is already committed."""
        if self._mgr is None or not self.save_best:
            return  # a standalone runner.val(), or no best to track
        if not metrics:
            runner.logger.warning("Since `metrics` is an empty dict, the behavior to save the best checkpoint will be skipped.")
            return
        if "auto" in self.key_indicators:
            self._init_rule(self.rules, [next(iter(metrics))])
            self._rebind_with_metrics()
        mgr = self.manager
        scores = {m.name: metrics[m.name] for m in self._tracked() if metrics.get(m.name) is not None}
        if not scores or not self._writable:
            return
        step = runner.iter
        if step in mgr.all_steps():
            mgr.report(step, scores)
            self._publish_progress(runner)
            return
        candidate = CheckpointRecord(step, "candidate", coerce_metrics(scores))
        records = [mgr.record(s) for s in mgr.all_steps()]
        if any(enters_top_k(records, m, 1, candidate) for m in self._tracked()):
            self._save(runner, step=step, epoch=runner.epoch, metrics=scores)

    def after_train(self, runner: Any) -> None:
        """``published_keys``: the last and the best checkpoints, trimmed to those keys, as standalone ``.pth`` files."""
        if self._mgr is None:
            return
        self._mgr.wait_until_finished()
        if self.published_keys is None or not self._writable:
            return
        steps = [self._mgr.latest_step()] if self.save_last else []
        steps += [self._mgr.best_step(m.name) for m in self._tracked()]
        for step in dict.fromkeys(s for s in steps if s is not None):
            url = self._mgr.publish(step, keys=self.published_keys)
            print_log(f"The checkpoint of step {step} is published to {url}.", logger="current")

    def after_run(self, runner: Any) -> None:
        """Release the directory's lease once saves in flight are committed."""
        if self._mgr is not None:
            self._mgr.close()
            self._closed = True

    def before_save_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        """While the hook saves: run the hooks after this one, then take the dict before mmengine writes it."""
        if not self._capturing:
            return  # someone else's runner.save_checkpoint: theirs to write
        hooks = list(runner.hooks)
        for hook in hooks[hooks.index(self) + 1 :]:
            if hasattr(hook, "before_save_checkpoint"):
                hook.before_save_checkpoint(runner, checkpoint=checkpoint)
        raise _Captured(checkpoint)

    # -- saving ------------------------------------------------------------------------
    def _save(self, runner: Any, *, step: int, epoch: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Commit the runner's checkpoint dict as ckptman step ``step`` (iterations completed)."""
        mgr = self.manager
        checkpoint = self._capture(runner, step, epoch)
        if checkpoint is None or not self._writable:
            return  # save_checkpoint runs on the main process only
        mgr.save(step, encode(checkpoint, _CODECS), metrics=metrics, epoch=epoch, force=True)
        self._point_resume_at_latest(runner)
        self._publish_progress(runner)
        runner.logger.info(f"Saved checkpoint of iteration {step} (epoch {epoch}) to {mgr.directory} by ckptman.")

    def _capture(self, runner: Any, step: int, epoch: int) -> dict[str, Any] | None:
        meta = {"epoch": epoch, "iter": step}
        self._capturing = True
        try:
            runner.save_checkpoint(
                runner.work_dir,  # never written to: the capture ends the call before the write
                _CAPTURE_NAME,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=dict(meta),
                by_epoch=self.by_epoch,
                **self.args,
            )
        except _Captured as captured:
            # FlexibleRunner overwrites the meta it is given (epoch + 1 on a by-epoch save after validation).
            captured.checkpoint.setdefault("meta", {}).update(meta)
            return captured.checkpoint
        finally:
            self._capturing = False
        if is_main_process():
            raise CheckpointError(
                f"{type(runner).__name__}.save_checkpoint returned without calling the before_save_checkpoint hooks, "
                "so CkptmanCheckpointHook could not take its checkpoint dict"
            )
        return None

    def _rebind_with_metrics(self) -> None:
        """``save_best="auto"`` has just learnt its metric: reopen the manager so retention protects the best."""
        if self._mgr is not None and self._url is not None:
            self._mgr.close()
            self._mgr = None
            self._bind(self._url)

    # -- what mmengine and users read ----------------------------------------------------
    def _publish_progress(self, runner: Any) -> None:
        """The seed's ``message_hub`` keys and attributes, from the directory (right again after a restart)."""
        mgr = self.manager
        latest = mgr.latest_step()
        if latest is not None:
            self.last_ckpt = mgr.checkpoint_path(latest)
            runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        tracked = self._tracked()
        for metric in tracked:
            best = mgr.best_step(metric.name)
            if best is None:
                continue
            suffix = "" if len(self.key_indicators) == 1 else f"_{metric.name}"
            path = mgr.checkpoint_path(best)
            runner.message_hub.update_info(f"best_score{suffix}", mgr.metrics(best)[metric.name])
            runner.message_hub.update_info(f"best_ckpt{suffix}", path)
            if suffix:
                self.best_ckpt_path_dict[metric.name] = path
            else:
                self.best_ckpt_path = path

    def _point_resume_at_latest(self, runner: Any) -> None:
        """``work_dir/last_checkpoint`` names this directory once it has a checkpoint, so ``resume=True`` finds it."""
        if not self._writable:
            return
        mgr = self.manager
        token_file = Path(runner.work_dir) / _TOKEN_FILE
        token = SCHEME + mgr.directory
        current = token_file.read_text().strip() if token_file.is_file() else None
        if mgr.latest_step() is None:
            if current == token:
                token_file.unlink()  # nothing to resume from here any more: train from scratch
            return
        if current != token:
            token_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=token_file.parent, prefix=f".{_TOKEN_FILE}.")
            with os.fdopen(fd, "w") as out:
                out.write(token)
            os.replace(tmp, token_file)


_LIVE_HOOKS: list[weakref.ref[CkptmanCheckpointHook]] = []


def _hook_for(directory: str) -> CkptmanCheckpointHook | None:
    """The hook that writes ``directory``, else the newest one not bound yet (a runner resuming before ``before_run``)."""
    hooks = [hook for hook in (ref() for ref in _LIVE_HOOKS) if hook is not None]
    _LIVE_HOOKS[:] = [weakref.ref(hook) for hook in hooks]
    hooks = [hook for hook in hooks if not hook._closed]  # a finished run's hook is not the one resuming
    for hook in hooks:
        if hook._url == directory:
            return hook
    unbound = [hook for hook in hooks if hook._mgr is None]
    return unbound[-1] if unbound else None


def load_from_ckptman(filename: str, map_location: Any = None) -> dict[str, Any]:
    """mmengine's loader for ``ckptman://<directory>[?step=N]``: a verified, decoded checkpoint dict."""
    directory, _, query = filename[len(SCHEME) :].partition("?step=")
    directory = directory.rstrip("/")
    step = _parse_step(query, filename) if query else None
    hook = _hook_for(directory)
    mgr = hook._bind(directory) if hook is not None else CheckpointManager(directory, read_only=True, process_group=THIS_PROCESS)
    try:
        checkpoint = mgr.restore(step, map_location="cpu" if map_location is None else map_location)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{filename} names no committed checkpoint ({exc}); if it came from work_dir/{_TOKEN_FILE}, "
            "delete that file to train from scratch"
        ) from exc
    finally:
        if hook is None:
            mgr.close()
    decoded: dict[str, Any] = decode(checkpoint, _CODECS)
    if hook is not None and step is None and hook._writable:
        remove_dead_branch(mgr, int(decoded["meta"]["iter"]), stacklevel=2)
    return decoded


def _parse_step(text: str, filename: str) -> int:
    if not text.isdigit():
        raise InvalidStepError(f"{filename}: the step after '?step=' must be a non-negative integer, got {text!r}")
    return int(text)


CheckpointLoader.register_scheme(prefixes=SCHEME, loader=load_from_ckptman, force=True)
