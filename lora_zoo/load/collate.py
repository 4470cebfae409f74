"""Batching LoRAs of a zoo: stack each module across LoRAs, zero-pad rank axes to the batch max
with a (b, r) mask, cover the union of the batch's modules with a (b,) ``present`` mask, and
turn label columns into tensors (NaN + a mask where values are missing).

Why zero padding is safe: a zero rank column adds nothing to U V^T, and every built-in view maps
zero columns to zero columns (``symmetry.pad_rank``), so a padded batch means the same LoRAs.
The same argument covers a module a LoRA does not adapt: its ΔW is 0, i.e. U = 0, V = 0 (rank 0
padded), which is fixed by every R in GL(r), so the zero entry is exact under the symmetry and
``present`` only tells a model that the zeros mean "absent" rather than "trained to zero".

Real collections (PEFT adapters from several sources) adapt different modules; a batch covers
the union in one stable order (``_io.natural_key``: ``layers.10`` after ``layers.9``), so a model
sees module k in the same slot in every batch. ``module_info`` carries what metanetworks need
beside the factors: layer index, module type, in/out features.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lora_zoo._io import natural_key
from lora_zoo.errors import ShapeMismatchError
from lora_zoo.load.views import RANK_KEYS

META_KEYS = frozenset({"rank", "features"})  # per-module entries of a view result, not tensors
_INT = re.compile(r"^\d+$")


# ---- module metadata -------------------------------------------------------------------------
def module_info(name: str, out_features: int, in_features: int) -> dict[str, Any]:
    """What a metanetwork needs to know about a module besides its factors.

    ``layer``: the first integer path component (``model.layers.3.mlp.up_proj`` -> 3,
    ``down_blocks.1.attentions.0...`` -> 1), -1 when there is none; ``index_path``: all of
    them; ``type``: the last path component (``q_proj``, ``to_v``); ``out_features`` /
    ``in_features``: n and m of ΔW (n, m) (m = in * kh * kw for a conv).
    """
    parts = name.split(".")
    ints = [int(p) for p in parts if _INT.match(p)]
    return {
        "layer": ints[0] if ints else -1,
        "index_path": tuple(ints),
        "type": parts[-1],
        "out_features": int(out_features),
        "in_features": int(in_features),
    }


# ---- labels ----------------------------------------------------------------------------------
def _is_num(x: Any) -> bool:
    return isinstance(x, (bool, int, float)) or x is None


def labels_to_batch(columns: dict[str, list[Any]]) -> dict[str, torch.Tensor | list[Any]]:
    """Label columns -> tensors: bool, int64, float32; lists -> (b, L), padded with NaN to the
    longest when ragged. Missing values (None, a null list, a short list) make the column
    float32 with NaN there (see ``label_masks`` for the matching masks). Only non-numeric
    columns (strings, dicts) stay Python lists: there is no tensor for them."""
    return {c: _label(vals)[0] for c, vals in columns.items()}


def label_masks(columns: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    """{column: bool tensor, the shape of its label tensor: True where a value is present}."""
    out = {}
    for c, vals in columns.items():
        mask = _label(vals)[1]
        if mask is not None:
            out[c] = mask
    return out


def _label(vals: Sequence[Any]) -> tuple[torch.Tensor | list[Any], torch.Tensor | None]:
    vals = list(vals)
    if not vals:
        return vals, None
    listy = [v for v in vals if v is not None]
    if listy and all(isinstance(v, (list, tuple)) for v in listy):
        flat = [x for v in listy for x in v]
        if not all(_is_num(x) for x in flat):
            return vals, None
        width = max(len(v) for v in listy)
        rows = [
            list(v) + [None] * (width - len(v)) if v is not None else [None] * width for v in vals
        ]
        return _numeric(rows, flat)
    if not all(_is_num(x) for x in vals):
        return vals, None
    return _numeric(vals, vals)


def _numeric(rows: list[Any], flat: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of numbers / None (or equal-length lists of them) -> (tensor, present mask)."""
    present = [[x is not None for x in r] if isinstance(r, list) else r is not None for r in rows]
    mask = torch.tensor(present, dtype=torch.bool)
    known = [x for x in flat if x is not None]
    if bool(mask.all()) and known and all(isinstance(x, bool) for x in known):
        return torch.tensor(rows, dtype=torch.bool), mask
    if bool(mask.all()) and known and all(type(x) is int for x in known):
        return torch.tensor(rows, dtype=torch.int64), mask

    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    fl = [[num(x) for x in r] if isinstance(r, list) else num(r) for r in rows]
    return torch.tensor(fl, dtype=torch.float32), mask


