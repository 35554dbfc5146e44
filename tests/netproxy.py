"""A small threaded, HTTP/1.1-aware reverse proxy for fault injection and
wide-area-link simulation in tests.

It sits on ``127.0.0.1:<free port>`` in front of ONE loopback upstream (the
moto S3 server) and relays requests one at a time per client connection::

    with NetProxy("127.0.0.1", moto_port) as proxy:
        opts = {..., "client_kwargs": {"endpoint_url": proxy.url}}

        # flaky storage
        proxy.configure(fail_rate=0.3, faults=("500", "503", "reset", "stall"), seed=1)
        proxy.configure(fail_rate=1.0, faults=("500",), match=match(method="PUT"))
        proxy.fail_next(2, "503", match=match(path_contains="/step_3/"))
        proxy.configure(fail_rate=0)          # heal (also clears fail_next rules)

        # wide-area link
        proxy.configure(latency=0.02, bandwidth=50 * 2**20)

        proxy.stats.requests, proxy.stats.faults["500"], proxy.records

Fault kinds (``FAULTS``)
------------------------
``"500"``        answer ``500 Internal Server Error`` (S3 XML ``InternalError``)
                 without forwarding; the request body is read and discarded.
``"503"``        answer ``503 Slow Down`` (S3 XML ``SlowDown``), not forwarded.
``"reset"``      abort the client connection (``SO_LINGER`` 0 -> TCP RST) right
                 after reading the request head; nothing is forwarded.
``"reset_mid"``  forward the request (so upstream DOES execute it), relay the
                 response head and half the response body (half the head if the
                 body is empty or its length is unknown), wait 0.2 s (so the
                 client has read it), then RST. The classic "did my PUT
                 happen?" ambiguity.
``"flip"``       forward the request and relay the whole response, with the
                 first byte of its body inverted (bodies framed by
                 ``Content-Length``; others pass unchanged): bytes damaged on
                 the way, past every TCP checksum.
``"stall"``      read the whole request (sending ``100 Continue`` if asked),
                 then answer nothing for ``stall_seconds`` (default 10 s; cut
                 short when the client hangs up or on ``stop()``), then RST.
                 Not forwarded. Triggers client read timeouts.

Selection
---------
Every request is matched against, in order: the one-shot ``fail_next`` rules
(FIFO; a rule that matches consumes one of its ``count``), then the random
rule: if ``match`` (default: every request) accepts it, it fails with
probability ``fail_rate``, fault kind drawn from ``faults``. Both draws come
from one ``random.Random(seed)``, consumed only by requests that pass
``match``, so the k-th matching request's fate depends only on ``seed`` and
``k`` (with concurrent connections, which request is "k-th" can vary).

A predicate is ``pred(method: str, target: str, headers: dict[str, str])``;
``target`` is the raw request target (path + ``?query``), ``headers`` has
lower-cased names. ``match(...)`` builds common ones.

Link simulation
---------------
``latency`` (s): slept once per request after its head is read, before
anything else (forwarding or faulting). ``bandwidth`` (bytes/s): token bucket
per connection per direction (client->upstream and upstream->client, each
capped separately), covering heads and bodies. Both may be changed at runtime.

HTTP handling
-------------
Keep-alive on both sides (independently: an upstream that closes after each
response is transparently reconnected; ``Connection``/``Keep-Alive`` response
headers are dropped). Request bodies: ``Content-Length`` or
``Transfer-Encoding: chunked`` (relayed verbatim, streamed in 64 KiB pieces,
never buffered whole). ``Expect: 100-continue`` is answered by the proxy
itself (``100 Continue`` just before relaying the body; an injected error is
sent instead of it, and the connection is then closed) and stripped from the
forwarded request. Responses: ``Content-Length``, chunked, or until-EOF
(then the client connection is closed too); HEAD/1xx/204/304 have no body.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

__all__ = ["FAULTS", "NetProxy", "ProxyStats", "RequestRecord", "match"]

FAULTS = ("500", "503", "reset", "reset_mid", "flip", "stall")

Predicate = Callable[[str, str, Mapping[str, str]], bool]

_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200
_RESET_MID_GRACE = 0.2  # s between the partial response and the RST

_ERROR_BODIES = {
    "500": (
        "500 Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
}


def match(
    method: str | Iterable[str] | None = None,
    path_contains: str | None = None,
    query_contains: str | None = None,
    header: tuple[str, str | None] | None = None,
) -> Predicate:
    """Build a request predicate; all given conditions must hold.

    ``method``          one method or several (``"PUT"``, ``("PUT", "POST")``).
    ``path_contains``   substring of the path (target before ``?``).
    ``query_contains``  substring of the query string (e.g. ``"uploadId="``).
    ``header``          ``(name, value)``: header present (value ``None``) or equal.
    """
    methods = None
    if method is not None:
        methods = {method.upper()} if isinstance(method, str) else {m.upper() for m in method}

    def pred(m: str, target: str, headers: Mapping[str, str]) -> bool:
        path, _, query = target.partition("?")
        if methods is not None and m.upper() not in methods:
            return False
        if path_contains is not None and path_contains not in path:
            return False
        if query_contains is not None and query_contains not in query:
            return False
        if header is not None:
            name, value = header
            got = headers.get(name.lower())
            if got is None or (value is not None and got != value):
                return False
        return True

    return pred


@dataclass(frozen=True)
class ProxyStats:
    """Snapshot of the proxy counters (see ``NetProxy.stats``)."""

    connections: int  # client connections accepted
    requests: int  # request heads read
    forwarded: int  # requests sent upstream (incl. reset_mid)
    faults: dict[str, int]  # kind -> injected count (every kind in FAULTS present)
    upstream_connections: int  # upstream connections opened
    bytes_to_upstream: int
    bytes_to_client: int

    @property
    def injected(self) -> int:
        return sum(self.faults.values())


@dataclass
class RequestRecord:
    """One request seen by the proxy (``NetProxy.records``)."""

    method: str
    target: str
    fault: str | None  # injected fault kind, or None
    status: int | None = None  # status sent to client (None: reset/stall/cut)
    connection: int = 0  # client connection id (1-based, unique per proxy)
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class _ConnectionClosed(Exception):
    """The peer went away (or the proxy is stopping)."""


class _Throttle:
    """Token bucket; ``rate()`` is read on each call so it can change live."""

    def __init__(self, rate: Callable[[], float | None], stop: threading.Event) -> None:
        self._rate = rate
        self._stop = stop
        self._tokens = 0.0
        self._last = time.monotonic()

    def consume(self, n: int) -> None:
        rate = self._rate()
        now = time.monotonic()
        if not rate or rate <= 0:
            self._tokens = 0.0
            self._last = now
            return
        burst = max(rate * 0.01, 16 * 1024)
        self._tokens = min(burst, self._tokens + (now - self._last) * rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._stop.wait(-self._tokens / rate)


class _Stream:
    """Buffered reader + throttled writer over one socket."""

    def __init__(self, sock: socket.socket, throttle_out: _Throttle, on_sent: Callable[[int], None]):
        self.sock = sock
        self._buf = bytearray()
        self._eof = False
        self._throttle = throttle_out
        self._on_sent = on_sent

    # -- reading -----------------------------------------------------------
    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            data = self.sock.recv(_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def readline(self) -> bytes:
        """One line incl. CRLF; ``b""`` at EOF before any byte."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > _MAX_LINE:
                raise ValueError("header line too long")
            if not self._fill():
                if self._buf:
                    raise _ConnectionClosed("EOF inside a line")
                return b""

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least 1); raises at EOF."""
        if not self._buf and not self._fill():
            raise _ConnectionClosed("EOF inside a body")
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data

    def read_until_eof(self) -> Iterable[bytes]:
        while self._buf or self._fill():
            data = bytes(self._buf)
            self._buf.clear()
            yield data

    def at_eof_or_has_data(self) -> bool:
        """True if the peer closed or sent something unsolicited (idle check)."""
        if self._buf or self._eof:
            return True
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(r)

    # -- writing -----------------------------------------------------------
    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            piece = view[:_CHUNK]
            self._throttle.consume(len(piece))
            try:
                self.sock.sendall(piece)
            except OSError as exc:
                raise _ConnectionClosed(str(exc)) from exc
            self._on_sent(len(piece))
            view = view[len(piece) :]


def _read_head(stream: _Stream) -> tuple[str, list[tuple[str, str]]] | None:
    """Start line + headers; ``None`` on clean EOF before the start line."""
    line = stream.readline()
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLFs between requests
        line = stream.readline()
    if not line:
        return None
    headers: list[tuple[str, str]] = []
    while True:
        h = stream.readline()
        if not h:
            raise _ConnectionClosed("EOF inside headers")
        if h in (b"\r\n", b"\n"):
            break
        if len(headers) >= _MAX_HEADERS:
            raise ValueError("too many headers")
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"bad header line {h!r}")
        headers.append((name.strip(), value.strip()))
    return line.decode("latin-1").rstrip("\r\n"), headers


def _hget(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _encode_head(start: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _is_chunked(headers: list[tuple[str, str]]) -> bool:
    te = _hget(headers, "transfer-encoding")
    return te is not None and te.split(",")[-1].strip().lower() == "chunked"


def _relay_body(
    src: _Stream,
    dst: _Stream | None,
    headers: list[tuple[str, str]],
    budget: int | None = None,
    flip: bool = False,
) -> None:
    """Relay one message body framed by ``headers`` (Content-Length or chunked)
    from ``src`` to ``dst`` (``None``: discard). With ``budget``, stop after
    sending that many body bytes and raise ``_Cut``. With ``flip``, invert the
    first byte of a Content-Length body."""
    sent = 0

    def out(data: bytes) -> None:
        nonlocal sent
        if dst is None:
            return
        if budget is not None and sent + len(data) >= budget:
            dst.send(data[: budget - sent])
            raise _Cut()
        dst.send(data)
        sent += len(data)

    if _is_chunked(headers):
        while True:
            size_line = src.readline()
            if not size_line:
                raise _ConnectionClosed("EOF in chunked body")
            out(size_line)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the final CRLF
                    t = src.readline()
                    if not t:
                        raise _ConnectionClosed("EOF in chunked trailers")
                    out(t)
                    if t in (b"\r\n", b"\n"):
                        return
            remaining = size
            while remaining:
                data = src.read_some(min(remaining, _CHUNK))
                remaining -= len(data)
                out(data)
            crlf = src.readline()
            out(crlf)
        # not reached
    length = _hget(headers, "content-length")
    remaining = int(length) if length else 0
    while remaining > 0:
        data = src.read_some(min(remaining, _CHUNK))
        remaining -= len(data)
        if flip and data:
            data, flip = bytes([data[0] ^ 0xFF]) + data[1:], False
        out(data)


class _Cut(Exception):
    """reset_mid: the response budget is used up."""


def _abort(sock: socket.socket | None) -> None:
    """Close with SO_LINGER 0 so the peer sees a TCP RST."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class NetProxy:
    """Threaded HTTP/1.1 reverse proxy ``127.0.0.1:<port> -> upstream``.

    ``NetProxy(upstream_host, upstream_port, *, port=0, **configure_kwargs)``;
    use as a context manager or call ``start()``/``stop()``. ``upstream_host``
    must be a loopback address (the proxy never connects anywhere else).
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0, **config) -> None:
        if upstream_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream must be loopback, got {upstream_host!r}")
        self.upstream = (upstream_host, int(upstream_port))
        self._bind_port = port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self.port: int | None = None
        # configuration
        self.fail_rate = 0.0
        self.faults: tuple[str, ...] = ("500", "503", "reset", "stall")
        self.match: Predicate | None = None
        self.stall_seconds = 10.0
        self.latency = 0.0
        self.bandwidth: float | None = None
        self.drop_request_headers: frozenset[str] = frozenset()
        self._rng = random.Random(0)
        self._fail_next: list[list] = []  # [remaining, fault, pred]
        self._conn_seq = 0  # never reset: connection ids stay unique
        self._reset_counters()
        if config:
            self.configure(**config)

    # ------------------------------------------------------------------ #
    # public API
    # ------------------------------------------------------------------ #
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("proxy not started")
        return f"http://127.0.0.1:{self.port}"

    _UNSET = object()

    def configure(
        self,
        *,
        fail_rate: float | None = None,
        faults: Iterable[str] | str | None = None,
        seed: int | None = None,
        match: Predicate | None | object = _UNSET,
        stall_seconds: float | None = None,
        latency: float | None = None,
        bandwidth: float | None | object = _UNSET,
        drop_request_headers: Iterable[str] | None = None,
    ) -> "NetProxy":
        """Change behaviour at runtime; only the given arguments change.

        ``fail_rate``      probability [0, 1] that a request passing ``match``
                           fails. ``fail_rate=0`` also drops pending
                           ``fail_next`` rules (i.e. fully heals).
        ``faults``         kinds to draw from (uniformly), subset of ``FAULTS``.
        ``seed``           reseed the fault RNG.
        ``match``          predicate restricting the random faults (``None``: all).
        ``stall_seconds``  how long a ``"stall"`` holds the connection.
        ``latency``        seconds of delay added to each request.
        ``bandwidth``      bytes/s per connection per direction (``None``/0: off).
        ``drop_request_headers``  header names (any case) removed from forwarded
                           requests: a server that ignores them (moto does not
                           check signatures, so the request still passes).
        """
        with self._lock:
            if fail_rate is not None:
                if not 0.0 <= fail_rate <= 1.0:
                    raise ValueError("fail_rate must be in [0, 1]")
                self.fail_rate = float(fail_rate)
                if fail_rate == 0:
                    self._fail_next.clear()
            if faults is not None:
                faults = (faults,) if isinstance(faults, str) else tuple(faults)
                bad = set(faults) - set(FAULTS)
                if bad or not faults:
                    raise ValueError(f"faults must be a non-empty subset of {FAULTS}, got {faults}")
                self.faults = faults
            if seed is not None:
                self._rng = random.Random(seed)
            if match is not NetProxy._UNSET:
                self.match = match  # type: ignore[assignment]
            if stall_seconds is not None:
                self.stall_seconds = float(stall_seconds)
            if latency is not None:
                self.latency = max(0.0, float(latency))
            if bandwidth is not NetProxy._UNSET:
                self.bandwidth = float(bandwidth) if bandwidth else None  # type: ignore[arg-type]
            if drop_request_headers is not None:
                self.drop_request_headers = frozenset(name.lower() for name in drop_request_headers)
        return self

    def heal(self) -> "NetProxy":
        """No faults, no latency, no bandwidth cap, no match filter, no header dropped."""
        return self.configure(fail_rate=0, match=None, latency=0, bandwidth=None, drop_request_headers=())

    def fail_next(self, count: int = 1, fault: str = "500", match: Predicate | None = None) -> "NetProxy":
        """Fail the next ``count`` requests accepted by ``match`` (``None``: any)
        with ``fault``; independent of (and checked before) ``fail_rate``."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        if count > 0:
            with self._lock:
                self._fail_next.append([int(count), fault, match])
        return self

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                connections=self._n_conn,
                requests=self._n_req,
                forwarded=self._n_fwd,
                faults=dict(self._n_faults),
                upstream_connections=self._n_up,
                bytes_to_upstream=self._bytes_up,
                bytes_to_client=self._bytes_down,
            )

    @property
    def records(self) -> list[RequestRecord]:
        """Copy of the per-request log (oldest first)."""
        with self._lock:
            return list(self._records)

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()

    def start(self) -> "NetProxy":
        if self._listener is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self._bind_port))
        lst.listen(128)
        self._listener = lst
        self.port = lst.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"netproxy-accept-{self.port}", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, abort all connections, join all threads."""
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        if self._listener is not None:
            _close(self._listener)
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                break
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        with self._lock:
            socks = list(self._sockets)
            self._sockets.clear()
            alive = [t.name for t in self._threads if t.is_alive()]
        for s in socks:
            _close(s)
        self._listener = None
        self._acceptor = None
        if alive:
            raise RuntimeError(f"netproxy threads did not stop: {alive}")

    @property
    def active_threads(self) -> int:
        with self._lock:
            n = sum(t.is_alive() for t in self._threads)
        return n + (1 if self._acceptor is not None and self._acceptor.is_alive() else 0)

    def __enter__(self) -> "NetProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"<NetProxy {where} -> {self.upstream[0]}:{self.upstream[1]}>"

    # ------------------------------------------------------------------ #
    # internals
    # ------------------------------------------------------------------ #
    def _reset_counters(self) -> None:
        self._n_conn = self._n_req = self._n_fwd = self._n_up = 0
        self._bytes_up = self._bytes_down = 0
        self._n_faults = {k: 0 for k in FAULTS}
        self._records: list[RequestRecord] = []

    def _count(self, attr: str, n: int) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self._stop.is_set():  # raced with stop(): make sure it dies
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _untrack(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        lst = self._listener
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([lst], [], [], 0.1)
                if not r:
                    continue
                conn, _ = lst.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stop.is_set():
                    _close(conn)
                    return
                self._n_conn += 1
                self._conn_seq += 1
                cid = self._conn_seq
                self._sockets.add(conn)
                t = threading.Thread(
                    target=self._serve, args=(conn, cid), name=f"netproxy-conn-{cid}", daemon=True
                )
                self._threads.add(t)
            t.start()

    def _stall(self, cs: _Stream, seconds: float) -> None:
        """Hold the connection silently for ``seconds``; return early if the
        client hangs up or the proxy stops (anything the client sends is
        discarded)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                r, _, _ = select.select([cs.sock], [], [], min(left, 0.05))
                if r and not cs.sock.recv(_CHUNK):
                    return
            except (OSError, ValueError):
                return

    def _decide(self, method: str, target: str, headers: dict[str, str]) -> str | None:
        with self._lock:
            for rule in self._fail_next:
                pred = rule[2]
                if pred is None or pred(method, target, headers):
                    rule[0] -= 1
                    if rule[0] <= 0:
                        self._fail_next.remove(rule)
                    return rule[1]
            if self.fail_rate > 0 and (self.match is None or self.match(method, target, headers)):
                # always draw both numbers so the sequence depends only on the seed
                hit = self._rng.random() < self.fail_rate
                kind = self._rng.choice(self.faults)
                if hit:
                    return kind
            return None

    def _serve(self, client: socket.socket, cid: int) -> None:
        upstream: socket.socket | None = None
        up_stream: _Stream | None = None
        to_client = _Throttle(lambda: self.bandwidth, self._stop)
        to_upstream = _Throttle(lambda: self.bandwidth, self._stop)
        cs = _Stream(client, to_client, lambda n: self._count("_bytes_down", n))
        abort_client = False
        try:
            while not self._stop.is_set():
                head = _read_head(cs)
                if head is None:
                    break
                start, headers = head
                parts = start.split(" ", 2)
                if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                    raise ValueError(f"bad request line {start!r}")
                method, target, version = parts
                hdict = {k.lower(): v for k, v in headers}
                rec = RequestRecord(method, target, None, connection=cid, headers=hdict)
                with self._lock:
                    self._n_req += 1
                    self._records.append(rec)
                if self.latency:
                    self._stop.wait(self.latency)
                fault = self._decide(method, target, hdict)
                rec.fault = fault
                if fault is not None:
                    with self._lock:
                        self._n_faults[fault] += 1
                expect = (hdict.get("expect") or "").lower() == "100-continue"
                client_close = (hdict.get("connection") or "").lower() == "close" or version == "HTTP/1.0"

                if fault == "reset":
                    abort_client = True
                    return
                if fault == "stall":
                    # Accept the request fully (incl. 100 Continue), so the
                    # client is waiting for the response under its read timeout.
                    if expect:
                        cs.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    _relay_body(cs, None, headers)
                    self._stall(cs, self.stall_seconds)
                    abort_client = True
                    return
                if fault in ("500", "503"):
                    if not expect:
                        _relay_body(cs, None, headers)
                    status, code, msg = _ERROR_BODIES[fault]
                    body = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{code}</Code><Message>{msg}</Message>"
                        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
                        "<HostId>netproxy</HostId></Error>"
                    ).encode()
                    close_after = expect or client_close
                    resp_headers = [
                        ("Content-Type", "application/xml"),
                        ("Content-Length", str(len(body))),
                        ("x-amz-request-id", "NETPROXY"),
                    ]
                    if close_after:
                        resp_headers.append(("Connection", "close"))
                    cs.send(_encode_head(f"HTTP/1.1 {status}", resp_headers))
                    if method != "HEAD":
                        cs.send(body)
                    rec.status = int(fault)
                    if close_after:
                        break
                    continue

                # ---- forward ------------------------------------------------
                if up_stream is not None and up_stream.at_eof_or_has_data():
                    self._untrack(upstream)
                    _close(upstream)
                    upstream = up_stream = None
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._track(upstream)
                    up_stream = _Stream(upstream, to_upstream, lambda n: self._count("_bytes_up", n))
                    self._count("_n_up", 1)
                assert up_stream is not None
                dropped = self.drop_request_headers | {"expect"}
                fwd_headers = [(k, v) for k, v in headers if k.lower() not in dropped]
                self._count("_n_fwd", 1)
                up_stream.send(_encode_head(start, fwd_headers))
                if expect:
                    cs.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                _relay_body(cs, up_stream, headers)

                # response (skip interim 1xx from upstream)
                while True:
                    rhead = _read_head(up_stream)
                    if rhead is None:
                        raise _ConnectionClosed("upstream closed before responding")
                    rstart, rheaders = rhead
                    rparts = rstart.split(" ", 2)
                    rstatus = int(rparts[1])
                    if 100 <= rstatus < 200 and rstatus != 101:
                        continue
                    break
                rec.status = rstatus
                up_close = (_hget(rheaders, "connection") or "").lower() == "close" or rparts[0] == "HTTP/1.0"
                no_body = method == "HEAD" or rstatus in (204, 304)
                until_eof = (
                    not no_body
                    and not _is_chunked(rheaders)
                    and _hget(rheaders, "content-length") is None
                )
                out_headers = [(k, v) for k, v in rheaders if k.lower() not in ("connection", "keep-alive")]
                if until_eof or client_close:
                    out_headers.append(("Connection", "close"))
                rhead_bytes = _encode_head(rstart, out_headers)

                if fault == "reset_mid":
                    length = _hget(rheaders, "content-length")
                    body_len = 0 if no_body or length is None else int(length)
                    if body_len > 0:
                        cs.send(rhead_bytes)
                        with contextlib.suppress(_Cut):
                            _relay_body(up_stream, cs, rheaders, budget=body_len // 2)
                    else:
                        cs.send(rhead_bytes[: len(rhead_bytes) // 2])
                    rec.status = None
                    self._untrack(upstream)
                    _close(upstream)
                    upstream = up_stream = None
                    # Give the client time to read the partial response: on
                    # Linux an incoming RST discards data not yet read.
                    self._stop.wait(_RESET_MID_GRACE)
                    abort_client = True
                    return

                cs.send(rhead_bytes)
                if until_eof:
                    for data in up_stream.read_until_eof():
                        cs.send(data)
                    break
                if not no_body:
                    _relay_body(up_stream, cs, rheaders, flip=fault == "flip")
                if up_close:
                    self._untrack(upstream)
                    _close(upstream)
                    upstream = up_stream = None
                if client_close:
                    break
        except (_ConnectionClosed, OSError, ValueError):
            # peer vanished, stop() shut the sockets, or garbage on the wire
            abort_client = True
        finally:
            self._untrack(upstream)
            _close(upstream)
            self._untrack(client)
            if abort_client:
                _abort(client)
            else:
                _close(client)
            with self._lock:
                self._threads.discard(threading.current_thread())
