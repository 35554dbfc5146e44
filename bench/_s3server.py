"""Child process of bench.py: a moto S3 server, or the NetProxy in front of it.

Each runs in its own process so that neither competes for the benchmark
process's GIL (a ThreadedMotoServer or NetProxy started in-process would).

    python bench/_s3server.py moto
    python bench/_s3server.py proxy --upstream-port N --latency 0.02 --bandwidth 33554432

Prints one JSON line ``{"port": N}`` when ready, then serves until stdin is
closed (the parent closes it, or dies).  The proxy answers a line ``stats``
on stdin with one JSON line of its counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AWS_KEY, AWS_SECRET, TESTS, free_port, wait_for_port  # noqa: E402


def start_moto() -> tuple[object, int]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    last: BaseException | None = None
    for _ in range(5):
        port = free_port()
        try:
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
        except OSError as exc:  # port taken between free_port() and bind
            last = exc
            continue
        wait_for_port(port)
        return server, port
    raise RuntimeError(f"could not start moto: {last!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("moto", "proxy"))
    parser.add_argument("--upstream-port", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--bandwidth", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=AWS_KEY, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_DEFAULT_REGION="us-east-1")

    if args.role == "moto":
        server, port = start_moto()
        stop = server.stop
    else:
        sys.path.insert(0, TESTS)
        from netproxy import NetProxy

        proxy = NetProxy("127.0.0.1", args.upstream_port)
        proxy.start()
        proxy.configure(latency=args.latency, bandwidth=args.bandwidth or None)
        port = proxy.port
        stop = proxy.stop

    print(json.dumps({"port": port}), flush=True)
    try:
        for line in sys.stdin:  # ends when the parent closes our stdin (or exits)
            if line.strip() == "stats" and args.role == "proxy":
                st = proxy.stats
                print(json.dumps({"requests": st.requests, "connections": st.connections,
                                  "bytes_to_upstream": st.bytes_to_upstream}), flush=True)
    finally:
        stop()


if __name__ == "__main__":
    main()
