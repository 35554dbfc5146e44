"""Checkpoint dicts that ``torch.load(weights_only=True)`` can read back.

``weights_only`` (torch's default since 2.6) refuses everything but tensors and
plain containers, yet frameworks put numpy values and their own classes into
their checkpoints: mmengine's ``message_hub`` holds ``HistoryBuffer`` objects
of numpy arrays, so mmengine 0.10.7 cannot resume its own checkpoints on torch
2.6+ (mmengine #1655). :func:`encode` turns such values into tagged plain dicts
before the save, :func:`decode` turns them back after a verified load. A value
of any other type is refused at save time, naming where it is, rather than at
the resume that would need it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptman.errors import CheckpointError

__all__ = ["Codec", "UnloadableStateError", "decode", "encode"]

TAG = "__ckptman_plain__"
"""The key marking an encoded value; its value names the codec (``"ndarray"`` or a :class:`Codec` name)."""

_PLAIN_SCALARS = frozenset({str, bytes, bytearray, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device})
_MAPPINGS = frozenset({dict, OrderedDict, Counter})  # what weights_only rebuilds (torch's allow-list)
_SEQUENCES = frozenset({list, tuple, set})
_NDARRAY = "ndarray"


class UnloadableStateError(CheckpointError):
    """A checkpoint value that ``torch.load(weights_only=True)`` could not load back."""


@dataclass(frozen=True)
class Codec:
    """How one class becomes plain data and back; ``to_plain``'s dict may hold numpy arrays (encoded in turn)."""

    name: str
    cls: type
    to_plain: Callable[[Any], dict[str, Any]]
    from_plain: Callable[[dict[str, Any]], Any]


def encode(value: Any, codecs: Sequence[Codec] = (), where: str = "checkpoint") -> Any:
    """``value`` with numpy values and ``codecs``' classes as tagged plain dicts; tensors are shared, not copied."""
    by_class = {codec.cls: codec for codec in codecs}
    return _encode(value, by_class, where)


def decode(value: Any, codecs: Sequence[Codec] = ()) -> Any:
    """The inverse of :func:`encode`; plain values pass through unchanged."""
    by_name = {codec.name: codec for codec in codecs}
    return _decode(value, by_name)


def _encode(value: Any, codecs: dict[type, Codec], where: str) -> Any:
    kind = type(value)
    if kind in _PLAIN_SCALARS or isinstance(value, torch.Tensor):
        return value
    if kind in _MAPPINGS:
        if TAG in value:
            raise UnloadableStateError(f"{where} has a key {TAG!r}, which ckptman reserves for encoded values: rename it")
        items = {_plain_key(key, where): _encode(item, codecs, f"{where}[{key!r}]") for key, item in value.items()}
        return items if kind is dict else kind(items)
    if kind in _SEQUENCES:
        return kind(_encode(item, codecs, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, np.generic):
        return _encode(value.item(), codecs, where)  # a numpy scalar as the Python number it holds
    if kind is np.ndarray:
        return {TAG: _NDARRAY, "data": _ndarray_as_tensor(value, where)}
    codec = codecs.get(kind)
    if codec is not None:
        return {TAG: codec.name, **_encode(codec.to_plain(value), codecs, f"{where} ({codec.name})")}
    if kind in _user_safe_classes():
        return value
    raise UnloadableStateError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot load, "
        "so the checkpoint could not be resumed from: keep such values to numbers, strings, bytes, lists, tuples, "
        "sets, dicts, tensors and numpy arrays, or allow the class with torch.serialization.add_safe_globals"
    )


def _user_safe_classes() -> set[type]:
    """Classes allowed with ``torch.serialization.add_safe_globals``: weights_only loads them as they are."""
    return {g for g in torch.serialization.get_safe_globals() if isinstance(g, type)}


def _plain_key(key: Any, where: str) -> Any:
    if type(key) in _PLAIN_SCALARS:
        return key
    raise UnloadableStateError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys")


def _ndarray_as_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(array)).clone()
    except TypeError as exc:
        raise UnloadableStateError(
            f"{where} is a numpy array of dtype {array.dtype}, which has no tensor equivalent: "
            "store numbers (or convert it, e.g. array.tolist())"
        ) from exc


def _decode(value: Any, codecs: dict[str, Codec]) -> Any:
    kind = type(value)
    if kind in _MAPPINGS:
        tag = value.get(TAG)
        if tag is None:
            items = {key: _decode(item, codecs) for key, item in value.items()}
            return items if kind is dict else kind(items)
        if tag == _NDARRAY:
            return value["data"].numpy()
        fields = {key: _decode(item, codecs) for key, item in value.items() if key != TAG}
        if tag not in codecs:
            raise UnloadableStateError(f"a checkpoint value is encoded as {tag!r}, which no codec given here decodes")
        return codecs[tag].from_plain(fields)
    if kind in _SEQUENCES:
        return kind(_decode(item, codecs) for item in value)
    return value
