"""The per-checkpoint manifest: the on-storage contract and the commit marker.

A checkpoint folder exists for ckptman only when ``ckptman-manifest.json`` is
in it. The manifest is written last, in one call, after every payload file is
durable, and deleted first when the checkpoint is removed. Its JSON is the
specification; these classes mirror it::

    {
      "format": "ckptman/manifest", "version": 1,
      "step": 100, "name": "step_00000100", "kind": "state" | "directory",
      "created": 1764000000.0,                 # Unix time of the commit
      "metrics": {"val/loss": 0.25},           # NaN/inf stored as "NaN"/"Infinity"
      "files": [{"path": "state.pt", "size": 123, "checksum": "xxh3_128:<hex>"}]
    }

Unknown versions, unknown checksum algorithms and file paths that escape the
checkpoint folder raise :class:`~ckptman.errors.ManifestError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from ckptman import jsonfmt
from ckptman.errors import ManifestError
from ckptman.record import CheckpointKind, CheckpointRecord

MANIFEST_NAME = "ckptman-manifest.json"
FORMAT = "ckptman/manifest"
VERSION = 1
CHECKSUM_ALGORITHMS = ("xxh3_128",)
KINDS: tuple[CheckpointKind, ...] = ("state", "directory", "sharded")


def check_relative_path(path: object, source: str) -> str:
    """A payload path must stay inside its checkpoint folder: relative, POSIX, no '..'."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{source}: file path must be a non-empty string, got {path!r}")
    parts = path.split("/")
    if (
        path.startswith("/")
        or "\\" in path
        or ":" in parts[0]
        or any(part in ("", ".", "..") for part in parts)
        or path == MANIFEST_NAME
    ):
        raise ManifestError(
            f"{source}: file path {path!r} is not a plain relative path inside the checkpoint folder; "
            "the manifest is unsafe or corrupted"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    """One payload file, relative to the checkpoint folder."""

    path: str
    size: int
    checksum: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "checksum": self.checksum}

    @staticmethod
    def from_json(raw: object, source: str) -> FileEntry:
        if not isinstance(raw, dict):
            raise ManifestError(f"{source}: each file entry must be an object, got {raw!r}")
        path = check_relative_path(raw.get("path"), source)
        size = jsonfmt.require(raw, "size", int, f"{source}: file {path!r}")
        checksum = jsonfmt.require(raw, "checksum", str, f"{source}: file {path!r}")
        algorithm, _, digest = checksum.partition(":")
        if size < 0 or algorithm not in CHECKSUM_ALGORITHMS or not digest:
            raise ManifestError(
                f"{source}: file {path!r} has size {size} / checksum {checksum!r}; "
                f"expected size >= 0 and '<algorithm>:<hex>' with algorithm in {CHECKSUM_ALGORITHMS}"
            )
        return FileEntry(path, size, checksum)


@dataclass(frozen=True)
class Manifest:
    step: int
    name: str
    kind: CheckpointKind
    created: float
    files: tuple[FileEntry, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    epoch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        """Picklable (rank 0 hands manifests to the other ranks), although the metrics view is read-only."""
        return (Manifest, (self.step, self.name, self.kind, self.created, self.files, dict(self.metrics), self.epoch))

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    def record(self) -> CheckpointRecord:
        return CheckpointRecord(self.step, self.name, self.metrics, self.created, self.size, self.kind, self.epoch)

    def with_metrics(self, metrics: Mapping[str, float]) -> Manifest:
        return replace(self, metrics={**self.metrics, **metrics})

    def to_bytes(self) -> bytes:
        document: dict[str, object] = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "name": self.name,
            "kind": self.kind,
            "created": self.created,
            "metrics": jsonfmt.encode_metrics(self.metrics),
            "files": [entry.to_json() for entry in self.files],
        }
        if self.epoch is not None:  # optional: readers that predate it ignore it
            document["epoch"] = self.epoch
        return jsonfmt.dumps(document)

    @staticmethod
    def from_bytes(data: bytes, source: str) -> Manifest:
        document = jsonfmt.loads(data, source)
        jsonfmt.check_format(document, FORMAT, VERSION, source)
        step = jsonfmt.require(document, "step", int, source)
        if step < 0:
            raise ManifestError(f"{source}: step must be >= 0, got {step}")
        name = jsonfmt.require(document, "name", str, source)
        kind = jsonfmt.require(document, "kind", str, source)
        if kind not in KINDS:
            raise ManifestError(f"{source}: unknown checkpoint kind {kind!r}; expected one of {KINDS}")
        created = float(jsonfmt.require(document, "created", (int, float), source))
        raw_files = jsonfmt.require(document, "files", list, source)
        files = tuple(FileEntry.from_json(raw, source) for raw in raw_files)
        if len({entry.path for entry in files}) != len(files):
            raise ManifestError(f"{source}: lists the same file twice")
        metrics = jsonfmt.decode_metrics(document.get("metrics", {}), source)
        epoch = jsonfmt.optional_count(document, "epoch", source)
        return Manifest(step, name, kind, created, files, metrics, epoch)  # type: ignore[arg-type]
