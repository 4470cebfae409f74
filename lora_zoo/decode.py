"""Batched safetensors decoding straight from Arrow's binary buffer.

A zoo's weight column holds one safetensors file per row. Rows whose headers are identical (the
normal case: same modules, ranks and dtype) share tensor offsets, so each factor of a whole record
batch is one strided numpy view over the buffer instead of one safetensors parse per LoRA. When
the caller owns the batch (``consume=True``, the streaming dataset) the scale is folded in place
in that buffer and the factors are views of it: one pass over the bytes, no fresh memory. Kept
apart from the datasets (``loaders.py``) because the reader, the benchmarks and ingest validation
use it without any torch ``Dataset``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
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
_WHOLE_BLOCK_REDUCE = 32768  # longer rows: aminmax row by row (see _decode_in_place)

# ---- batched safetensors decoding ------------------------------------------------------------
_Spec = tuple[str, str, int, int, tuple[int, ...]]  # key, dtype, start, end, shape
# bit masks of the exponent field: all ones means inf / nan (checked on the raw bits: fast)
_EXP_BITS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}


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
    consume: bool = False,
) -> list[tuple[np.ndarray, Factors]]:
    """Decode a pyarrow (large_)binary array of PEFT safetensors rows into factor stacks.

    Returns groups ``(row_positions, {module: (U (g, n, r), V (g, m, r))})``: rows with the same
    tensor layout and config share a group and every factor of the group is one strided copy
    out of Arrow's buffer. Factors keep the stored dtype; with ``fold_scale`` they are multiplied
    by sqrt(scale) exactly like ``LoraModule.factors``. ``validate`` rejects inf/nan (on the raw
    exponent bits). ``select`` maps the module names to the ones to decode (others are skipped).
    Checked against ``safetensors.torch.load`` per row in tests.

    ``consume=True`` says the caller owns ``weights`` and drops it afterwards (the streaming
    dataset, with a record batch fresh from Parquet): the scale is then folded in place inside
    Arrow's (mutable) buffer with one ``mul_`` over each row group and the factors are strided
    views into that buffer, not fresh copies. That skips a copy and the page faults of fresh
    memory (about 2x on the decode). The fast path needs every module decoded, one dtype, one
    non-negative scale and no gaps between tensors; anything else takes the per-tensor copy.
    """
    import pyarrow as pa

    arr = weights.combine_chunks() if isinstance(weights, pa.ChunkedArray) else weights
    if arr.null_count:
        raise CorruptFileError("weights column holds null rows", file=where, key="weights")
    off_t = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, obuf, dbuf = arr.buffers()
    own = consume and dbuf is not None and dbuf.is_mutable
    offs = np.frombuffer(obuf, dtype=off_t)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(dbuf, dtype=np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
    label = (lambda i: f"{where}:{ids[i]}") if ids is not None else (lambda i: where)
    parsed: dict[tuple[bytes, str | None], tuple[tuple[_Spec, ...], str]] = {}
    groups: dict[tuple[int, tuple[_Spec, ...], str], list[int]] = {}

    def parse(head: bytes, cfg: str | None, i: int) -> tuple[tuple[_Spec, ...], str]:
        if (head, cfg) not in parsed:
            parsed[head, cfg] = _parse_header(head, cfg, label(i))
        return parsed[head, cfg]

    fast = _group_same_length(data, offs, configs, parse)
    groups.update(fast or {})
    for i in range(len(arr) if fast else 0, len(arr)):
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
    with _serial():
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
                    own,
                ),
            )
            for (n, specs, cfg), rows in groups.items()
        ]


def _group_same_length(
    data: np.ndarray,
    offs: np.ndarray,
    configs: Sequence[str | None] | None,
    parse: Callable[[bytes, str | None, int], tuple[tuple[_Spec, ...], str]],
) -> dict[tuple[int, tuple[_Spec, ...], str], list[int]] | None:
    """Rows grouped by layout with a few numpy row comparisons instead of a Python loop over
    rows (~3 us a row: most of the decode time for small LoRAs). Handles the usual batch: equal
    lengths and header lengths, one config, a few distinct header byte strings (safetensors
    writes metadata in HashMap order, so equal layouts differ in bytes). None: use the loop."""
    g = len(offs) - 1
    if g < 2 or (configs is not None and list(configs).count(configs[0]) != g):
        return None
    lens = np.diff(offs)  # (g,)
    length, start = int(lens[0]), int(offs[0])
    if length < 8 or not bool((lens == length).all()):
        return None
    mat = data[start : start + g * length].reshape(g, length)  # (g, L) no copy
    ns = np.ascontiguousarray(mat[:, :8]).view("<u8")[:, 0]  # (g,) header lengths
    n = int(ns[0])
    if not bool((ns == n).all()) or n <= 1 or 8 + n > length:
        return None  # the per-row loop names the bad row
    head, cfg = mat[:, 8 : 8 + n], None if configs is None else configs[0]
    groups: dict[tuple[int, tuple[_Spec, ...], str], list[int]] = {}
    left = np.arange(g)
    for _ in range(8):
        r = int(left[0])
        same = (head[left] == head[r]).all(axis=1)  # (len(left),)
        groups.setdefault((n, *parse(head[r].tobytes(), cfg, r)), []).extend(left[same].tolist())
        left = left[~same]
        if not left.size:
            return {k: sorted(rows) for k, rows in groups.items()}
    return None


@contextlib.contextmanager
def _serial() -> Iterator[None]:
    """Run the decode's torch ops on the calling thread only. They are memory-bound, and an
    intra-op parallel kernel on cores shared with anything else (the training step, other
    processes) stalls on its OpenMP barrier: measured 2-10x slower on 2 busy cores, no faster on
    idle ones. DataLoader workers already run with one thread; this covers ``num_workers=0``.
    Toggling costs well under a microsecond."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
    own: bool = False,
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
        mat = np.stack([data[s : s + length] for s in starts])  # (g, L), fresh: ours to scale
        own = True
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
    chosen = names if select is None else select(names)
    if own and len(chosen) == len(names):
        fast = _decode_in_place(
            mat, base, specs, pairs, chosen, config, fold_scale, validate, where
        )
        if fast is not None:
            return fast
    out: Factors = {}
    for name in chosen:
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise MissingPairError(f"lora_{'AB'['A' in ab]} missing", file=where[0], key=name)
        scale = peft_rank_alpha_scale(config, name)[2] if fold_scale else 1.0
        root, sign = math.sqrt(abs(scale)), (-1.0 if scale < 0 else 1.0)
        a = _read_tensor(mat, base, ab["A"], root, validate, where)  # (g, r, in[, kh, kw])
        b = _read_tensor(mat, base, ab["B"], sign * root, validate, where)  # (g, out, r[, 1, 1])
        r = a.shape[1]
        if a.dim() < 3 or b.dim() != a.dim() or b.shape[2] != r:
            raise ShapeMismatchError(
                f"A {tuple(a.shape[1:])} vs B {tuple(b.shape[1:])}", file=where[0], key=name
            )
        out[name] = (b.reshape(g, b.shape[1], r), a.reshape(g, r, -1).transpose(1, 2))
    return out


