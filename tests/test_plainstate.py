"""ckptman.plainstate: framework values encoded so that torch.load(weights_only=True) reads them back."""

from __future__ import annotations

import io
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from ckptman.plainstate import TAG, Codec, UnloadableStateError, decode, encode


@dataclass
class Buffer:
    """Stands in for a framework class such as mmengine's HistoryBuffer."""

    values: np.ndarray
    limit: int


BUFFER = Codec("test.Buffer", Buffer, lambda b: {"values": b.values, "limit": b.limit}, lambda f: Buffer(f["values"], f["limit"]))


def weights_only_roundtrip(value: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_numpy_values_and_codec_classes_survive_a_weights_only_load() -> None:
    tensor = torch.arange(3.0)
    state = {
        "weights": OrderedDict(w=tensor),
        "hub": {"loss": Buffer(np.array([0.5, 0.25]), 10), "lr": np.float32(0.1), "count": np.int64(7)},
        "milestones": Counter({2: 1, 5: 1}),
        "meta": {"shape": (2, 3), "tags": {"a", "b"}, "table": np.arange(6).reshape(2, 3), "raw": b"\x00"},
    }
    loaded = decode(weights_only_roundtrip(encode(state, [BUFFER])), [BUFFER])

    assert torch.equal(loaded["weights"]["w"], tensor) and type(loaded["weights"]) is OrderedDict
    assert type(loaded["hub"]["loss"]) is Buffer and loaded["hub"]["loss"].limit == 10
    np.testing.assert_array_equal(loaded["hub"]["loss"].values, [0.5, 0.25])
    assert type(loaded["hub"]["lr"]) is float and loaded["hub"]["lr"] == pytest.approx(0.1)
    assert loaded["hub"]["count"] == 7 and type(loaded["hub"]["count"]) is int
    assert loaded["milestones"] == Counter({2: 1, 5: 1}) and type(loaded["milestones"]) is Counter
    assert loaded["meta"]["shape"] == (2, 3) and loaded["meta"]["tags"] == {"a", "b"}
    np.testing.assert_array_equal(loaded["meta"]["table"], np.arange(6).reshape(2, 3))


def test_encoding_shares_tensors_instead_of_copying_them() -> None:
    tensor = torch.zeros(4)
    assert encode({"w": tensor})["w"] is tensor


def test_the_plain_value_without_encoding_fails_to_load_with_weights_only() -> None:
    """Why the encoding exists: numpy arrays and framework objects are refused by weights_only."""
    with pytest.raises(Exception, match="Weights only load failed"):
        weights_only_roundtrip({"hub": Buffer(np.array([1.0]), 1)})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"hub": {"obj": object()}}, r"checkpoint\['hub'\]\['obj'\] is a builtins.object"),
        ({"x": [1, slice(1, 2)]}, r"checkpoint\['x'\]\[1\] is a builtins.slice"),
        ({"x": np.array([object()], dtype=object)}, r"numpy array of dtype object"),
        ({(1, 2): 3}, r"key of type tuple"),
        ({"x": {TAG: 1}}, r"reserves"),
    ],
)
def test_a_value_weights_only_cannot_load_is_refused_at_save_naming_where_it_is(value: Any, message: str) -> None:
    with pytest.raises(UnloadableStateError, match=message):
        encode(value)


def test_a_class_allowed_with_add_safe_globals_is_kept_as_is() -> None:
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([Buffer])
    try:
        buffer = Buffer(np.zeros(1), 1)
        assert encode({"b": buffer})["b"] is buffer
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_decoding_an_unknown_tag_names_it() -> None:
    with pytest.raises(UnloadableStateError, match="'other.Class'"):
        decode({"x": {TAG: "other.Class"}})
