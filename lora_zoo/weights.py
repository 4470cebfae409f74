"""The one decoder of a weights cell: a safetensors file's bytes, validated completely first.

Every consumer of safetensors bytes that came from a zoo or a stranger's file (``LoraRecord``,
the batched loader, ingest, ``info``, cards) parses the header HERE and nowhere else, so they
all accept and refuse exactly the same cells. ``parse_header`` checks the whole structure before
a single tensor byte is touched (docs/FORMAT.md, "Weights cells"):

- the 8-byte little-endian header length is present, at least 2, at most ``MAX_HEADER_BYTES``
  and inside the buffer;
- the header is UTF-8 JSON, nested at most ``MAX_DEPTH`` levels (checked by a bracket scan
  before ``json.loads``, so a deeply nested header is a named error, never a RecursionError),
  without NaN / Infinity constants and without a repeated key at any level (``json.loads``
  would silently keep the last of two equal tensor names);
- the top level is an object; ``__metadata__`` (optional) maps strings to strings; every other
  entry is a tensor ``{"dtype", "shape", "data_offsets"}`` with a known dtype, a shape of
  non-negative ints and ``numel x itemsize`` equal to its byte span;
- the spans, sorted, start at 0, are contiguous (no gap, no overlap) and end exactly at the end
  of the buffer (no trailing bytes).

What it returns (``Header``) is immutable, so the batched loader can cache it per distinct header
bytes and validate once per row group instead of once per row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from lora_zoo.errors import CorruptFileError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_DEPTH = 4  # object > tensor entry > shape list: 3 in a valid header
MAX_DIMS = 8

#: safetensors dtype name -> bytes per element (sub-byte and complex types are refused)
DTYPE_BYTES: Mapping[str, int] = MappingProxyType({
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
})  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # what a zoo's LoRA factors may be

_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # a JSON string (escapes included)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a validated header. ``start`` / ``end``: byte offsets into the data
    section (which begins right after the header, at ``Header.data_start``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header. ``tensors`` sorted by name; ``metadata`` read-only."""

    header_len: int  # the JSON header's length in bytes (the 8-byte prefix's value)
    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        return max((t.end for t in self.tensors), default=0)

    @property
    def total_len(self) -> int:
        """The exact length of the buffer this header describes."""
        return self.data_start + self.data_len

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


def looks_pickled(data: bytes | memoryview) -> bool:
    """Pickle protocol 2-5 opcodes, or a zip archive (torch.save's default container)."""
    head = bytes(data[:10])
    if len(head) > 9 and head[8:9] == b"{":
        return False
    return head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))  # fmt: skip


def header_length(data: bytes | memoryview, total: int, *, file: str | None = None) -> int:
    """The header length of a buffer of ``total`` bytes that starts with ``data`` (>= 8 bytes
    of it), bounded before anything is allocated for it."""
    if total < 8 or len(data) < 8:
        raise CorruptFileError(
            f"only {total} bytes: shorter than a safetensors header length", file=file
        )
    n = int.from_bytes(bytes(data[:8]), "little")
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > total:
        raise CorruptFileError(
            f"safetensors header length {n} is impossible for {total} bytes "
            f"(truncated, or not safetensors; the cap is {MAX_HEADER_BYTES} bytes)",
            file=file,
            key="header",
        )
    return n


def parse_safetensors(data: bytes | memoryview, *, file: str | None = None) -> Header:
    """Validate a whole safetensors buffer's structure; the parsed header. Tensors untouched."""
    if looks_pickled(data):
        raise CorruptFileError(
            "this is a pickle / torch.save archive, not safetensors; convert it with "
            "`lora-zoo ingest --allow-pickle-conversion` (uses torch.load(weights_only=True))",
            file=file,
        )
    n = header_length(data, len(data), file=file)
    return parse_header(bytes(data[8 : 8 + n]), len(data), file=file)