def _decode_in_place(
    mat: np.ndarray,
    base: int,
    specs: tuple[_Spec, ...],
    pairs: dict[str, dict[str, _Spec]],
    names: list[str],
    config: dict[str, Any],
    fold_scale: bool,
    validate: bool,
    where: list[str],
) -> Factors | None:
    """All factors of the group as views into ``mat`` (which the caller owns), the scale folded
    in by one in-place ``mul_`` over the whole (g, tensor bytes) block: the same kernel and
    scalar rounding as ``LoraModule.factors``. None when the layout does not allow it (mixed
    dtypes or scales, negative scale, gaps, misalignment): the caller then copies per tensor."""
    if not specs or any(set(ab) != {"A", "B"} for ab in pairs.values()):
        return None  # missing pairs: the per-tensor path raises the named error
    dts = {sp[1] for sp in specs}
    end = max(sp[3] for sp in specs)
    if len(dts) != 1 or sum(sp[3] - sp[2] for sp in specs) != end:
        return None
    np_dt, t_dt = _ST_DTYPES[dts.pop()]
    size, g = np.dtype(np_dt).itemsize, mat.shape[0]
    if (mat.ctypes.data + base) % size or mat.strides[0] % size:
        return None
    scales = {peft_rank_alpha_scale(config, n)[2] if fold_scale else 1.0 for n in names}
    if len(scales) != 1 or (mult := next(iter(scales))) < 0:
        return None
    with warnings.catch_warnings():  # torch warns on numpy arrays it believes read-only
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(mat)  # (g, L) uint8, shares the buffer
    block = raw[:, base : base + end].view(t_dt)  # (g, numel of all tensors)
    if mult != 1.0:
        block.mul_(math.sqrt(mult))  # like LoraModule.factors
    if validate and block.numel():
        # NaN propagates through aminmax, inf is an extreme. On the strided (g, numel) block
        # torch's reduction is fast for short rows but ~10x slower than row by row for long
        # ones (measured: 2352 -> 21 us vs 178 us per row; 276k -> 17.8 ms vs 1.9 ms).
        if block.shape[1] <= _WHOLE_BLOCK_REDUCE:
            ext = torch.stack(torch.aminmax(block)).expand(g, 2).reshape(-1)  # (2g,)
        else:
            ext = torch.stack([x for j in range(g) for x in torch.aminmax(block[j])])  # (2g,)
        if not bool(torch.isfinite(ext).all()):
            rows = (~torch.isfinite(block)).any(dim=1)  # (g,): only on failure
            row = int(rows.int().argmax())
            for key, _dt, s, e, _shape in specs:
                if not bool(torch.isfinite(block[row, s // size : e // size]).all()):
                    raise NonFiniteError("factor holds inf/nan", file=where[row], key=key)
    out: Factors = {}
    for name in names:
        (_, _, sa, ea, sha), (_, _, sb, eb, shb) = pairs[name]["A"], pairs[name]["B"]
        a = block[:, sa // size : ea // size].view(g, *sha)  # (g, r, in[, kh, kw])
        b = block[:, sb // size : eb // size].view(g, *shb)  # (g, out, r[, 1, 1])
        r = a.shape[1]
        if a.dim() < 3 or b.dim() != a.dim() or b.shape[2] != r:
            raise ShapeMismatchError(
                f"A {tuple(a.shape[1:])} vs B {tuple(b.shape[1:])}", file=where[0], key=name
            )
        out[name] = (b.reshape(g, b.shape[1], r), a.reshape(g, r, -1).transpose(1, 2))
    return out


def _read_tensor(
    mat: np.ndarray, base: int, spec: _Spec, mult: float, validate: bool, where: list[str]
) -> torch.Tensor:
    """One tensor for every row of the group: (g, *shape), a fresh contiguous copy.

    Copy-then-scale-in-place measured faster than a fused strided ``torch.mul`` (bf16, 1 thread).
    """
    key, dt, s, e, shape = spec
    np_dt, t_dt = _ST_DTYPES[dt]
    block = mat[:, base + s : base + e].copy()  # (g, nbytes): fresh, aligned, writable
    if validate:
        bits_t, mask = _EXP_BITS[dt]
        bad = (block.view(bits_t) & bits_t(mask)).max(axis=1) == mask  # (g,) all-ones exponent
        if bad.any():
            raise NonFiniteError("factor holds inf/nan", file=where[int(np.argmax(bad))], key=key)
    t = torch.from_numpy(block.view(np_dt))  # (g, numel)
    t = t.view(t_dt) if t_dt == torch.bfloat16 else t
    if mult != 1.0:
        t.mul_(mult)
    return t.reshape(mat.shape[0], *shape)


def _natural_key(name: str) -> list[Any]:
    """Same module order as ``LoraRecord`` ('layers.10' after 'layers.9')."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
