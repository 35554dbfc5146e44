"""Strict JSON for ckptman's on-storage files.

Metric values may be NaN or infinite (they are recorded, never best), which
plain JSON cannot hold; they are stored as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` so the files stay readable by any tool
(``jq``, JavaScript), and turned back into floats on read.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from ckptman.errors import ManifestError

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def decode_float(value: object, where: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where}: expected a number, got {value!r}")
    return float(value)


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    return {name: encode_float(value) for name, value in metrics.items()}


def decode_metrics(raw: object, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k for k in raw):
        raise ManifestError(f"{where}: 'metrics' must be an object of name to number, got {raw!r}")
    return {name: decode_float(value, f"{where}: metric {name!r}") for name, value in raw.items()}


def dumps(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def loads(data: bytes, source: str) -> dict[str, Any]:
    """Parse a JSON object, naming ``source`` in any error."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{source} is not valid JSON ({exc}); it is incomplete or corrupted") from exc
    if not isinstance(document, dict):
        raise ManifestError(f"{source} must hold a JSON object, got {type(document).__name__}")
    return document


def require(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    """A required field of the given JSON type (bools are never ints)."""
    value = document.get(key)
    if value is None or isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ManifestError(f"{source}: field {key!r} is missing or not {_kind_name(kind)} (got {value!r})")
    return value


def optional_count(document: Mapping[str, Any], key: str, source: str) -> int | None:
    """An optional field holding an int >= 0 (absent in files written before it existed)."""
    value = document.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ManifestError(f"{source}: field {key!r} must be an int >= 0 when present, got {value!r}")
    return value


def check_format(document: Mapping[str, Any], fmt: str, supported: int, source: str) -> int:
    """Reject files of another format or of a version this code does not know."""
    if document.get("format") != fmt:
        raise ManifestError(f"{source}: not a {fmt} file (format={document.get('format')!r})")
    version = require(document, "version", int, source)
    if version > supported or version < 1:
        raise ManifestError(
            f"{source}: {fmt} version {version} is not supported by this ckptman (supports <= {supported}); upgrade ckptman"
        )
    return version


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
