"""Batching LoRAs of a zoo: stack each module across LoRAs, zero-pad rank axes to the batch max
with a (b, r) mask, and turn label columns into tensors.

Why zero padding is safe: a zero rank column adds nothing to U V^T, and every built-in view maps
zero columns to zero columns (``symmetry.pad_rank``), so a padded batch means the same LoRAs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lora_zoo.errors import ShapeMismatchError
from lora_zoo.load.views import RANK_KEYS


# ---- labels ----------------------------------------------------------------------------------
def labels_to_batch(columns: dict[str, list[Any]]) -> dict[str, torch.Tensor | list[Any]]:
    """Numbers -> tensors (bool, int64, float32), equal-length numeric lists -> (b, L) tensors;
    anything else (strings, None, ragged lists, dicts) stays a Python list."""
    out: dict[str, torch.Tensor | list[Any]] = {}
    for col, vals in columns.items():
        out[col] = list(vals)
        flat = vals
        if vals and all(isinstance(v, (list, tuple)) for v in vals):
            if len({len(v) for v in vals}) != 1:
                continue
            flat = [x for v in vals for x in v]
        if not flat or not all(isinstance(x, (bool, int, float)) for x in flat):
            continue
        if all(isinstance(x, bool) for x in flat):
            dt = torch.bool
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            dt = torch.int64
        else:
            dt = torch.float32
        out[col] = torch.tensor(vals, dtype=dt)
    return out


def _arrow_labels(batch: Any, cols: Sequence[str]) -> dict[str, torch.Tensor | list[Any]]:
    """``labels_to_batch`` of record batch columns without the Python round trip for plain
    numeric columns (bool, signed / small unsigned ints, floats, no nulls): same dtypes and
    values (float64 -> float32 rounds to nearest either way). Anything else takes the general
    path."""
    import pyarrow as pa

    out: dict[str, torch.Tensor | list[Any]] = {}
    for c in cols:
        col = batch.column(c)
        t = col.type
        if len(col) and not col.null_count:
            if pa.types.is_boolean(t):
                out[c] = torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.bool_))
                continue
            if pa.types.is_floating(t):
                out[c] = torch.from_numpy(col.to_numpy().astype(np.float32))
                continue
            if pa.types.is_signed_integer(t) or t in (pa.uint8(), pa.uint16(), pa.uint32()):
                out[c] = torch.from_numpy(col.to_numpy().astype(np.int64))
                continue
        out.update(labels_to_batch({c: col.to_pylist()}))
    return out


# ---- collate ---------------------------------------------------------------------------------
Group = tuple[Sequence[int], dict[str, dict[str, Any]]]  # (batch rows, {module: {key: (g, ...)}})


def _merge(groups: list[Group], n: int, where: str = "batch") -> dict[str, dict[str, torch.Tensor]]:
    """Stacks of row groups -> one stack per module and key in batch-row order. Rank axes are
    zero-padded to the batch's max rank; ``mask`` (n, r) marks each LoRA's real columns."""
    if len(groups) == 1 and len(groups[0][0]) == n:
        return _merge_one(groups[0][1], n)
    pos = torch.as_tensor(np.concatenate([np.asarray(rows) for rows, _ in groups]))  # (n,)
    inv = None if torch.equal(pos, torch.arange(n)) else torch.argsort(pos)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name in groups[0][1]:
        if any(name not in vw for _, vw in groups):
            raise ShapeMismatchError("module in some LoRAs of the batch only", file=where, key=name)
        width = max(vw[name]["rank"] for _, vw in groups)
        out: dict[str, torch.Tensor] = {}
        for key in (k for k in groups[0][1][name] if k != "rank"):
            parts = [vw[name][key] for _, vw in groups]  # each (g, ...)
            if key in RANK_KEYS:
                parts = [
                    F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in parts
                ]
            if len({tuple(t.shape[1:]) for t in parts}) != 1:
                shapes = sorted({tuple(t.shape[1:]) for t in parts})
                raise ShapeMismatchError(f"'{key}' shapes differ: {shapes}", file=where, key=name)
            cat = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[key] = cat if inv is None else cat[inv]  # (n, ...)
        ranks = torch.cat([torch.full((len(rows),), vw[name]["rank"]) for rows, vw in groups])
        ranks = ranks if inv is None else ranks[inv]
        out["mask"] = torch.arange(width)[None, :] < ranks[:, None]  # (n, r)
        modules[name] = out
    return modules


def _merge_one(views: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, torch.Tensor]]:
    """``_merge`` of the usual batch: one group holding every row (in order; rows are sorted),
    one rank: nothing to reorder, pad or concatenate, only the masks to build."""
    masks: dict[int, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, res in views.items():
        rank = res["rank"]
        out = {k: t for k, t in res.items() if k != "rank"}
        width = rank  # _views reports the widest rank axis
        for k, t in out.items():  # a view's narrower rank outputs (e.g. S): zero-pad as _merge
            if k in RANK_KEYS and t.shape[-1] < width:
                out[k] = F.pad(t, (0, width - t.shape[-1]))
        if width not in masks:
            masks[width] = torch.ones(width, dtype=torch.bool).expand(n, width)
        out["mask"] = masks[width].contiguous()  # (n, r) all true, one tensor per module
        modules[name] = out
    return modules


def collate_loras(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack each module across LoRAs; pad rank axes to the batch max, with a (b, r) mask."""
    if not items:
        raise ValueError("collate_loras got an empty batch")
    groups: list[Group] = [
        (
            [j],
            {
                n: {k: (t if k == "rank" else t[None]) for k, t in m.items()}
                for n, m in it["modules"].items()
            },
        )
        for j, it in enumerate(items)
    ]
    cols = list(items[0].get("labels", {}))
    return {
        "lora_id": [it["lora_id"] for it in items],
        "index": torch.tensor([int(it["index"]) for it in items]),
        "modules": _merge(groups, len(items), where=str(items[0]["lora_id"])),
        "labels": labels_to_batch({c: [it["labels"][c] for it in items] for c in cols}),
    }


__all__ = ["collate_loras", "labels_to_batch"]
