"""Batched safetensors decoding straight from Arrow's binary buffer.

A zoo's weight column holds one safetensors file per row. Rows whose headers are identical (the
normal case: same modules, ranks and dtype) share tensor offsets, so each factor of a whole record
batch is one strided numpy view over the buffer instead of one safetensors parse per LoRA. Kept
apart from the datasets (``loaders.py``) because the reader, the benchmarks and ingest validation
use it without any torch ``Dataset``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lora_zoo.errors import CorruptFileError, MissingPairError, NonFiniteError, ShapeMismatchError
from lora_zoo.record import peft_rank_alpha_scale

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bf16: move the bits, reinterpret in torch
}
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (U (.., n, r), V (.., m, r))

# ---- batched safetensors decoding ------------------------------------------------------------
_Spec = tuple[str, str, int, int, tuple[int, ...]]  # key, dtype, start, end, shape


def _parse_header(head: bytes, cfg_text: str | None, where: str) -> tuple[tuple[_Spec, ...], str]:
    """(tensor specs sorted by key, config JSON text). Metadata key order is not stable across
    safetensors writes (a Rust HashMap), so groups are keyed on this parsed form, not raw bytes."""
    try:
        header = json.loads(head)
        meta = header.pop("__metadata__", None) or {}
        specs = tuple(
            sorted(
                (
                    k,
                    str(v["dtype"]),
                    int(v["data_offsets"][0]),
                    int(v["data_offsets"][1]),
                    tuple(int(x) for x in v["shape"]),
                )
                for k, v in header.items()
            )
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CorruptFileError(f"malformed safetensors header ({e})", file=where) from e
    # the config embedded by LoraRecord wins; the adapter_config column is the fallback
    return specs, meta.get("lora_zoo.config") or cfg_text or "{}"


def decode_weight_batch(
    weights: Any,
    configs: Sequence[str | None] | None = None,
    *,
    fold_scale: bool = True,
    where: str = "zoo",
    ids: Sequence[str] | None = None,
    validate: bool = True,
    select: Callable[[list[str]], list[str]] | None = None,
) -> list[tuple[np.ndarray, Factors]]:
    """Decode a pyarrow (large_)binary array of PEFT safetensors rows into factor stacks.

    Returns groups ``(row_positions, {module: (U (g, n, r), V (g, m, r))})``: rows with the same
    tensor layout and config share a group and every factor of the group is one strided copy
    out of Arrow's buffer. Factors keep the stored dtype; with ``fold_scale`` they are multiplied
    by sqrt(scale) exactly like ``LoraModule.factors``. ``validate`` rejects inf/nan (on the raw
    exponent bits). ``select`` maps the module names to the ones to decode (others are skipped).
    Checked against ``safetensors.torch.load`` per row in tests.
    """
    import pyarrow as pa

    arr = weights.combine_chunks() if isinstance(weights, pa.ChunkedArray) else weights
    if arr.null_count:
        raise CorruptFileError("weights column holds null rows", file=where, key="weights")
    off_t = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, obuf, dbuf = arr.buffers()
    offs = np.frombuffer(obuf, dtype=off_t)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(dbuf, dtype=np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
    label = (lambda i: f"{where}:{ids[i]}") if ids is not None else (lambda i: where)
    parsed: dict[tuple[bytes, str | None], tuple[tuple[_Spec, ...], str]] = {}
    groups: dict[tuple[int, tuple[_Spec, ...], str], list[int]] = {}
    for i in range(len(arr)):
        start, end = int(offs[i]), int(offs[i + 1])
        if end - start < 8:
            raise CorruptFileError("weights are shorter than a safetensors header", file=label(i))
        n = int(data[start : start + 8].view("<u8")[0])
        if n <= 1 or start + 8 + n > end:
            raise CorruptFileError(
                f"safetensors header length {n} exceeds the weights", file=label(i)
            )
        cfg = None if configs is None else configs[i]
        key = (data[start + 8 : start + 8 + n].tobytes(), cfg)
        if key not in parsed:
            parsed[key] = _parse_header(key[0], cfg, label(i))
        groups.setdefault((n, *parsed[key]), []).append(i)
    return [
        (
            np.asarray(rows),
            _decode_group(
                data,
                offs,
                rows,
                n,
                specs,
                cfg,
                fold_scale,
                validate,
                [label(i) for i in rows],
                select,
            ),
        )
        for (n, specs, cfg), rows in groups.items()
    ]


def _decode_group(
    data: np.ndarray,
    offs: np.ndarray,
    rows: list[int],
    head_len: int,
    specs: tuple[_Spec, ...],
    cfg_text: str,
    fold_scale: bool,
    validate: bool,
    where: list[str],
    select: Callable[[list[str]], list[str]] | None,
) -> Factors:
    g, base = len(rows), 8 + head_len
    for key, dt, s, e, shape in specs:
        if dt not in _ST_DTYPES:
            raise CorruptFileError(f"unsupported tensor dtype {dt}", file=where[0], key=key)
        if not 0 <= s <= e or e - s != int(np.prod(shape)) * np.dtype(_ST_DTYPES[dt][0]).itemsize:
            raise CorruptFileError("tensor data offsets out of range", file=where[0], key=key)
    # Like safetensors: the buffer must end exactly where the last tensor does.
    length = base + max((sp[3] for sp in specs), default=0)
    starts, ends = offs[rows], offs[np.asarray(rows) + 1]  # (g,), (g,)
    bad = np.flatnonzero(ends - starts != length)
    if bad.size:
        raise CorruptFileError(
            f"weights length does not match its safetensors header ({length} bytes)",
            file=where[int(bad[0])],
        )
    if g == 1 or np.all(np.diff(starts) == length):
        mat = data[starts[0] : starts[0] + g * length].reshape(g, length)  # zero-copy (g, L)
    else:
        mat = np.stack([data[s : s + length] for s in starts])  # (g, L)
    try:
        config = json.loads(cfg_text)
    except ValueError as e:
        raise CorruptFileError(
            f"adapter config is not JSON ({e})", file=where[0], key="adapter_config"
        ) from e
    pairs: dict[str, dict[str, _Spec]] = {}
    for spec in specs:
        m = _KEY_RE.match(spec[0])
        if m is None:
            raise CorruptFileError("tensor is not a PEFT LoRA factor", file=where[0], key=spec[0])
        pairs.setdefault(m.group(1), {})[m.group(2)] = spec
    names = sorted(pairs, key=_natural_key)
    raw = _group_tensor(mat)  # (g, L) uint8, shares mat's memory
    out: Factors = {}
    for name in names if select is None else select(names):
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise MissingPairError(f"lora_{'AB'['A' in ab]} missing", file=where[0], key=name)
        scale = peft_rank_alpha_scale(config, name)[2] if fold_scale else 1.0
        root, sign = abs(scale) ** 0.5, (-1.0 if scale < 0 else 1.0)
        a = _read_tensor(mat, raw, base, ab["A"], root, validate, where)  # (g, r, in[, kh, kw])
        b = _read_tensor(mat, raw, base, ab["B"], sign * root, validate, where)  # (g, out, r[,1,1])
        r = a.shape[1]
        if a.dim() < 3 or b.dim() != a.dim() or b.shape[2] != r:
            raise ShapeMismatchError(
                f"A {tuple(a.shape[1:])} vs B {tuple(b.shape[1:])}", file=where[0], key=name
            )
        out[name] = (b.reshape(g, b.shape[1], r), a.reshape(g, r, -1).transpose(1, 2))
    return out


def _group_tensor(mat: np.ndarray) -> torch.Tensor:
    """The group's (g, L) bytes as a uint8 tensor without a copy. Arrow's buffer is read-only
    and torch warns about that; the decoder only ever reads from it (outputs are fresh)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(mat)


