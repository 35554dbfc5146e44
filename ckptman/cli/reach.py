"""Can the storage be reached, and if not, what should the user pass: fast answers for object stores.

Before a manager talks to an explicitly chosen endpoint (``--endpoint-url``,
``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``), one TCP connect and one
HTTP request with a few seconds' timeout each tell "nothing listens there"
and "something listens but never answers" apart from everything else, in
seconds rather than after the client's layered retries. Errors the clients
raise later (no credentials, an option the client refuses) are turned into
messages that say which flag or variable to set.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from ckptman.cli.options import GCS_PROTOCOLS, S3_PROTOCOLS, protocol_of
from ckptman.errors import StorageError
from ckptman.retry import _chain as causes

PROBE_TIMEOUT = 3.0  # seconds for the connect, and again for the first byte of an answer

CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / --profile NAME, "
    "or --storage-option key=... --storage-option secret=...; --anon for a public bucket",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS=<service-account key.json> or run `gcloud auth application-default login`, "
    "or --storage-option token=<key.json>; --anon for a public bucket",
}


def endpoint_of(url: str, options: Mapping[str, Any]) -> str | None:
    """The endpoint the client will talk to when the user chose one (None: the cloud's own)."""
    protocol = protocol_of(url)
    if protocol in S3_PROTOCOLS:
        client = options.get("client_kwargs") or {}
        return (
            client.get("endpoint_url")
            or options.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
    if protocol in GCS_PROTOCOLS:
        host = os.environ.get("STORAGE_EMULATOR_HOST")
        return options.get("endpoint_url") or (host if host is None or "://" in host else f"http://{host}")
    return None


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise StorageError unless something at ``endpoint`` answers an HTTP request within ``timeout`` seconds each way."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"endpoint {endpoint}"
    fix = "check --endpoint-url / AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST, and that the server is running"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise StorageError(f"cannot reach {where}: no connection within {timeout:g}s; {fix}") from None
    except OSError as exc:
        raise StorageError(f"cannot reach {where}: {exc.strerror or exc}; {fix}") from None
    with sock:
        if parts.scheme == "https":
            return  # the TLS handshake is the client's; a listening port is all this can tell
        try:
            sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answered = bool(sock.recv(1))
        except TimeoutError:
            raise StorageError(
                f"{where} accepts connections but sent no answer within {timeout:g}s: not an S3/GCS server, or hung; {fix}"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot talk to {where}: {exc.strerror or exc}; {fix}") from None
        if not answered:
            raise StorageError(f"{where} closed the connection without an answer; {fix}")


def check_reachable(url: str, options: Mapping[str, Any]) -> None:
    endpoint = endpoint_of(url, options)
    if endpoint:
        probe(endpoint)


@contextlib.contextmanager
def explained(url: str) -> Iterator[None]:
    """Storage errors whose cause is missing credentials or a refused option, re-raised with what to pass."""
    try:
        yield
    except StorageError as exc:
        better = _explain(url, exc)
        if better is None:
            raise
        raise StorageError(better) from exc


def _explain(url: str, exc: BaseException) -> str | None:
    protocol = "gs" if protocol_of(url) in GCS_PROTOCOLS else "s3"
    for cause in causes(exc):
        name = type(cause).__name__
        text = str(cause)
        if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
            return f"no credentials for {url}: {CREDENTIALS_HINT[protocol]}"
        if name == "ProfileNotFound":
            return f"{text} (from --profile or AWS_PROFILE): name a profile of ~/.aws/config, or drop it"
        if isinstance(cause, TypeError) and "unexpected keyword argument" in text:
            return f"a storage option was refused by the {protocol} client ({text}); check the --storage-option names"
    return None

