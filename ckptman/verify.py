"""Checking committed checkpoints against their manifests without loading tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ckptman import transfer
from ckptman.errors import CorruptCheckpointError
from ckptman.manifest import FileEntry, Manifest
from ckptman.storage import Storage


@dataclass(frozen=True)
class CheckResult:
    """One checkpoint folder: its step (None when its manifest is unreadable) and what is wrong with it."""

    name: str
    step: int | None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    directory: str
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(result for result in self.results if not result.ok)

    def lines(self) -> list[str]:
        """One line per checkpoint for a person, then a summary."""
        out = []
        for result in self.results:
            label = f"step {result.step}" if result.step is not None else "?"
            status = "ok" if result.ok else "FAILED: " + "; ".join(result.problems)
            out.append(f"{result.name} ({label}): {status}")
        failed = len(self.failures)
        out.append(f"{len(self.results) - failed} of {len(self.results)} checkpoints verified in {self.directory}")
        return out


def check_files(transfers: transfer.Transfers, storage: Storage, manifest: Manifest, entries: Sequence[FileEntry]) -> list[str]:
    """Stream files of a checkpoint through their checksums (concurrently); what is wrong with them.

    Called with all files, or with one rank's share in a distributed check.
    """
    problems: list[str] = []

    def one(entry: FileEntry) -> None:
        try:
            transfer.download_verified(storage, f"{manifest.name}/{entry.path}", entry, None)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))

    transfers.run_each(one, entries)
    return sorted(problems)


def check(transfers: transfer.Transfers, storage: Storage, manifest: Manifest) -> CheckResult:
    """Every payload file against its manifest entry; every mismatch or missing file is a problem."""
    return CheckResult(manifest.name, manifest.step, tuple(check_files(transfers, storage, manifest, manifest.files)))