def _read_tensor(
    mat: np.ndarray,
    raw: torch.Tensor,
    base: int,
    spec: _Spec,
    mult: float,
    validate: bool,
    where: list[str],
) -> torch.Tensor:
    """One tensor for every row of the group: (g, *shape), a fresh contiguous tensor.

    One pass over the bytes: ``torch.mul(strided view of the buffer, mult, out=fresh)`` (or
    ``copy_`` when there is no scale), the same kernel and scalar rounding as
    ``LoraModule.factors``. The earlier numpy ``copy`` + in-place ``mul_`` + exponent-bit scan
    touched the bytes three times and measured 2-3x slower. Validation is one ``aminmax`` on the
    result (NaN propagates, inf shows as an extreme); the row is located only on failure.
    """
    key, dt, s, e, shape = spec
    np_dt, t_dt = _ST_DTYPES[dt]
    size, g = np.dtype(np_dt).itemsize, mat.shape[0]
    if (mat.ctypes.data + base + s) % size == 0 and mat.strides[0] % size == 0:
        src = raw[:, base + s : base + e].view(t_dt)  # (g, numel) strided, no copy
    else:  # unaligned (never for safetensors' 8-byte-padded headers): align with one copy
        src = torch.from_numpy(np.ascontiguousarray(mat[:, base + s : base + e]).view(np_dt))
        src = src.view(t_dt) if t_dt == torch.bfloat16 else src
    out = torch.empty(src.shape, dtype=t_dt)  # (g, numel)
    if mult != 1.0:
        torch.mul(src, mult, out=out)
    else:
        out.copy_(src)
    if validate and out.numel():
        lo, hi = torch.aminmax(out)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            _raise_nonfinite(src, out, key, where)
    return out.reshape(g, *shape)


def _raise_nonfinite(src: torch.Tensor, out: torch.Tensor, key: str, where: list[str]) -> None:
    """Name the first bad row: stored inf/nan, or a finite value the folded scale overflowed."""
    stored = ~torch.isfinite(src).all(dim=1)  # (g,)
    if stored.any():
        raise NonFiniteError(
            "factor holds inf/nan", file=where[int(stored.int().argmax())], key=key
        )
    row = int((~torch.isfinite(out).all(dim=1)).int().argmax())
    raise NonFiniteError(
        f"factor overflows {out.dtype} once sqrt(scale) is folded in "
        "(pass dtype=torch.float32 or fold_scale=False)",
        file=where[row],
        key=key,
    )


def _natural_key(name: str) -> list[Any]:
    """Same module order as ``LoraRecord`` ('layers.10' after 'layers.9')."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
