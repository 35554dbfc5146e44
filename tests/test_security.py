"""Credentials in storage_options never reach reprs, logs, warnings, errors, the sidecar or manifests."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch

from ckptman import CheckpointError, CheckpointManager, RetryPolicy

SECRET = "SUPER-SECRET-7f3a9c"


def test_credentials_never_leak(s3_backend: Any, caplog: Any, capsys: Any) -> None:
    options = {**s3_backend.storage_options, "secret": SECRET}
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(s3_backend.url, storage_options=options, best="loss", keep_last=1) as mgr:
            mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": 1.0})
            mgr.save(2, {"w": torch.ones(2)}, metrics={"loss": 2.0})
            mgr.report(2, {"loss": 0.5})
            seen += [repr(mgr), str(mgr.state_dict()), str(mgr.stored_state()), mgr.directory]
            with pytest.raises(CheckpointError) as raised:
                mgr.restore(99)
            seen.append(str(raised.value))
        # Nothing listens on port 9; one attempt per call, so the error comes quickly.
        failing = {
            **options,
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"retries": {"max_attempts": 1}},
            "retries": 1,
        }
        with pytest.raises(CheckpointError) as raised:
            CheckpointManager(s3_backend.url, storage_options=failing, retry=RetryPolicy(attempts=2, initial_backoff=0.01))
        seen += [str(raised.value), repr(raised.value.__cause__)]
        seen += [str(w.message) for w in caught]
    seen.append(caplog.text)
    seen += list(capsys.readouterr())
    fs, root = s3_backend.fs()
    fs.invalidate_cache()
    seen += [data.decode(errors="replace") for data in fs.cat(fs.find(root)).values()]
    leaked = [text for text in seen if SECRET in text]
    assert not leaked, leaked
