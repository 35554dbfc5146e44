"""Uploads to S3 whose parts go up concurrently while the producer keeps writing.

s3fs's buffered file uploads a part only when its buffer is full, and then
waits for it: ``torch.save`` into an s3fs file serializes, stops, uploads 50
MiB, serializes again. Here every full part is handed to fsspec's event loop
at once and the producer goes on filling the next one; at most
``IN_FLIGHT`` parts are on their way, so memory stays ``(IN_FLIGHT + 1) x
part size`` whatever the file's size. A file up to ``SINGLE_PUT_LIMIT``
(32 MiB, or the filesystem's block size if smaller) is one ``PutObject``, as
with s3fs below its block size.

Nothing becomes visible before :meth:`PartUpload.close` completes the
upload; :meth:`PartUpload.discard` aborts it (no parts left billed). Used only
by :mod:`ckptman.storage`, for S3 filesystems (s3fs).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Callable, cast

from fsspec.asyn import sync

from ckptman import loopio

MiB = 2**20
PART_SIZE = 8 * MiB
"""Part size unless the filesystem's block size is smaller (S3 accepts parts down to 5 MiB).

Small enough that the parts in flight, and botocore's copy of each, stay under
a tenth of a 1 GiB state; large enough that the requests' fixed cost is small.
"""
IN_FLIGHT = 4
"""Parts uploading at once: several connections on a slow link; bounded so memory stays small."""
SINGLE_PUT_LIMIT = IN_FLIGHT * PART_SIZE
"""Files up to this size (or the filesystem's block size, if smaller) are one PutObject, as with s3fs:
a multipart upload costs two more requests, and some servers (moto) copy every part again on completion."""
_MIN_PART = 5 * MiB
_MAX_PART = 5 * 1024 * MiB
_PARTS_PER_SIZE = 1000  # the part size doubles every 1000 parts: S3 allows 10,000 parts per upload


def opener_for(fs: Any) -> Callable[[str], PartUpload] | None:
    """How to open a concurrent upload on ``fs``, or None where fsspec's own file is used (not S3)."""
    if not loopio.has_s3_client(fs):
        return None
    part_size, single_put_limit = _sizes(fs)
    return lambda path: PartUpload(fs, path, part_size, single_put_limit)


def single_put_limit(fs: Any) -> int:
    """The largest file ``fs`` stores with one request, here and in :class:`PartUpload` alike."""
    return _sizes(fs)[1]


def _sizes(fs: Any) -> tuple[int, int]:
    """Part size and single-PUT limit: ours, unless the filesystem's block size is smaller."""
    block = int(getattr(fs, "default_block_size", 0) or SINGLE_PUT_LIMIT)
    part_size = max(_MIN_PART, min(PART_SIZE, block))
    return part_size, max(part_size, min(SINGLE_PUT_LIMIT, block))


class PartUpload:
    """A write-only file on S3: parts uploaded concurrently, published by :meth:`close`, aborted by :meth:`discard`."""

    def __init__(self, fs: Any, path: str, part_size: int, single_put_limit: int) -> None:
        self._fs = fs
        self._path = path
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_size = part_size
        self._single_put_limit = single_put_limit
        self._chunks: list[bytes] = []  # the part being filled
        self._filled = 0
        self._held: list[bytes] = []  # full parts kept back while the file may still be one PUT
        self._upload_id: str | None = None
        self._parts: dict[int, Future[dict[str, Any]]] = {}
        self._running: set[Future[dict[str, Any]]] = set()
        self.closed = False

    # -- the file interface --------------------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Take the bytes (copied unless they are a whole ``bytes`` object, which is immutable)."""
        view = memoryview(data).cast("B")
        written = 0
        while written < view.nbytes:
            if self._filled >= self._size_of(self._number()):
                self._part_full()  # only once more bytes come: a file of exactly the limit stays one PUT
            piece = view[written : written + self._size_of(self._number()) - self._filled]
            whole = isinstance(view.obj, bytes) and piece.nbytes == len(view.obj)
            self._chunks.append(cast(bytes, view.obj) if whole else bytes(piece))
            self._filled += piece.nbytes
            written += piece.nbytes
        return written

    def flush(self) -> None:
        """Wait until the parts on their way have landed (a failed one raises); the rest goes up on close.

        Lets a caller decide, once the bytes are uploaded and before
        :meth:`close` publishes them, that nobody wants the file any more.
        """
        wait(self._running)
        self._wait_for_room()

    def finish_parts(self) -> None:
        """Send the last part of a multipart upload and wait for every part: all :meth:`close` has left is the completion."""
        if self._upload_id is not None and self._filled:
            self._send_part(self._take())
        wait(list(self._parts.values()))

    def close(self) -> None:
        """Upload what is left and complete the upload: the file becomes visible now, whole."""
        if self.closed:
            return
        if self._upload_id is None:
            held, self._held = self._held, []
            self._call("put_object", Body=b"".join([*held, self._take()]))
        else:
            self.finish_parts()
            done = [future.result() for _, future in sorted(self._parts.items())]
            self._call("complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": done})
        self.closed = True
        self._fs.invalidate_cache(self._path)

    def discard(self) -> None:
        """Give up: stop the parts still uploading and abort the multipart upload, publishing nothing."""
        self.closed = True
        self._chunks, self._held = [], []
        for future in self._parts.values():
            future.cancel()
        wait(list(self._parts.values()))
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self._upload_id)

    # -- parts ---------------------------------------------------------------------
    def _size_of(self, number: int) -> int:
        return min(_MAX_PART, self._part_size << ((number - 1) // _PARTS_PER_SIZE))

    def _number(self) -> int:
        """The number of the part being filled."""
        return len(self._parts) + len(self._held) + 1

    def _part_full(self) -> None:
        """Hold the full part back while the file may still fit one PUT; else start or go on with the multipart upload."""
        body = self._take()
        if self._upload_id is None and sum(map(len, self._held)) + len(body) < self._single_put_limit:
            self._held.append(body)
            return
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        held, self._held = self._held, []
        for part in [*held, body]:
            self._send_part(part)

    def _send_part(self, body: bytes) -> None:
        number = len(self._parts) + 1
        future = asyncio.run_coroutine_threadsafe(self._upload_part(number, body), self._fs.loop)
        self._parts[number] = future
        self._running.add(future)
        self._wait_for_room()

    def _take(self) -> bytes:
        """The part filled so far, as one ``bytes`` (what botocore streams without another copy)."""
        chunks, self._chunks, self._filled = self._chunks, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        out = await self._fs._call_s3(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:  # what s3fs's own file passes on to the completion
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        return part

    def _wait_for_room(self) -> None:
        """Block while ``IN_FLIGHT`` parts are uploading; a failed part raises here, in the producer."""
        while True:
            for future in [future for future in self._running if future.done()]:
                self._running.discard(future)
                future.result()  # raises the part's error
            if len(self._running) < IN_FLIGHT:
                return
            wait(self._running, return_when=FIRST_COMPLETED)

    def _call(self, method: str, **kwargs: Any) -> Any:
        return sync(self._fs.loop, self._fs._call_s3, method, Bucket=self._bucket, Key=self._key, **kwargs)
