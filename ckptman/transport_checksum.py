"""The S3 client's response checksum, skipped for the GETs whose every byte ckptman checks itself.

botocore (>= 1.36, under s3fs) asks S3 for the object's CRC32 on every
whole-object GET and computes it over the body as it arrives. On a restore
from SeaweedFS that was a quarter of the client's CPU (``perf``: zlib's
``crc32_z`` 22-25%), on the one thread that reads every connection. A payload
file ckptman downloads is checked against its manifest's xxh3 checksum anyway:
end to end, against the bytes the writer hashed, not against the server's
copy; and a mismatch is read once more before the checkpoint is called
corrupted (:func:`ckptman.transfer.download_verified`), so damage on the way
costs a second read, not a checkpoint. There the CRC32 adds cost, not safety.

Every other GET keeps it: manifests, ``latest``, the sidecar, the lease, and
the files another writer (DCP) stored that ckptman reads to checksum them for
its manifest. Skipping is per request, through a context variable that a
request-building hook on the client reads, so a request outside
:func:`checked_by_caller` is built exactly as botocore builds it. Other
backends are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from ckptman.loopio import has_s3_client

_CHECKED_BY_CALLER: ContextVar[bool] = ContextVar("ckptman_checked_by_caller", default=False)
_HOOK_ID = "ckptman-skip-response-checksum"


def skip_response_checksum(params: dict[str, Any], model: Any, **kwargs: Any) -> None:
    """botocore ``before-parameter-build`` hook: a GetObject inside :func:`checked_by_caller` asks for no checksum.

    Registered last, so it runs after botocore's own hook has added
    ``ChecksumMode=ENABLED`` (``response_checksum_validation="when_supported"``,
    the default); without that member botocore validates nothing, exactly as
    with ``"when_required"``.
    """
    if _CHECKED_BY_CALLER.get() and getattr(model, "name", None) == "GetObject":
        params.pop("ChecksumMode", None)


@contextlib.asynccontextmanager
async def checked_by_caller(fs: Any, path: str) -> AsyncIterator[None]:
    """GETs of ``path`` made in this block (in this task) skip the S3 client's response checksum.

    Only for reads whose bytes the caller checks against a checksum of its
    own. Registering the hook is idempotent (botocore keeps one per
    ``unique_id``), and it is done on the client that serves the path's
    bucket, so a client s3fs creates anew gets it too.
    """
    if has_s3_client(fs) and hasattr(fs, "get_s3"):
        await fs.set_session()
        client = await fs.get_s3(fs.split_path(path)[0])
        client.meta.events.register_last("before-parameter-build", skip_response_checksum, unique_id=_HOOK_ID)
    token = _CHECKED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _CHECKED_BY_CALLER.reset(token)
