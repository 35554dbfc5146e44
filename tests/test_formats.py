"""On-storage formats: manifest and sidecar JSON round trips and validation; folder names."""

from __future__ import annotations

import json
import math

import pytest

from ckptman.errors import ManifestError, PolicyConfigError
from ckptman.manifest import FileEntry, Manifest
from ckptman.naming import NameFormat
from ckptman.record import CheckpointRecord
from ckptman.state import SidecarState


def manifest(**overrides: object) -> Manifest:
    args: dict[str, object] = dict(
        step=100,
        name="step_00000100",
        kind="state",
        created=1.5,
        files=(FileEntry("state.pt", 10, "xxh3_128:ab"),),
        metrics={"val/loss": 0.25, "nan": math.nan, "inf": -math.inf},
    )
    args.update(overrides)
    return Manifest(**args)  # type: ignore[arg-type]


def manifest_json(**overrides: object) -> bytes:
    document = json.loads(manifest().to_bytes())
    document.update(overrides)
    return json.dumps(document).encode()


class TestManifest:
    def test_round_trip_keeps_nonfinite_metrics_as_strict_json(self) -> None:
        data = manifest().to_bytes()
        json.loads(data, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        back = Manifest.from_bytes(data, "m")
        assert back.step == 100 and back.files == manifest().files and back.size == 10
        assert back.metrics["val/loss"] == 0.25 and math.isnan(back.metrics["nan"]) and back.metrics["inf"] == -math.inf

    @pytest.mark.parametrize(
        "path", ["../other/state.pt", "/etc/passwd", "a/../../b", "s3://other-bucket/x", "a//b", "./a", "a\\b", "", "ckptman-manifest.json"]
    )
    def test_paths_escaping_the_folder_are_rejected(self, path: str) -> None:
        bad = manifest_json(files=[{"path": path, "size": 1, "checksum": "xxh3_128:ab"}])
        with pytest.raises(ManifestError, match="m.json"):
            Manifest.from_bytes(bad, "m.json")

    @pytest.mark.parametrize(
        "overrides, match",
        [
            ({"version": 99}, "version 99 is not supported"),
            ({"format": "other"}, "not a ckptman/manifest"),
            ({"step": -1}, "step"),
            ({"step": "1"}, "step"),
            ({"step": True}, "step"),
            ({"kind": "zip"}, "unknown checkpoint kind"),
            ({"files": [{"path": "a", "size": 1, "checksum": "md5:00"}]}, "algorithm"),
            ({"files": [{"path": "a", "size": -1, "checksum": "xxh3_128:00"}]}, "size"),
            ({"files": [{"path": "a", "size": 1, "checksum": "xxh3_128:00"}] * 2}, "twice"),
            ({"metrics": {"loss": "high"}}, "metric 'loss'"),
        ],
    )
    def test_malformed_fields_name_the_problem(self, overrides: dict[str, object], match: str) -> None:
        with pytest.raises(ManifestError, match=match):
            Manifest.from_bytes(manifest_json(**overrides), "m.json")

    @pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", manifest().to_bytes()[:40]])
    def test_truncated_or_garbage_json_says_incomplete_or_corrupted(self, data: bytes) -> None:
        with pytest.raises(ManifestError, match="m.json"):
            Manifest.from_bytes(data, "m.json")


class TestSidecar:
    def test_round_trip(self) -> None:
        state = SidecarState(
            (CheckpointRecord(5, "s5", {"loss": math.nan}, 1.0, 3, "directory"),),
            {"loss": {"mode": "min", "steps": []}},
            "s5",
            {"keep_best": 1},
        )
        back = SidecarState.from_bytes(state.to_bytes(), "ckptman.json")
        assert back.latest == "s5" and back.checkpoints[0].kind == "directory" and math.isnan(back.checkpoints[0].metrics["loss"])
        assert back.to_dict() == state.to_dict()

    @pytest.mark.parametrize(
        "document, match",
        [
            ({"format": "ckptman/state", "version": 1}, "checkpoints"),
            ({"format": "ckptman/state", "version": 3, "checkpoints": []}, "version 3"),
            ({"format": "ckptman/state", "version": 1, "checkpoints": [{"step": 1}]}, "name"),
            ({"format": "ckptman/state", "version": 1, "checkpoints": [], "latest": 3}, "latest"),
        ],
    )
    def test_invalid_documents(self, document: dict[str, object], match: str) -> None:
        with pytest.raises(ManifestError, match=match):
            SidecarState.from_dict(document, "ckptman.json")


class TestNameFormat:
    def test_default_format_and_pattern(self) -> None:
        names = NameFormat("step_{step:08d}")
        assert names(42) == "step_00000042"
        assert names.matches("step_00000042") and names.matches("step_123456789012")
        assert not names.matches("tensorboard") and not names.matches("step_") and not names.matches("step_1x")
        # Only names this format produces: a user's "step_1" or "step_2024_01" folder is never claimed.
        assert not names.matches("step_1") and not names.matches("step_2024_01") and not names.matches("step_0000000012 ")

    def test_bare_step_does_not_claim_other_folders(self) -> None:
        names = NameFormat("{step}")
        assert names.matches("120") and not names.matches("logs")

    @pytest.mark.parametrize(
        "template, match",
        [
            ("checkpoint", "must contain"),
            ("{epoch}_{step}", "only use the field"),
            ("a/{step}", "one path component"),
            (".{step}", "start with '.'"),
            ("{step:.0e}", "same name"),
            ("{step:x}", "decimal digits"),
            ("{step", "not a valid format"),
            (42, "must be a string"),
        ],
    )
    def test_invalid_formats(self, template: object, match: str) -> None:
        with pytest.raises(PolicyConfigError, match=match):
            NameFormat(template)  # type: ignore[arg-type]