def parse_header(head: bytes, total: int | None, *, file: str | None = None) -> Header:
    """Validate the JSON header ``head`` (the bytes after the length prefix) of a buffer of
    ``total`` bytes. ``total=None``: the header of many rows (the batched loader validates once
    per distinct header); the caller then checks each row's length equals ``total_len``."""
    if not 2 <= len(head) <= MAX_HEADER_BYTES or (total is not None and 8 + len(head) > total):
        raise CorruptFileError(
            f"safetensors header of {len(head)} bytes in {total}", file=file, key="header"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(
            f"safetensors header is not UTF-8 ({e})", file=file, key="header"
        ) from e
    _check_depth(head, file)
    try:
        raw = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except _Refused as e:
        raise CorruptFileError(str(e), file=file, key="header") from None
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(
            f"safetensors header is not JSON ({e})", file=file, key="header"
        ) from e
    if not isinstance(raw, dict):
        raise CorruptFileError("safetensors header is not a JSON object", file=file, key="header")
    meta = _metadata(raw.pop("__metadata__", None), file)
    specs = tuple(_tensor(name, info, file) for name, info in sorted(raw.items()))
    _check_spans(specs, None if total is None else total - 8 - len(head), file)
    return Header(len(head), specs, MappingProxyType(meta))


class _Refused(ValueError):
    """A header JSON feature safetensors' format does not allow (raised inside json.loads)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"key {dup!r} appears twice in the safetensors header")
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not allowed in a safetensors header")


def _check_depth(head: bytes, file: str | None) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` before json.loads recurses into it: strings
    blanked, then a running bracket count (numpy: no Python loop over characters)."""
    if head.count(b"[") + head.count(b"{") <= MAX_DEPTH:
        return
    bare = np.frombuffer(_STRING.sub(b'""', head), np.uint8)
    step = np.isin(bare, _OPEN).astype(np.int32) - np.isin(bare, _CLOSE).astype(np.int32)
    if step.size and int(np.cumsum(step).max()) > MAX_DEPTH:
        raise CorruptFileError(
            f"safetensors header nests deeper than {MAX_DEPTH} levels", file=file, key="header"
        )


def _metadata(meta: Any, file: str | None) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(
            "__metadata__ must map strings to strings", file=file, key="__metadata__"
        )
    return dict(meta)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor(name: str, info: Any, file: str | None) -> TensorSpec:
    if not name:
        raise CorruptFileError("empty tensor name", file=file, key="header")
    if not isinstance(info, dict) or set(info) != _TENSOR_KEYS:
        raise CorruptFileError(
            "tensor entry must be {dtype, shape, data_offsets}", file=file, key=name
        )
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CorruptFileError(f"unknown tensor dtype {dtype!r}", file=file, key=name)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(_int, shape)):
        raise CorruptFileError(
            f"shape {shape!r} is not a list of at most {MAX_DIMS} non-negative ints",
            file=file,
            key=name,
        )
    if not isinstance(offs, list) or len(offs) != 2 or not all(map(_int, offs)):
        raise CorruptFileError(
            f"data_offsets {offs!r} are not two non-negative ints", file=file, key=name
        )
    start, end = offs
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if end < start or end - start != nbytes:
        raise CorruptFileError(
            f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span [{start}, {end})",
            file=file,
            key=name,
        )
    return TensorSpec(name, dtype, tuple(shape), start, end)


def _check_spans(specs: tuple[TensorSpec, ...], body: int | None, file: str | None) -> None:
    """Spans sorted by offset must tile [0, body) exactly: no gap, no overlap, no tail
    (``body=None``: the data length is whatever the spans cover)."""
    pos = 0
    for t in sorted(specs, key=lambda t: (t.start, t.end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else "leaves hidden bytes"
            raise CorruptFileError(
                f"tensor data at [{t.start}, {t.end}) {what} (expected to start at {pos})",
                file=file,
                key=t.name,
            )
        if body is not None and t.end > body:
            raise CorruptFileError(
                f"tensor data ends at byte {t.end} of the data section but only {body} bytes "
                "are present: the file is truncated",
                file=file,
                key=t.name,
            )
        pos = t.end
    if body is not None and pos != body:
        raise CorruptFileError(
            f"tensor data covers {pos} bytes but {body} follow the header "
            f"({'trailing bytes' if pos < body else 'truncated'})",
            file=file,
            key="data_offsets",
        )


__all__ = [
    "DTYPE_BYTES",
    "FLOAT_DTYPES",
    "MAX_HEADER_BYTES",
    "Header",
    "TensorSpec",
    "header_length",
    "looks_pickled",
    "parse_header",
    "parse_safetensors",
]
