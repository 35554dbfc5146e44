"""Bounded exponential backoff for transient storage errors.

Object stores fail a small fraction of requests as a matter of course (HTTP
500/503, throttling, connection resets, timeouts). One such failure must not
cost a checkpoint, and a permanent failure (missing bucket, no permission)
must surface at once, not after minutes of retrying. The classification is
by exception type and status only, so it needs no backend library imported.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

from ckptman.errors import CheckpointError, PolicyConfigError

logger = logging.getLogger("ckptman")
T = TypeVar("T")

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, CheckpointError)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EREMOTEIO", "EBUSY", "EAGAIN", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ETIMEDOUT", "EPIPE", "EIO")
    if hasattr(errno, name)
)
# Client-side network failures of botocore/aiobotocore and aiohttp, by class name.
_TRANSIENT_NAMES = frozenset(
    {
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "TransferEncodingError",
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed."""
    for error in _chain(exc):
        if isinstance(error, _PERMANENT):
            return False
        if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        status = getattr(error, "code", None) or getattr(error, "status", None)
        if isinstance(status, int) and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__):
            return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes: s3fs and gcsfs wrap the network error they met."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a storage operation is retried.

    ``attempts`` counts the first try; the wait before retry *n* is
    ``min(max_backoff, initial_backoff * multiplier**(n-1))`` scaled by a random
    factor in [0.5, 1] so that many ranks do not retry in lockstep.
    """

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise PolicyConfigError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("initial_backoff", "max_backoff", "multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PolicyConfigError(f"RetryPolicy.{name} must be a number >= 0, got {value!r}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1)) * random.uniform(0.5, 1.0)

    def call(self, operation: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """Run ``operation``; retry transient failures; re-raise the last error when attempts run out."""
        attempt = 1
        while True:
            try:
                return operation()
            except Exception as exc:
                delay = self._delay_before_retry(exc, attempt, what)
                if delay is None:
                    raise
            sleep(delay)
            attempt += 1

    async def call_async(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """:meth:`call` for a coroutine on an event loop: the same attempts and backoff, waited with ``asyncio.sleep``."""
        attempt = 1
        while True:
            try:
                return await operation()
            except Exception as exc:
                delay = self._delay_before_retry(exc, attempt, what)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    def _delay_before_retry(self, exc: Exception, attempt: int, what: str) -> float | None:
        """Seconds to wait before retrying after ``exc`` (logged), or None when it must be raised."""
        if attempt >= self.attempts or not is_transient(exc):
            return None
        delay = self.backoff(attempt)
        logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc, attempt, self.attempts - 1, delay)
        return delay
