"""Storage options from the command line: ``--storage-option KEY=VALUE`` and the S3/GCS shortcuts.

``--endpoint-url``, ``--profile`` and ``--anon`` are spelled per protocol
here (s3fs and gcsfs name them differently), and object stores get bounded
timeouts unless the user chose their own, so a wrong endpoint fails within
seconds instead of retrying for minutes. Option names are checked against
the filesystem's constructor before anything connects: a typo is named as a
typo, not reported later as an unreachable bucket.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ckptman.errors import CheckpointError

#: s3fs/botocore settings the CLI sets unless the user did: fail fast, retry a little.
S3_TIMEOUTS: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 20,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
#: gcsfs: seconds per HTTP request.
GCS_TIMEOUTS: dict[str, Any] = {"requests_timeout": 20}
S3_PROTOCOLS = ("s3", "s3a")
GCS_PROTOCOLS = ("gs", "gcs")


class OptionError(CheckpointError, ValueError):
    """A storage option cannot be used as given (unknown name, set twice, wrong protocol)."""


def parse_storage_option(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` with a dotted key for nesting; the value is JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. anon=true or client_kwargs.endpoint_url=http://localhost:9000), got {text!r}"
        )
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return parts, value


def build_storage_options(items: Sequence[tuple[list[str], Any]]) -> dict[str, Any]:
    """Merge parsed ``--storage-option`` items into the nested dict fsspec expects."""
    options: dict[str, Any] = {}
    for parts, value in items:
        _put(options, parts, value, "--storage-option")
    return options


def _put(options: dict[str, Any], parts: Sequence[str], value: Any, flag: str) -> None:
    node = options
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise OptionError(f"{flag} {'.'.join(parts[: i + 1])} is set both as a value and as a group")
        node = child
    if isinstance(node.get(parts[-1]), dict):
        raise OptionError(f"{flag} {'.'.join(parts)} is set both as a value and as a group")
    node[parts[-1]] = value


def protocol_of(url: str) -> str:
    """fsspec's protocol of a URL (``file`` for a plain path); chained URLs count by their first part."""
    head = url.split("::", 1)[0]
    return head.split("://", 1)[0] if "://" in head else "file"


def storage_options(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command line says about storage, as fsspec storage options for ``url``."""
    options = build_storage_options(args.storage_option)
    protocol = protocol_of(url)
    shortcuts = _shortcuts(protocol, args.endpoint_url, args.profile, args.anon)
    for flag, (parts, value) in shortcuts.items():
        if _lookup(options, parts) is not None:
            raise OptionError(f"{flag} and --storage-option {'.'.join(parts)} both set it; keep one")
        _put(options, parts, value, flag)
    if "::" not in url:  # a chained URL nests options per protocol; fsspec checks those
        check_names(protocol, options)
    return with_timeouts(protocol, options)


def _shortcuts(protocol: str, endpoint: str | None, profile: str | None, anon: bool) -> dict[str, tuple[list[str], Any]]:
    wanted = {"--endpoint-url": endpoint, "--profile": profile, "--anon": anon or None}
    given = {flag: value for flag, value in wanted.items() if value is not None}
    if not given:
        return {}
    if protocol in S3_PROTOCOLS:
        s3: dict[str, tuple[list[str], Any]] = {
            "--endpoint-url": (["client_kwargs", "endpoint_url"], endpoint),
            "--profile": (["profile"], profile),
            "--anon": (["anon"], True),
        }
        return {flag: s3[flag] for flag in given}
    if protocol in GCS_PROTOCOLS:
        if "--profile" in given:
            raise OptionError(
                "--profile is an AWS setting; for gs:// pass credentials with GOOGLE_APPLICATION_CREDENTIALS=<key.json> "
                "or --storage-option token=<key.json>"
            )
        gcs: dict[str, tuple[list[str], Any]] = {"--endpoint-url": (["endpoint_url"], endpoint), "--anon": (["token"], "anon")}
        return {flag: gcs[flag] for flag in given}
    raise OptionError(f"{', '.join(given)} apply to s3:// and gs:// URLs, not to {protocol}://")


def _lookup(options: Mapping[str, Any], parts: Sequence[str]) -> Any:
    node: Any = options
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def known_names(protocol: str) -> tuple[str, ...] | None:
    """The storage options the protocol's filesystem takes, or None when it cannot be told (not installed)."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return None  # the manager raises UnsupportedProtocolError with the install hint
    names = set(_FSSPEC_NAMES)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                names.add(name)
    if protocol in S3_PROTOCOLS:
        names.add("profile")  # s3fs hands it to aiobotocore's session
    return tuple(sorted(names))


#: options every fsspec filesystem takes (AbstractFileSystem and its instance cache)
_FSSPEC_NAMES = ("skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths")


def check_names(protocol: str, options: Mapping[str, Any]) -> None:
    """Refuse option names the filesystem does not take, naming them and the ones it does."""
    known = known_names(protocol)
    if known is None:
        return
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(
            f"unknown storage option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for {protocol}://; "
            f"its filesystem takes: {', '.join(known)}"
        )


def with_timeouts(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Bounded timeouts and retries for object stores, each only where the user set nothing."""
    result = copy.deepcopy(dict(options))
    if protocol in S3_PROTOCOLS:
        config = result.setdefault("config_kwargs", {})
        for key, value in S3_TIMEOUTS.items():
            config.setdefault(key, copy.deepcopy(value))
    elif protocol in GCS_PROTOCOLS:
        for key, value in GCS_TIMEOUTS.items():
            result.setdefault(key, value)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The storage flags every command that opens a directory takes."""
    group = parser.add_argument_group("storage (see the environment variables below)")
    group.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        type=parse_storage_option,
        default=[],
        help="fsspec storage option, repeatable; VALUE is JSON when it parses (true, 3, {...}), else a string; "
        "dotted keys nest (client_kwargs.endpoint_url=http://localhost:9000)",
    )
    group.add_argument("--endpoint-url", metavar="URL", help="S3 or GCS endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto)")
    group.add_argument("--profile", metavar="NAME", help="AWS profile from ~/.aws/config (s3:// only)")
    group.add_argument("--anon", action="store_true", help="no credentials: public buckets")
