"""Tests of the test-support proxy ``tests/netproxy.py``: raw HTTP/1.1 relaying
(against a tiny local echo server) and s3fs against moto through it (clean
relay, every fault kind as s3fs reports it, fault selection, latency,
bandwidth, clean shutdown).

Observed client-visible failures with ``flaky_s3_backend`` (botocore exactly
one attempt, read_timeout 2 s, ``S3FileSystem.retries`` 1):

=============  ==============================  ==================================
fault          request                         exception s3fs raises
=============  ==============================  ==================================
``500``        any                             ``OSError(EREMOTEIO)``, cause ClientError
``503``        any                             ``OSError(EBUSY)``, cause ClientError
``reset``      any                             ``botocore...EndpointConnectionError``
``reset_mid``  HEAD / PUT (empty body)         ``botocore...EndpointConnectionError``
``reset_mid``  GetObject (cat_file)            ``aiohttp.ClientPayloadError`` (raw)
``reset_mid``  ListObjectsV2 (ls)              ``botocore...ConnectionClosedError``
``stall``      any                             ``botocore...ReadTimeoutError`` (~2 s)
=============  ==============================  ==================================

``EndpointConnectionError``/``ConnectionClosedError`` are ``BotoCoreError``
and ``ClientPayloadError`` is ``aiohttp.ClientError`` -- none is an
``OSError``; ``ReadTimeoutError`` is both ``BotoCoreError`` and ``OSError``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import aiohttp
import botocore.exceptions
import pytest

from netproxy import FAULTS, NetProxy, match

MiB = 2**20
EREMOTEIO = getattr(errno, "EREMOTEIO", 121)


# --------------------------------------------------------------------------- #
# A tiny HTTP/1.1 upstream for raw protocol tests
# --------------------------------------------------------------------------- #


class _EchoHandler(BaseHTTPRequestHandler):
    """``/echo``: JSON {method, n, sha256, te, expect} of the request body.
    ``/chunked?n=N``: N bytes in a chunked response. ``/eof?n=N``: N bytes,
    no length, connection closed. ``/bytes?n=N``: N bytes with Content-Length.
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    @staticmethod
    def _payload(n: int) -> bytes:
        return (b"0123456789abcdef" * (n // 16 + 1))[:n]

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        body = self._body()
        n = int(params.get("n", 0))
        if path == "/echo":
            data = json.dumps(
                {
                    "method": self.command,
                    "n": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "te": self.headers.get("Transfer-Encoding"),
                    "expect": self.headers.get("Expect"),
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            data = self._payload(n)
            for i in range(0, len(data), 100_000):
                piece = data[i : i + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/eof":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(self._payload(n))
            self.close_connection = True
        else:  # /bytes
            data = self._payload(n)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[tuple[str, int]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield ("127.0.0.1", srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def echo_proxy(echo_upstream: tuple[str, int]) -> Iterator[NetProxy]:
    with NetProxy(*echo_upstream) as proxy:
        yield proxy


def _conn(proxy: NetProxy, timeout: float = 10) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def _netproxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("netproxy-")]


# --------------------------------------------------------------------------- #
# Raw HTTP relaying
# --------------------------------------------------------------------------- #


def test_keepalive_content_length_and_chunked_bodies(echo_proxy: NetProxy) -> None:
    payload = os.urandom(3 * MiB + 17)
    conn = _conn(echo_proxy)
    try:
        # Content-Length request body
        conn.request("PUT", "/echo", body=payload)
        r = conn.getresponse()
        got = json.loads(r.read())
        assert r.status == 200 and got["n"] == len(payload)
        assert got["sha256"] == hashlib.sha256(payload).hexdigest()

        # chunked request body (relayed verbatim)
        pieces = [payload[i : i + 300_001] for i in range(0, len(payload), 300_001)]
        conn.request("POST", "/echo", body=iter(pieces), encode_chunked=True)
        got = json.loads(conn.getresponse().read())
        assert got["te"] == "chunked" and got["n"] == len(payload)
        assert got["sha256"] == hashlib.sha256(payload).hexdigest()

        # chunked response
        conn.request("GET", "/chunked?n=1000003")
        r = conn.getresponse()
        assert r.getheader("Transfer-Encoding") == "chunked"
        assert r.read() == _EchoHandler._payload(1000003)

        # HEAD: Content-Length but no body
        conn.request("HEAD", "/bytes?n=5000")
        r = conn.getresponse()
        assert r.getheader("Content-Length") == "5000" and r.read() == b""

        conn.request("GET", "/bytes?n=12345")
        assert conn.getresponse().read() == _EchoHandler._payload(12345)
    finally:
        conn.close()
    st = echo_proxy.stats
    assert st.connections == 1 and st.requests == 5 == st.forwarded
    assert st.upstream_connections == 1  # upstream keep-alive too
    assert st.injected == 0
    assert {r.connection for r in echo_proxy.records} == {1}
    assert st.bytes_to_upstream > 2 * len(payload)


def test_response_until_eof_closes_client(echo_proxy: NetProxy) -> None:
    conn = _conn(echo_proxy)
    try:
        conn.request("GET", "/eof?n=70000")
        r = conn.getresponse()
        assert r.read() == _EchoHandler._payload(70000)
        assert r.getheader("Connection") == "close"
        # http.client reconnects transparently
        conn.request("GET", "/bytes?n=10")
        assert conn.getresponse().read() == _EchoHandler._payload(10)
    finally:
        conn.close()
    assert echo_proxy.stats.connections == 2


def test_expect_100_continue_handled_by_proxy(echo_proxy: NetProxy) -> None:
    body = b"x" * 100_000
    head = (
        f"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=5) as s:
        f = s.makefile("rb")
        try:
            s.sendall(head)
            assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
            assert f.readline() == b"\r\n"
            s.sendall(body)
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            got = json.loads(f.read(length))
            assert got["n"] == len(body) and got["expect"] is None  # stripped
        finally:
            f.close()

    # an injected error answers instead of 100 Continue and closes
    echo_proxy.fail_next(1, "503")
    with socket.create_connection(("127.0.0.1", echo_proxy.port), timeout=5) as s:
        f = s.makefile("rb")
        try:
            s.sendall(head)
            assert f.readline() == b"HTTP/1.1 503 Slow Down\r\n"
            rest = f.read()  # until close
            assert b"Connection: close" in rest and b"<Code>SlowDown</Code>" in rest
        finally:
            f.close()


def test_fail_rate_deterministic_per_seed_unit() -> None:
    def pattern(seed: int, rate: float = 0.3) -> list[str | None]:
        p = NetProxy("127.0.0.1", 1, fail_rate=rate, faults=FAULTS, seed=seed)
        return [p._decide("GET", f"/k{i}", {}) for i in range(2000)]

    a, b, c = pattern(1), pattern(1), pattern(2)
    assert a == b and a != c
    rate = sum(x is not None for x in a) / len(a)
    assert 0.26 < rate < 0.34
    assert {x for x in a if x} == set(FAULTS)


def test_stop_is_clean_even_during_stall(echo_upstream: tuple[str, int]) -> None:
    before = set(_netproxy_threads())
    proxy = NetProxy(*echo_upstream, fail_rate=1.0, faults="stall", stall_seconds=60).start()
    port = proxy.port
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /bytes?n=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while proxy.stats.faults["stall"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.stats.faults["stall"] == 1
        t0 = time.monotonic()
        proxy.stop()
        assert time.monotonic() - t0 < 2
        with pytest.raises(OSError):  # RST or EOF
            if s.recv(10) == b"":
                raise ConnectionResetError("eof")
    finally:
        s.close()
    assert set(_netproxy_threads()) <= before
    assert proxy.active_threads == 0 and not proxy._sockets
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_upstream_must_be_loopback() -> None:
    with pytest.raises(ValueError):
        NetProxy("example.com", 80)
    with pytest.raises(ValueError):
        NetProxy("127.0.0.1", 1).configure(faults=("boom",))


# --------------------------------------------------------------------------- #
# s3fs against moto through the proxy
# --------------------------------------------------------------------------- #


def test_s3_clean_relay_small_and_large_multipart(flaky_s3_backend, s3_proxy) -> None:
    fs, root = flaky_s3_backend.fs()
    small = {f"{root}/small_{i}.bin": os.urandom(1000 + i) for i in range(5)}
    fs.pipe(small)
    big = os.urandom(20 * MiB + 123)
    with fs.open(f"{root}/big.bin", "wb", block_size=5 * MiB) as f:
        for i in range(0, len(big), MiB):
            f.write(big[i : i + MiB])

    fs2, _ = flaky_s3_backend.fs(fresh=True)
    for path, data in small.items():
        assert fs2.cat_file(path) == data
    assert fs2.cat_file(f"{root}/big.bin") == big
    with fs2.open(f"{root}/big.bin", "rb", block_size=3 * MiB) as f:
        f.seek(7 * MiB)
        assert f.read(2 * MiB) == big[7 * MiB : 9 * MiB]
    assert sorted(fs2.ls(root)) == sorted([*small, f"{root}/big.bin"])

    recs = s3_proxy.records
    parts = [r for r in recs if r.method == "PUT" and "partNumber=" in r.target]
    assert len(parts) >= 4
    assert all(r.status in (200, 206) for r in recs), [(r.method, r.target, r.status) for r in recs]
    # what s3fs/aiobotocore sends: Content-Length bodies with Expect: 100-continue
    for r in parts:
        assert "transfer-encoding" not in r.headers
        assert r.headers.get("expect") == "100-continue"
    assert sum(int(r.headers["content-length"]) for r in parts) == len(big)
    assert all(int(r.headers["content-length"]) >= 5 * MiB for r in parts[:-1])
    st = s3_proxy.stats
    assert st.injected == 0 and st.forwarded == st.requests
    assert st.bytes_to_upstream > 20 * MiB and st.bytes_to_client > 20 * MiB
    # keep-alive: many requests over few client connections (s3fs opens a few
    # in parallel: two fs instances, concurrent pipe of the small files)
    per_conn = [sum(r.connection == c for r in recs) for c in {r.connection for r in recs}]
    assert st.connections == len(per_conn) and st.connections * 2 < st.requests
    assert max(per_conn) >= 5


_OPS = {  # op -> (HTTP method of the faulted request, predicate)
    "put": ("PUT", match(method="PUT")),  # pipe_file -> PutObject
    "get": ("GET", match(method="GET", path_contains="/obj.bin")),  # cat_file -> GetObject
    "head": ("HEAD", match(method="HEAD")),  # info -> HeadObject
    "list": ("GET", match(method="GET", query_contains="list-type")),  # ls -> ListObjectsV2
}


@pytest.mark.parametrize(
    "fault, op, exc_type",
    [
        ("500", "put", OSError),
        ("503", "put", OSError),
        ("500", "get", OSError),
        ("503", "head", OSError),
        ("500", "list", OSError),
        ("reset", "put", botocore.exceptions.EndpointConnectionError),
        ("reset", "get", botocore.exceptions.EndpointConnectionError),
        ("reset_mid", "put", botocore.exceptions.EndpointConnectionError),
        ("reset_mid", "head", botocore.exceptions.EndpointConnectionError),
        # body streamed by s3fs itself: the raw aiohttp error escapes
        ("reset_mid", "get", aiohttp.ClientPayloadError),
        # body parsed by botocore: wrapped
        ("reset_mid", "list", botocore.exceptions.ConnectionClosedError),
        ("stall", "get", botocore.exceptions.ReadTimeoutError),
        ("stall", "put", botocore.exceptions.ReadTimeoutError),
    ],
)
def test_s3_fault_kinds_as_seen_by_s3fs(flaky_s3_backend, s3_proxy, fault, op, exc_type) -> None:
    fs, root = flaky_s3_backend.fs()
    key = f"{root}/obj.bin"
    data = os.urandom(300_000)
    fs.pipe_file(key, data)  # also warms up a keep-alive connection
    fs.invalidate_cache()
    s3_proxy.reset_stats()
    method, pred = _OPS[op]
    s3_proxy.configure(fail_rate=1.0, faults=(fault,), match=pred)

    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        if op == "put":
            fs.pipe_file(f"{root}/new.bin", b"new data")
        elif op == "get":
            fs.cat_file(key)
        elif op == "head":
            fs.info(key)
        else:
            fs.ls(root)
    elapsed = time.monotonic() - t0
    exc = info.value

    st = s3_proxy.stats
    # s3fs.cat_file sends a HEAD (size) before the GET; count matched ones only
    attempts = sum(pred(r.method, r.target, r.headers) for r in s3_proxy.records)
    if fault in ("500", "503"):
        assert exc.errno == (EREMOTEIO if fault == "500" else errno.EBUSY)
        assert isinstance(exc.__cause__, botocore.exceptions.ClientError)
        assert attempts == 1  # no retry anywhere
    elif fault == "stall":
        assert 1.5 < elapsed < 10  # read_timeout=2
        assert attempts == 1
    else:
        assert not isinstance(exc, OSError)  # BotoCoreError / aiohttp.ClientError
        # aiohttp itself retries idempotent requests once on a fresh connection
        # when a reused keep-alive connection dies before the response head
        assert attempts in (1, 2)
    assert st.faults[fault] == attempts == st.injected

    # heal: everything works again; reset_mid PUT reached upstream
    s3_proxy.configure(fail_rate=0)
    fs.invalidate_cache()
    assert fs.cat_file(key) == data
    if op == "put":
        assert fs.exists(f"{root}/new.bin") == (fault == "reset_mid")


def test_s3_fail_rate_deterministic_with_seed(flaky_s3_backend, s3_proxy) -> None:
    fs, root = flaky_s3_backend.fs()
    key = f"{root}/k"
    fs.pipe_file(key, b"payload")
    calls = 60

    def run(seed: int) -> list[bool]:
        s3_proxy.reset_stats()
        s3_proxy.configure(fail_rate=0.3, faults=("500", "503"), seed=seed)
        outcome = []
        for _ in range(calls):
            try:
                # a ranged read is exactly one GET (a full cat_file adds a HEAD)
                assert fs.cat_file(key, start=0, end=7) == b"payload"
                outcome.append(True)
            except OSError:
                outcome.append(False)
        s3_proxy.configure(fail_rate=0)
        assert s3_proxy.stats.requests == calls  # one attempt per call
        return outcome

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    assert calls * 0.15 <= a.count(False) <= calls * 0.45
    assert s3_proxy.stats.injected == c.count(False)  # stats are of the last run


def test_s3_selective_failures(flaky_s3_backend, s3_proxy) -> None:
    fs, root = flaky_s3_backend.fs()
    fs.pipe_file(f"{root}/existing", b"old")

    # every upload fails, reads still work
    s3_proxy.configure(fail_rate=1.0, faults=("500",), match=match(method="PUT"))
    for i in range(3):
        with pytest.raises(OSError):
            fs.pipe_file(f"{root}/new_{i}", b"x")
    assert fs.cat_file(f"{root}/existing") == b"old"
    assert fs.ls(root) == [f"{root}/existing"]
    assert s3_proxy.stats.faults["500"] == 3

    # a multipart save whose parts fail: the save finally fails
    with pytest.raises(OSError):
        with fs.open(f"{root}/big", "wb", block_size=5 * MiB) as f:
            f.write(os.urandom(11 * MiB))
    s3_proxy.configure(fail_rate=0, match=None)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/big")

    # fail the next N matching requests (by path substring), then heal by itself
    s3_proxy.reset_stats()
    s3_proxy.fail_next(2, "503", match=match(path_contains="/step_"))
    fs.pipe_file(f"{root}/other", b"unaffected")
    for attempt in range(2):
        with pytest.raises(OSError) as info:
            fs.pipe_file(f"{root}/step_1/data", b"d")
        assert info.value.errno == errno.EBUSY
    fs.pipe_file(f"{root}/step_1/data", b"d")
    assert fs.cat_file(f"{root}/step_1/data") == b"d"
    assert s3_proxy.stats.faults["503"] == 2
    assert [r.fault for r in s3_proxy.records][:4] == [None, "503", "503", None]


def test_s3_latency_per_request(flaky_s3_backend, s3_proxy) -> None:
    fs, root = flaky_s3_backend.fs()
    fs.pipe_file(f"{root}/k", b"v")
    latency = 0.05
    s3_proxy.configure(latency=latency)
    s3_proxy.reset_stats()
    t0 = time.monotonic()
    for _ in range(8):
        assert fs.cat_file(f"{root}/k") == b"v"
    elapsed = time.monotonic() - t0
    n = s3_proxy.stats.requests
    assert n >= 8  # cat_file: HEAD + GET
    assert elapsed >= latency * n * 0.8


def test_s3_bandwidth_cap(flaky_s3_backend, s3_proxy) -> None:
    fs, root = flaky_s3_backend.fs()
    data = os.urandom(3 * MiB)
    rate = 6 * MiB  # bytes/s, per connection and direction
    s3_proxy.configure(bandwidth=rate)

    t0 = time.monotonic()
    fs.pipe_file(f"{root}/blob", data)
    up = time.monotonic() - t0
    t0 = time.monotonic()
    assert fs.cat_file(f"{root}/blob") == data
    down = time.monotonic() - t0

    expected = len(data) / rate  # 0.5 s
    assert up >= expected * 0.8, up
    assert down >= expected * 0.8, down

    s3_proxy.configure(bandwidth=None)
    t0 = time.monotonic()
    assert fs.cat_file(f"{root}/blob") == data
    assert time.monotonic() - t0 < down
