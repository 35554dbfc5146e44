"""The command line's grammar. Handlers are named, not imported, so ``--help`` loads no storage code."""

from __future__ import annotations

import argparse
import os

from ckptman import __version__
from ckptman.cli import options
from ckptman.cli.exitcodes import DESCRIPTION as EXIT_CODES
from ckptman.cli.exitcodes import PROG

ENVIRONMENT = """\
environment (read by fsspec, s3fs/botocore and gcsfs; --storage-option and the flags above win):
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   S3 credentials
  AWS_PROFILE                 profile of ~/.aws/config and ~/.aws/credentials (like --profile)
  AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3   S3 endpoint, e.g. MinIO or moto (like --endpoint-url)
  AWS_DEFAULT_REGION, AWS_REGION          region of the bucket
  AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE   other places for those files
  GOOGLE_APPLICATION_CREDENTIALS   GCS service-account key file (else gcloud's default login)
  STORAGE_EMULATOR_HOST       GCS emulator, e.g. http://127.0.0.1:4443 (like --endpoint-url for gs://)
  FSSPEC_<PROTOCOL>_<OPTION>  any fsspec storage option, e.g. FSSPEC_S3_ANON=true
Object stores get connect/read timeouts of a few seconds unless you set them
(--storage-option config_kwargs.connect_timeout=..., read_timeout=..., retries=...).
"""

EPILOG = f"""\
examples:
  {PROG} demo                          train a tiny model into ./runs/demo; run again to resume
  {PROG} ls runs/demo                  what is committed, and the rule that keeps each
  {PROG} verify s3://bucket/run --endpoint-url http://127.0.0.1:9000
  {PROG} restore runs/demo 200 --to /tmp/step200
  {PROG} gc runs/demo --yes            remove what interrupted saves left

{EXIT_CODES}

{ENVIRONMENT}"""

#: command -> (``module:function`` under ckptman.cli, one-line help)
HANDLERS = {
    "demo": "demo:cmd_demo",
    "ls": "inspecting:cmd_ls",
    "info": "inspecting:cmd_info",
    "best": "inspecting:cmd_best",
    "verify": "inspecting:cmd_verify",
    "rm": "changing:cmd_rm",
    "gc": "changing:cmd_gc",
    "restore": "changing:cmd_restore",
    "publish": "changing:cmd_publish",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Checkpoint manager for PyTorch on fsspec storage: inspect, verify, clean up, restore and publish "
        "the checkpoints of a run directory (a local path or any fsspec URL: s3://, gs://, memory://, ...).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=description, epilog=f"{EXIT_CODES}\n\n{ENVIRONMENT}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=HANDLERS[name])
        if name != "demo":
            sub.add_argument("directory", help="the run directory: a local path or fsspec URL")
        sub.add_argument("--json", action="store_true", help="print one JSON document on stdout (schema: docs/cli.md)")
        options.add_arguments(sub)
        return sub

    demo = command(
        "demo",
        "train a tiny model with checkpointing; run again to resume",
        "Train a small MLP with periodic and best-metric checkpoints and retention. "
        "Run again on the same directory to resume from its latest checkpoint.",
    )
    demo.add_argument("directory", nargs="?", default=os.path.join("runs", "demo"), help="local path or fsspec URL (default: ./runs/demo)")
    demo.add_argument("--steps", type=int, default=200, help="training steps to run in this invocation (default: 200)")

    command("ls", "list committed checkpoints and why they are kept", "List the committed checkpoints (read-only): "
            "step, size, age, epoch, metrics and the retention rule that keeps each.")
    info = command("info", "show one checkpoint: manifest, files, checksums", "Show one committed checkpoint (read-only).")
    info.add_argument("step", type=int, help="the checkpoint's step")
    best = command("best", "the best checkpoint by a tracked metric", "The best committed checkpoint by a metric the "
                   "writer tracked (read-only); exits 1 when no checkpoint has a value for it.")
    best.add_argument("metric", nargs="?", default=None, help="metric name (default: the first tracked one)")
    check = command(
        "verify",
        "check sizes and checksums; exit 1 on any failure",
        "Read every payload file of the committed checkpoints (or of one step) and compare it with its manifest; "
        "loads no tensor, changes nothing. Exits 0 when all verify, 1 when any fails.",
    )
    check.add_argument("step", nargs="?", type=int, default=None, help="verify only this step")
    check.add_argument("--step", dest="step_option", type=int, default=None, help=argparse.SUPPRESS)

    rm = command("rm", "delete checkpoints (takes the directory's lease)", "Delete committed checkpoints, manifest "
                 "first, through a writable manager: refused while a job holds the directory. The latest checkpoint "
                 "is what a restarted run resumes from: deleting it needs --force.")
    rm.add_argument("steps", type=int, nargs="+", metavar="STEP", help="steps to delete")
    rm.add_argument("--force", action="store_true", help="also delete the latest checkpoint")
    gc = command("gc", "remove what interrupted saves left (dry run unless --yes)", "List checkpoint folders without a "
                 "manifest (interrupted saves), temporary files and an out-of-date sidecar; with --yes remove and "
                 "repair them through a writable manager (takes the lease). Committed checkpoints are never touched.")
    gc.add_argument("--yes", action="store_true", help="act: remove and repair (default: only show)")
    restore = command("restore", "download a checkpoint, verified, into a local folder", "Download any kind of "
                      "checkpoint (state file, directory, sharded) into LOCAL_DIR, every file checked against its "
                      "manifest's checksum.")
    restore.add_argument("step", type=int, help="the checkpoint's step")
    restore.add_argument("--to", required=True, metavar="LOCAL_DIR", help="a new or empty local directory")
    publish = command("publish", "write a state checkpoint's chosen keys as one standalone .pth", "Load a verified "
                      "state checkpoint and write its top-level KEYS as one torch.save file (mgr.publish): by default "
                      "into <directory>/published/ (takes the lease), or to --to URL.")
    publish.add_argument("step", type=int, help="the checkpoint's step")
    publish.add_argument("--keys", metavar="K1,K2", help="top-level keys to keep (default: all)")
    publish.add_argument("--to", metavar="URL", help="file URL, or folder ending in / (default: <directory>/published/)")
    return parser
