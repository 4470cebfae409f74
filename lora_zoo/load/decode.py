"""Batched safetensors decoding straight from Arrow's binary buffer.

A zoo's weight column holds one safetensors file per row. Rows whose headers are identical (the
normal case: same modules, ranks and dtype) share tensor offsets, so each factor of a whole record
batch is one strided view over the buffer instead of one safetensors parse per LoRA. Folding
sqrt(scale) is the copy: one out-of-place multiply per run of adjacent rows, from Arrow's buffer
into one fresh (rows, tensor elements) block taken from Arrow's memory pool (recycled pages: no
page faults per batch), and the factors are views of that block. Without a fold, a batch the
caller owns (``consume=True``) is not copied at all. Kept apart from the datasets
(``datasets.py``) because tests, benchmarks and tools use it without any torch ``Dataset``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lora_zoo._io import natural_key
from lora_zoo.errors import (
    CorruptFileError,
    MissingPairError,
    NonFiniteError,
    ShapeMismatchError,
    reading,
)
from lora_zoo.load.threads import single_threaded
from lora_zoo.record import DORA_KEY_RE, PEFT_KEY_RE, cell_config, peft_rank_alpha_scale
from lora_zoo.weights import MAX_HEADER_BYTES, parse_header

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bf16: move the bits, reinterpret in torch
}

# name -> (U (.., n, r), V (.., m, r)), plus M (.., out) for a DoRA module: its magnitude
Factors = dict[str, tuple[torch.Tensor, ...]]

# ---- batched safetensors decoding ------------------------------------------------------------
_Spec = tuple[str, str, int, int, tuple[int, ...]]  # key, dtype, start, end, shape
# bit masks of the exponent field: all ones means inf / nan (checked on the raw bits: fast)
_EXP_BITS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}


class _Layout:
    """One parsed header + config, interned: equal (header length, specs, config) give the same
    object, so a batch groups rows by identity (no re-hashing of long spec tuples) and the
    checks and plans that depend only on the layout run once per process, not once per batch.
    """

    __slots__ = ("cfg_text", "n", "plan", "specs", "views")

    def __init__(self, n: int, specs: tuple[_Spec, ...], cfg_text: str) -> None:
        self.n, self.specs, self.cfg_text = n, specs, cfg_text
        self.plan: tuple[int, dict[str, Any], dict[str, dict[str, _Spec]], list[str]] | None = None
        self.views: dict[tuple[bool, tuple[str, ...]], Any] = {}  # block plans (_in_place_plan)


# Header bytes -> layout. Bounded: a zoo has a handful of layouts, each written in a few
# metadata key orders; past the cap both maps are simply dropped (correct, just re-parsed).
_LAYOUTS: dict[tuple[bytes, str | None], _Layout] = {}
_INTERNED: dict[tuple[int, tuple[_Spec, ...], str], _Layout] = {}
_LAYOUT_CAP = 1024


def _layout(head: bytes, cfg: str | None, where: str) -> _Layout:
    """Parsed, interned layout of one header (cached per identical header bytes + config)."""
    hit = _LAYOUTS.get((head, cfg))
    if hit is not None:
        return hit
    specs, cfg_text = _parse_header(head, cfg, where)
    if len(_LAYOUTS) >= _LAYOUT_CAP or len(_INTERNED) >= _LAYOUT_CAP:
        _LAYOUTS.clear()
        _INTERNED.clear()
    lay = _INTERNED.setdefault((len(head), specs, cfg_text), _Layout(len(head), specs, cfg_text))
    _LAYOUTS[head, cfg] = lay
    return lay


def _parse_header(head: bytes, cfg_text: str | None, where: str) -> tuple[tuple[_Spec, ...], str]:
    """(tensor specs sorted by key, config JSON text): the header validated by the one decoder
    (``lora_zoo.weights``), the config by the one rule (``record.cell_config``: the row's
    adapter_config column, which an embedded config must equal). Metadata key order is not
    stable across safetensors writes (a Rust HashMap), so groups are keyed on this parsed form,
    not raw bytes. Each row's length is checked against the header by the caller."""
    h = parse_header(head, None, file=where)
    specs = tuple((t.name, t.dtype, t.start, t.end, t.shape) for t in h.tensors)
    config = cell_config(cfg_text, h.metadata, file=where)
    return specs, json.dumps(config, sort_keys=True)