def _arrow_labels(
    batch: Any, cols: Sequence[str]
) -> tuple[dict[str, torch.Tensor | list[Any]], dict[str, torch.Tensor]]:
    """``labels_to_batch`` / ``label_masks`` of record batch columns without the Python round
    trip for plain numeric columns (bool, signed / small unsigned ints, floats, no nulls): same
    dtypes and values (float64 -> float32 rounds to nearest either way). Anything else takes the
    general path."""
    import pyarrow as pa

    out: dict[str, torch.Tensor | list[Any]] = {}
    masks: dict[str, torch.Tensor] = {}
    for c in cols:
        col = batch.column(c)
        t = col.type
        if len(col) and not col.null_count:
            fast = None
            if pa.types.is_boolean(t):
                fast = torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.bool_))
            elif pa.types.is_floating(t):
                fast = torch.from_numpy(col.to_numpy().astype(np.float32))
            elif pa.types.is_signed_integer(t) or t in (pa.uint8(), pa.uint16(), pa.uint32()):
                fast = torch.from_numpy(col.to_numpy().astype(np.int64))
            if fast is not None:
                out[c], masks[c] = fast, torch.ones(fast.shape, dtype=torch.bool)
                continue
        vals = col.to_pylist()
        lab, mask = _label(vals)
        out[c] = lab
        if mask is not None:
            masks[c] = mask
    return out, masks


# ---- collate ---------------------------------------------------------------------------------
Group = tuple[Sequence[int], dict[str, dict[str, Any]]]  # (batch rows, {module: {key: (g, ...)}})


