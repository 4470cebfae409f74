"""lora_zoo.weights: the one safetensors decoder accepts exactly the well-formed cells
safetensors' own loader accepts among these, and refuses each malformed one with a named error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lora_zoo.errors import CorruptFileError
from lora_zoo.weights import MAX_HEADER_BYTES, parse_header, parse_safetensors


def _valid() -> bytes:
    g = torch.Generator().manual_seed(0)
    return st_save(
        {
            "m.lora_A.weight": torch.randn(2, 3, generator=g),  # (r, in)
            "m.lora_B.weight": torch.randn(4, 2, generator=g),  # (out, r)
            "n.lora_A.weight": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        },
        metadata={"format": "pt"},
    )


def _raw(text: str | bytes, body: bytes = b"") -> bytes:
    head = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(head)) + head + body


def _entry(dtype: str, shape: list[int], a: int, b: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}


def test_valid_cell_matches_safetensors_own_loader():
    data = _valid()
    h = parse_safetensors(data, file="f")
    ref = st_load(data)
    assert h.names == tuple(sorted(ref))
    assert h.total_len == len(data) and dict(h.metadata) == {"format": "pt"}
    for t in h.tensors:
        assert t.shape == tuple(ref[t.name].shape)
        raw = data[h.data_start + t.start : h.data_start + t.end]
        assert raw == ref[t.name].contiguous().view(torch.uint8).numpy().tobytes()
    with pytest.raises(TypeError):
        h.metadata["x"] = "y"  # immutable: cached and shared by the batched loader


def test_header_of_many_rows_leaves_the_length_check_to_the_caller():
    data = _valid()
    n = struct.unpack("<Q", data[:8])[0]
    h = parse_header(data[8 : 8 + n], None)
    assert h.total_len == len(data)


E = CorruptFileError
F32 = 4


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("short", b"\x01\x00", "shorter than"),
        ("len_over_buffer", struct.pack("<Q", 1 << 40) + b"{}", "impossible"),
        ("len_over_cap", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "impossible"),
        ("not_utf8", _raw(b'{"a\xff":1}'), "UTF-8"),
        ("not_json", _raw("{nope"), "not JSON"),
        ("not_object", _raw("[1, 2]"), "not a JSON object"),
        ("nan_constant", _raw('{"__metadata__": {"a": NaN}}'), "NaN"),
        ("deep", _raw('{"x":' + "[" * 50_000 + "]" * 50_000 + "}"), "nests deeper"),
        ("dup_name", _raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                          '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"), "twice"),
        ("metadata_not_str", _raw('{"__metadata__": {"a": 1}}'), "strings to strings"),
        ("unknown_dtype", _raw(json.dumps({"a": _entry("F4", [2], 0, 1)}), b"x"), "dtype"),
        ("extra_key", _raw(json.dumps({"a": {**_entry("U8", [1], 0, 1), "x": 1}}), b"x"), "entry"),
        ("neg_shape", _raw(json.dumps({"a": _entry("U8", [-1], 0, 1)}), b"x"), "shape"),
        ("bool_shape", _raw(json.dumps({"a": _entry("U8", [True], 0, 1)}), b"x"), "shape"),
        ("float_offset", _raw(json.dumps({"a": _entry("U8", [1], 0, 1.0)}), b"x"), "data_offsets"),
        ("size_mismatch", _raw(json.dumps({"a": _entry("F32", [2], 0, 4)}), b"x" * 4), "needs 8"),
        ("overlap", _raw(json.dumps({"a": _entry("F32", [2], 0, 8),
                                     "b": _entry("F32", [1], 4, 8)}), b"x" * 8), "overlaps"),
        ("gap", _raw(json.dumps({"a": _entry("F32", [1], 0, 4),
                                 "b": _entry("F32", [1], 8, 12)}), b"x" * 12), "hidden bytes"),
        ("not_at_zero", _raw(json.dumps({"a": _entry("F32", [1], 4, 8)}), b"x" * 8), "hidden"),
        ("trailing", _raw(json.dumps({"a": _entry("F32", [1], 0, 4)}), b"x" * 6), "trailing"),
        ("truncated", _raw(json.dumps({"a": _entry("F32", [2], 0, 8)}), b"x" * 6), "truncated"),
    ],
)  # fmt: skip
def test_malformed_cells_are_refused_by_name(name, data, match):
    with pytest.raises(E, match=match) as e:
        parse_safetensors(data, file="cell.safetensors")
    assert e.value.file == "cell.safetensors", name


def test_safetensors_refuses_what_we_refuse_where_it_checks_structure():
    """Cross-check a sample against safetensors' own loader (the reference reader): overlaps,
    gaps and trailing bytes are refused by both; we refuse them before any tensor is read."""
    for data in (
        _raw(json.dumps({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}), b"x" * 8),
        _raw(json.dumps({"a": _entry("F32", [1], 0, 4)}), b"x" * 6),
    ):
        with pytest.raises(Exception):  # noqa: B017 (safetensors raises its own error types)
            st_load(data)
        with pytest.raises(E):
            parse_safetensors(data)


def test_zero_size_tensors_and_empty_header_are_fine():
    data = _raw(json.dumps({"a": _entry("F32", [0, 3], 0, 0), "b": _entry("U8", [2], 0, 2)}), b"xy")
    h = parse_safetensors(data)
    assert [t.name for t in h.tensors] == ["a", "b"] and h.data_len == 2
    assert set(st_load(data)) == {"a", "b"}
    assert parse_safetensors(_raw("{}")).tensors == ()


def test_pickle_bytes_are_named_as_pickles():
    with pytest.raises(E, match="pickle"):
        parse_safetensors(b"\x80\x04\x95" + b"\0" * 20)