class _Where(Sequence[str]):
    """Lazy "<where>:<lora_id>" labels of a group's rows: only built for an error message
    (formatting one per row per batch was a measurable share of a small LoRA's decode)."""

    def __init__(self, where: str, ids: Sequence[str] | None, rows: np.ndarray) -> None:
        self._where, self._ids, self._rows = where, ids, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if self._ids is None:
            return self._where
        return f"{self._where}:{self._ids[int(self._rows[j])]}"


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

    The fast path (every module decoded, one dtype, one non-negative scale, no gaps between
    tensors; anything else takes the per-tensor copy) copies each run of adjacent rows with one
    ``torch.mul`` by sqrt(scale) (the fold is the copy) into one block from Arrow's memory pool,
    and validates that block with two integer max reductions (see ``_check_finite``). A chunked
    ``weights`` (a batch spanning row groups) is decoded chunk by chunk into that one block.

    ``consume=True`` says the caller owns ``weights`` and drops it afterwards (the streaming
    dataset, with a record batch fresh from Parquet): without a fold the factors are then
    strided views into Arrow's buffer, not copies. Arrow's buffer is never written to.

    Parsed headers and the per-layout checks are cached per process (keyed on the header bytes
    and config), so a streaming epoch parses each distinct header once, not once per batch.
    """
    with reading(where, "weights"):  # anything unnamed below is still a named zoo error
        return _decode_weight_batch(
            weights, configs, fold_scale, where, ids, validate, select, consume
        )


def _decode_weight_batch(
    weights: Any,
    configs: Sequence[str | None] | None,
    fold_scale: bool,
    where: str,
    ids: Sequence[str] | None,
    validate: bool,
    select: Callable[[list[str]], list[str]] | None,
    consume: bool,
) -> list[tuple[np.ndarray, Factors]]:
    import pyarrow as pa

    label = (lambda i: f"{where}:{ids[i]}") if ids is not None else (lambda i: where)

    def parse(head: bytes, cfg: str | None, i: int) -> _Layout:
        return _layout(head, cfg, label(i))

    if isinstance(weights, pa.ChunkedArray):
        parts = [c for c in weights.chunks if len(c)]
        if len(parts) > 1:
            done = _decode_chunks(parts, configs, parse, fold_scale, validate, select, where, ids)
            if done is not None:
                return done
        arr = parts[0] if len(parts) == 1 else weights.combine_chunks()
    else:
        arr = weights
    if arr.null_count:
        raise CorruptFileError("weights column holds null rows", file=where, key="weights")
    data, offs, dbuf = _arrow_rows(arr)
    own = consume and dbuf is not None and dbuf.is_mutable
    fast = _group_same_length(data, offs, configs, parse)
    groups: dict[_Layout, Any] = dict(fast or {})
    for i in range(len(arr) if fast else 0, len(arr)):
        start, end = int(offs[i]), int(offs[i + 1])
        if end - start < 8:
            raise CorruptFileError("weights are shorter than a safetensors header", file=label(i))
        n = int(data[start : start + 8].view("<u8")[0])
        if n <= 1 or n > MAX_HEADER_BYTES or start + 8 + n > end:
            raise CorruptFileError(
                f"safetensors header length {n} exceeds the weights", file=label(i)
            )
        cfg = None if configs is None else configs[i]
        groups.setdefault(parse(data[start + 8 : start + 8 + n].tobytes(), cfg, i), []).append(i)
    with single_threaded():
        out = []
        for lay, rows in groups.items():
            rows = np.asarray(rows, dtype=np.int64)  # (g,)
            fac = _decode_group(
                data, offs, rows, lay, fold_scale, validate, _Where(where, ids, rows), select, own
            )
            out.append((rows, fac))
        return out


def _arrow_rows(arr: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """(data bytes (uint8, no copy), row offsets (rows + 1,) int64, data buffer) of a binary
    array."""
    import pyarrow as pa

    off_t = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    _, obuf, dbuf = arr.buffers()
    offs = np.frombuffer(obuf, dtype=off_t)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(dbuf, dtype=np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
    return data, offs, dbuf


def _decode_chunks(
    parts: list[Any],
    configs: Sequence[str | None] | None,
    parse: Callable[[bytes, str | None, int], _Layout],
    fold_scale: bool,
    validate: bool,
    select: Callable[[list[str]], list[str]] | None,
    where: str,
    ids: Sequence[str] | None,
) -> list[tuple[np.ndarray, Factors]] | None:
    """A batch spread over several Arrow chunks (it spans row groups), every row of one layout:
    each chunk copied (and folded) straight into one block, instead of concatenating the chunks
    first (one more copy of every byte). None where that does not apply: the caller
    concatenates and takes the general path (which also names any bad row)."""
    if configs is not None and list(configs).count(configs[0]) != len(configs):
        return None
    lay: _Layout | None = None
    mats: list[np.ndarray] = []
    pos = 0
    for part in parts:
        if part.null_count:
            return None
        data, offs, _ = _arrow_rows(part)
        g, p0 = len(part), pos
        cfgs = None if configs is None else configs[p0 : p0 + g]
        grouped = _group_same_length(data, offs, cfgs, lambda h, c, i, p0=p0: parse(h, c, p0 + i))
        if grouped is None or len(grouped) != 1:
            return None
        ((this, _),) = grouped.items()
        if lay is not None and this is not lay:
            return None
        lay, length = this, int(offs[1] - offs[0])
        mats.append(data[int(offs[0]) : int(offs[0]) + g * length].reshape(g, length))
        pos += g
    assert lay is not None
    rows = np.arange(pos, dtype=np.int64)
    where_rows = _Where(where, ids, rows)
    length, config, pairs, names = _plan(lay, where_rows)
    chosen = names if select is None else select(names)
    if any(m.shape[1] != length for m in mats) or len(chosen) != len(names):
        return None
    with single_threaded():
        fac = _decode_fast(
            mats,
            8 + lay.n,
            lay,
            pairs,
            chosen,
            config,
            fold_scale,
            validate,
            where_rows,
            views_ok=False,
        )
    return None if fac is None else [(rows, fac)]


def _group_same_length(
    data: np.ndarray,
    offs: np.ndarray,
    configs: Sequence[str | None] | None,
    parse: Callable[[bytes, str | None, int], _Layout],
) -> dict[_Layout, np.ndarray] | None:
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
    if not bool((ns == n).all()) or n <= 1 or n > MAX_HEADER_BYTES or 8 + n > length:
        return None  # the per-row loop names the bad row
    head, cfg = mat[:, 8 : 8 + n], None if configs is None else configs[0]
    found: list[tuple[_Layout, np.ndarray]] = []
    left, sub = np.arange(g), head
    for _ in range(8):
        r = int(left[0])
        same = (sub == head[r]).all(axis=1)  # (len(left),)
        found.append((parse(head[r].tobytes(), cfg, r), left[same]))
        left = left[~same]
        if not left.size:
            break
        sub = head[left]
    else:
        return None
    groups: dict[_Layout, np.ndarray] = {}
    for lay, rows in found:  # byte-different headers of one layout: one group, rows in order
        groups[lay] = np.sort(np.concatenate([groups[lay], rows])) if lay in groups else rows
    return groups


def _plan(
    lay: _Layout, where: Sequence[str]
) -> tuple[int, dict[str, Any], dict[str, dict[str, _Spec]], list[str]]:
    """Checks and derived facts that depend on the layout only: (row length, config, {module:
    {"A"|"B": spec}}, module names in natural order). Computed once per layout; a failing check
    raises (naming this batch's first row) and caches nothing."""
    if lay.plan is not None:
        return lay.plan
    specs = lay.specs  # structure already validated (lora_zoo.weights): spans tile the data
    for key, dt, _s, _e, _shape in specs:
        if dt not in _ST_DTYPES:
            raise CorruptFileError(f"unsupported tensor dtype {dt}", file=where[0], key=key)
    # Like safetensors: the buffer must end exactly where the last tensor does.
    length = 8 + lay.n + max((sp[3] for sp in specs), default=0)
    try:
        config = json.loads(lay.cfg_text)
    except ValueError as e:
        raise CorruptFileError(
            f"adapter config is not JSON ({e})", file=where[0], key="adapter_config"
        ) from e
    pairs: dict[str, dict[str, _Spec]] = {}
    for spec in specs:
        m = PEFT_KEY_RE.match(spec[0])
        d = DORA_KEY_RE.match(spec[0]) if m is None else None
        if d is not None:  # a DoRA magnitude: passed beside the factors, never folded
            pairs.setdefault(d.group(1), {})["M"] = spec
            continue
        if m is None:
            raise CorruptFileError("tensor is not a PEFT LoRA factor", file=where[0], key=spec[0])
        pairs.setdefault(m.group(1), {})[m.group(2)] = spec
    lay.plan = (length, config, pairs, sorted(pairs, key=natural_key))
    return lay.plan


def _decode_group(
    data: np.ndarray,
    offs: np.ndarray,
    rows: np.ndarray,
    lay: _Layout,
    fold_scale: bool,
    validate: bool,
    where: Sequence[str],
    select: Callable[[list[str]], list[str]] | None,
    own: bool = False,
) -> Factors:
    g, base = len(rows), 8 + lay.n
    length, config, pairs, names = _plan(lay, where)
    starts, ends = offs[rows], offs[rows + 1]  # (g,), (g,)
    bad = np.flatnonzero(ends - starts != length)
    if bad.size:
        raise CorruptFileError(
            f"weights length does not match its safetensors header ({length} bytes)",
            file=where[int(bad[0])],
        )
    # runs of rows adjacent in the buffer (all of them, normally): each one (k, L) view, no copy
    cut = [0, *(np.flatnonzero(np.diff(starts) != length) + 1).tolist(), g]
    mats = [
        data[starts[a] : starts[a] + (b - a) * length].reshape(b - a, length)
        for a, b in zip(cut, cut[1:])
    ]
    chosen = names if select is None else select(names)
    if len(chosen) == len(names):
        fast = _decode_fast(
            mats, base, lay, pairs, chosen, config, fold_scale, validate, where, views_ok=own
        )
        if fast is not None:
            return _with_magnitudes(fast, pairs, chosen, mats, base, validate, where)
    mat = mats[0] if len(mats) == 1 else np.concatenate(mats)  # (g, L)
    out: Factors = {}
    for name in chosen:
        ab = pairs[name]
        if not {"A", "B"} <= set(ab):
            what = "lora_A / lora_B" if "M" in ab and len(ab) == 1 else f"lora_{'AB'['A' in ab]}"
            raise MissingPairError(f"{what} missing", file=where[0], key=name)
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
    return _with_magnitudes(out, pairs, chosen, [mat], base, validate, where)


def _with_magnitudes(
    out: Factors,
    pairs: dict[str, dict[str, _Spec]],
    chosen: list[str],
    mats: list[np.ndarray],
    base: int,
    validate: bool,
    where: Sequence[str],
) -> Factors:
    """Append each DoRA module's magnitude (g, out), as stored (no scale fold: it is the
    invariant per-row feature beside the factors, docs/FORMAT.md)."""
    dora = [n for n in chosen if "M" in pairs[n]]
    if not dora:
        return out
    mat = mats[0] if len(mats) == 1 else np.concatenate(mats)  # (g, L)
    for name in dora:
        m = _read_tensor(mat, base, pairs[name]["M"], 1.0, validate, list(where))
        m = m.reshape(m.shape[0], -1)  # (g, out): (out,) and conv's (1, out, 1, 1) alike
        if m.shape[1] != out[name][0].shape[1]:
            raise ShapeMismatchError(
                f"DoRA magnitude has {m.shape[1]} entries but B has {out[name][0].shape[1]} "
                "output features",
                file=where[0],
                key=name,
            )
        out[name] = (*out[name][:2], m)
    return out


_InPlace = tuple[
    Any,
    int,
    int,
    float,
    list[tuple[str, int, int, tuple[int, ...], int, int, tuple[int, ...], bool]],
]


def _in_place_plan(
    lay: _Layout,
    pairs: dict[str, dict[str, _Spec]],
    names: list[str],
    config: dict[str, Any],
    fold_scale: bool,
    where: Sequence[str],
) -> _InPlace | None:
    """(torch dtype, item size, end of the tensor block, scale, per module: (name, A start/end
    in elements, A shape, B start/end, B shape, plain 2-D pair)), or None when the layout does
    not allow the block path (``_decode_fast``). Cached on the layout per (fold_scale, modules).
    """
    key = (fold_scale, tuple(names))
    if key in lay.views:
        return lay.views[key]
    specs = lay.specs
    plan: _InPlace | None = None
    dts = {sp[1] for sp in specs}
    end = max((sp[3] for sp in specs), default=0)
    ok = (
        specs
        and all({"A", "B"} <= set(ab) for ab in pairs.values())  # else the copy path names it
        and len(dts) == 1
        and sum(sp[3] - sp[2] for sp in specs) == end
    )
    scales = (
        {peft_rank_alpha_scale(config, n)[2] if fold_scale else 1.0 for n in names} if ok else ()
    )
    if len(scales) == 1 and next(iter(scales)) >= 0:
        _np_dt, t_dt = _ST_DTYPES[next(iter(dts))]
        size = np.dtype(_np_dt).itemsize
        items = []
        for name in names:
            (_, _, sa, ea, sha), (_, _, sb, eb, shb) = pairs[name]["A"], pairs[name]["B"]
            if len(sha) < 2 or len(shb) != len(sha) or shb[1] != sha[0]:
                raise ShapeMismatchError(f"A {sha} vs B {shb}", file=where[0], key=name)
            plain = len(sha) == 2
            items.append((name, sa // size, ea // size, sha, sb // size, eb // size, shb, plain))
        plan = (t_dt, size, end, next(iter(scales)), items)
    lay.views[key] = plan
    return plan


def _alloc(nbytes: int) -> torch.Tensor:
    """(nbytes,) uint8 of fresh memory from Arrow's pool. A batch block is tens of MB: torch's
    allocator hands that out as a new mmap every time (a page fault per 4 KiB on first write,
    about as slow as the copy itself), Arrow's pool recycles the pages of freed batches."""
    import pyarrow as pa

    return torch.frombuffer(pa.allocate_buffer(max(nbytes, 1)), dtype=torch.uint8)[:nbytes]


def _as_torch(mat: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array, also of a read-only one (only ever read)."""
    if mat.flags.writeable:
        return torch.from_numpy(mat)
    with warnings.catch_warnings():  # torch warns on numpy arrays it believes read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(mat)


_INTS = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32), 8: (torch.int64, np.uint64)}


def _check_finite(block: torch.Tensor, lay: _Layout, size: int, where: Sequence[str]) -> None:
    """Raise ``NonFiniteError`` (naming the row and tensor) if ``block`` (g, numel) holds inf or
    nan. On the raw bits, two integer max reductions (each several times faster than a float
    ``aminmax``, which also had to be split by rows on long strided rows): with E the exponent
    mask and S the sign bit, a positive inf/nan has bits in [E, S) (the signed max finds it) and
    a negative one in [S | E, 2^w) (the unsigned max finds it); finite values lie below both."""
    if not block.numel():
        return
    exp_mask = _EXP_BITS[lay.specs[0][1]][1]  # one dtype (the fast path's condition)
    signed_t, unsigned_np = _INTS[size]
    bits = block.view(signed_t).numpy()  # (g, numel), no copy
    sign_exp = (1 << (8 * size - 1)) | exp_mask
    if int(bits.max()) < exp_mask and int(bits.view(unsigned_np).max()) < sign_exp:
        return
    row = int((~torch.isfinite(block)).any(dim=1).int().argmax())  # only on failure
    for key, _dt, s, e, _shape in lay.specs:
        if not bool(torch.isfinite(block[row, s // size : e // size]).all()):
            raise NonFiniteError("factor holds inf/nan", file=where[row], key=key)


def _decode_fast(
    mats: list[np.ndarray],
    base: int,
    lay: _Layout,
    pairs: dict[str, dict[str, _Spec]],
    names: list[str],
    config: dict[str, Any],
    fold_scale: bool,
    validate: bool,
    where: Sequence[str],
    *,
    views_ok: bool,
) -> Factors | None:
    """All factors of the group as views into one (g, numel) block. ``mats``: the group's rows,
    as runs of adjacent rows (k, L) in order. The block is a fresh one (``_alloc``) filled by
    one ``torch.mul`` by sqrt(scale) per run (the same kernel and scalar rounding as
    ``LoraModule.factors``; a plain copy without a fold), or, with ``views_ok`` (the caller
    owns the buffer), no fold and one run, the rows themselves. None when the layout does not
    allow it (mixed dtypes or scales, negative scale, gaps, misalignment): the caller then
    copies per tensor."""
    plan = _in_place_plan(lay, pairs, names, config, fold_scale, where)
    if plan is None:
        return None
    t_dt, size, end, mult, items = plan
    if any((m.ctypes.data + base) % size or m.strides[0] % size for m in mats):
        return None
    root = math.sqrt(mult)  # like LoraModule.factors
    srcs = [_as_torch(m)[:, base : base + end].view(t_dt) for m in mats]  # (k, numel) each
    g = sum(m.shape[0] for m in mats)
    if views_ok and root == 1.0 and len(srcs) == 1:
        block = srcs[0]  # (g, numel) strided rows of the caller's buffer
    else:
        block = _alloc(g * end).view(t_dt).view(g, end // size)  # (g, numel)
        j = 0
        for src in srcs:
            k = src.shape[0]
            if root == 1.0:
                block[j : j + k].copy_(src)
            else:
                torch.mul(src, root, out=block[j : j + k])  # the fold is the copy
            j += k
    if validate:
        _check_finite(block, lay, size, where)
    out: Factors = {}
    rs, off = block.stride(0), block.storage_offset()
    strided = torch.as_strided
    for name, a0, a1, sha, b0, b1, shb, plain in items:
        if plain:  # one call per factor instead of slice + view + reshape (+ transpose)
            (r, n_in), (n_out, _) = sha, shb
            out[name] = (
                strided(block, (g, n_out, r), (rs, r, 1), off + b0),  # (g, out, r)
                strided(block, (g, n_in, r), (rs, 1, n_in), off + a0),  # (g, in, r)
            )
            continue
        a = block[:, a0:a1].view(g, *sha)  # (g, r, in, kh, kw)
        b = block[:, b0:b1].view(g, *shb)  # (g, out, r, 1, 1)
        r = a.shape[1]
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