def _merge(
    groups: list[Group], n: int, where: str = "batch"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Stacks of row groups -> (one stack per module and key in batch-row order, module_info).

    Modules: the union over the groups, in ``natural_key`` order. Rank axes are zero-padded to
    the batch's max rank; ``mask`` (n, r) marks each LoRA's real columns, ``present`` (n,) the
    LoRAs that adapt the module (the others get zeros of the module's shape and an all-False
    mask)."""
    names = sorted({name for _, vw in groups for name in vw}, key=natural_key)
    info: dict[str, dict[str, Any]] = {}
    if len(groups) == 1 and len(groups[0][0]) == n and list(groups[0][0]) == list(range(n)):
        return _merge_one(groups[0][1], n, names, info)
    pos = torch.as_tensor(np.concatenate([np.asarray(rows) for rows, _ in groups]))  # (n,)
    inv = None if torch.equal(pos, torch.arange(n)) else torch.argsort(pos)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        having = [vw[name] for _, vw in groups if name in vw]
        ref = having[0]
        width = max(res["rank"] for res in having)
        _info(info, name, having, where)
        out: dict[str, torch.Tensor] = {}
        keys = list(dict.fromkeys(k for res in having for k in res if k not in META_KEYS))
        for key in keys:
            ref = next(res for res in having if key in res)
            parts = []
            for rows, vw in groups:
                if name in vw and key in vw[name]:
                    t = vw[name][key]  # (g, ...)
                    if key in RANK_KEYS and t.shape[-1] < width:
                        t = F.pad(t, (0, width - t.shape[-1]))
                else:  # a module these LoRAs do not adapt (or not with DoRA, for "M"): zeros
                    shape = list(ref[key].shape[1:])
                    if key in RANK_KEYS:
                        shape[-1] = width
                    t = ref[key].new_zeros((len(rows), *shape))
                parts.append(t)
            if len({tuple(t.shape[1:]) for t in parts}) != 1:
                shapes = sorted({tuple(t.shape[1:]) for t in parts})
                raise ShapeMismatchError(f"'{key}' shapes differ: {shapes}", file=where, key=name)
            cat = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[key] = cat if inv is None else cat[inv]  # (n, ...)
        dev = out[next(iter(out))].device if out else None
        ranks = torch.cat(
            [torch.full((len(rows),), vw[name]["rank"] if name in vw else 0) for rows, vw in groups]
        )
        present = torch.cat(
            [torch.full((len(rows),), name in vw, dtype=torch.bool) for rows, vw in groups]
        )
        if inv is not None:
            ranks, present = ranks[inv], present[inv]
        out["mask"] = (torch.arange(width)[None, :] < ranks[:, None]).to(dev)  # (n, r)
        out["present"] = present.to(dev)  # (n,)
        modules[name] = out
    return modules, info


def _info(
    info: dict[str, dict[str, Any]], name: str, having: list[dict[str, Any]], where: str
) -> None:
    feats = {tuple(res["features"]) for res in having if "features" in res}
    if len(feats) > 1:
        raise ShapeMismatchError(f"module shapes differ: {sorted(feats)}", file=where, key=name)
    if feats:
        ((n_out, n_in),) = feats
        info[name] = module_info(name, n_out, n_in)


def _merge_one(
    views: dict[str, dict[str, Any]],
    n: int,
    names: list[str],
    info: dict[str, dict[str, Any]],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """``_merge`` of the usual batch: one group holding every row in order, one rank: nothing
    to reorder, pad or concatenate, only the masks to build."""
    masks: dict[tuple[int, Any], torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        res = views[name]
        rank = res["rank"]
        _info(info, name, [res], "batch")
        out = {k: t for k, t in res.items() if k not in META_KEYS}
        width = rank  # _views reports the widest rank axis
        for k, t in out.items():  # a view's narrower rank outputs (e.g. S): zero-pad as _merge
            if k in RANK_KEYS and t.shape[-1] < width:
                out[k] = F.pad(t, (0, width - t.shape[-1]))
        dev = next(iter(out.values())).device if out else torch.device("cpu")
        if (width, dev) not in masks:
            masks[(width, dev)] = torch.ones(width, dtype=torch.bool, device=dev).expand(n, width)
        out["mask"] = masks[(width, dev)].contiguous()  # (n, r) all true
        out["present"] = torch.ones(n, dtype=torch.bool, device=dev)  # (n,)
        modules[name] = out
    return modules, info


def collate_loras(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack each module across LoRAs; pad rank axes to the batch max, with a (b, r) mask; cover
    the union of the LoRAs' modules with a (b,) ``present`` mask; labels as tensors."""
    if not items:
        raise ValueError("collate_loras got an empty batch")
    groups: list[Group] = [
        (
            [j],
            {
                n: {k: (t if k in META_KEYS else t[None]) for k, t in m.items()}
                for n, m in it["modules"].items()
            },
        )
        for j, it in enumerate(items)
    ]
    cols = list(items[0].get("labels", {}))
    modules, info = _merge(groups, len(items), where=str(items[0]["lora_id"]))
    columns = {c: [it["labels"][c] for it in items] for c in cols}
    out = {
        "lora_id": [it["lora_id"] for it in items],
        "index": torch.tensor([int(it["index"]) for it in items]),
        "modules": modules,
        "module_info": info,
        "labels": labels_to_batch(columns),
        "label_mask": label_masks(columns),
    }
    if all("base_model" in it for it in items):
        out["base_model"] = [it["base_model"] for it in items]
    return out


def rebatch_tables(tables: Iterable[Any], size: int) -> Iterator[Any]:
    """Arrow tables regrouped into tables of exactly ``size`` rows (the last may be shorter), in
    order, by zero-copy slices: row groups and record batches come in whatever sizes the files
    hold, while a loader's batch size is the caller's."""
    import pyarrow as pa

    pending: list[Any] = []
    have = 0
    for t in tables:
        pending.append(t)
        have += t.num_rows
        while have >= size:
            cat = pa.concat_tables(pending)
            yield cat.slice(0, size)
            rest = cat.slice(size)
            pending, have = ([rest] if rest.num_rows else []), rest.num_rows
    if have:
        yield pa.concat_tables(pending)


__all__ = ["collate_loras", "labels_to_batch", "label_masks", "module_info", "rebatch_tables"]
