"""Spectral statistics of every LoRA in a zoo, as typed columns (``lora-zoo analyze``).

Researchers compute these one adapter at a time (WeightWatcher, Gradience): the top singular
value, the stable rank, the effective rank (entropy of the spectrum) and the energy rank of
ΔW = scale * B A. Here they are columns of the collection, so ``lora-zoo bench`` can use them as
targets (or read them as metadata-like features) and the card can plot them.

Everything comes from the factors, never a dense SVD of ΔW: ``symmetry.svals_many`` takes one
thin QR of each factor and one r x r SVD (the same kernels as the ``svals`` view), in float64.
The statistics are functions of the singular values alone, so they are GL(r)-invariant and
identical for every factorisation of the same ΔW.

Definitions (s = the r singular values, descending; all statistics are 0 for ΔW = 0):

- ``top_sv``: s_1, the spectral norm of ΔW.
- ``stable_rank``: sum s_i^2 / s_1^2 = ||ΔW||_F^2 / ||ΔW||_2^2 (Rudelson & Vershynin).
- ``effective_rank``: exp(H(p)) with p_i = s_i / sum s_j (Roy & Vetterli 2007); H is the
  spectral entropy (natural log).
- ``energy_rank90``: the smallest k with sum_{i<=k} s_i^2 >= 0.9 sum s_i^2.

Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", NeurIPS 2025) need the base weights W0: a left singular vector y_j among the top
``k`` of W0 + ΔW is an intruder when max_i |cos(y_j, x_i)| < ``eps`` over all left singular
vectors x_i of W0. That needs dense SVDs of base-sized matrices (one of W0 per module, one of
W0 + ΔW per LoRA and module), so it runs only when base weights are given.

DoRA modules: the four statistics describe the low-rank direction update scale * B A (the part
the GL(r) symmetry acts on; the magnitude vector is a separate, invariant feature); intruder
dimensions use the layer's full DoRA weight (``LoraModule.merged_weight``), magnitude included.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora_zoo.errors import ShapeMismatchError, ZooFormatError
from lora_zoo.load import symmetry
from lora_zoo.load.source import load_zoo
from lora_zoo.progress import track
from lora_zoo.record import LoraRecord, load_safetensors_bytes
from lora_zoo.zoo.reader import Zoo, is_local
from lora_zoo.zoo.schema import CORE_COLUMNS
from lora_zoo.zoo.writer import ZooWriter

log = logging.getLogger(__name__)

PREFIX = "spectral."
STATS = ("top_sv", "stable_rank", "effective_rank", "energy_rank90")
ENERGY = 0.9
INTRUDER_K = 10
INTRUDER_EPS = 0.5

__all__ = [
    "PREFIX",
    "STATS",
    "stats_from_svals",
    "module_svals",
    "lora_columns",
    "intruder_dimensions",
    "read_base_weights",
    "analyze_zoo",
]


def stats_from_svals(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four statistics of singular values ``s (..., r)`` (descending), float64, shape (...).

    Zero spectra give zeros everywhere (no 0/0): a LoRA whose module never moved has rank 0."""
    s = s.to(torch.float64).clamp_min(0.0)
    if s.shape[-1] == 0:
        z = torch.zeros(s.shape[:-1], dtype=torch.float64)
        return {k: z for k in STATS}
    top = s[..., 0]
    live = top > 0
    tiny = torch.finfo(torch.float64).tiny
    energy = s.square()
    total = energy.sum(-1)
    stable = torch.where(live, total / top.square().clamp_min(tiny), torch.zeros_like(top))
    p = s / s.sum(-1, keepdim=True).clamp_min(tiny)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(tiny)), torch.zeros_like(p))
    eff = torch.where(live, torch.exp(-plogp.sum(-1)), torch.zeros_like(top))
    # cum[-1] == total, so at most r - 1 prefixes fall short and k <= r
    short = (energy.cumsum(-1) < ENERGY * total.unsqueeze(-1)).sum(-1)
    k90 = torch.where(live, short + 1, torch.zeros_like(short)).to(torch.float64)
    return {"top_sv": top, "stable_rank": stable, "effective_rank": eff, "energy_rank90": k90}


def module_svals(record: LoraRecord) -> dict[str, torch.Tensor]:
    """Singular values of every module's ΔW (scale folded in), float64, from the factors."""
    names = list(record.modules)
    pairs = [record.modules[n].factors(fold_scale=True, dtype=torch.float64) for n in names]
    return dict(zip(names, symmetry.svals_many(pairs)))


def _as_matrix(w: torch.Tensor, fifo: bool) -> torch.Tensor:
    """A weight in its layer's layout -> the (out, in*) matrix whose left vectors are outputs."""
    w = w.to(torch.float64)
    if fifo and w.dim() == 2:
        w = w.T
    return w.reshape(w.shape[0], -1)


def intruder_dimensions(
    base_left: torch.Tensor,
    w0: torch.Tensor,
    delta: torch.Tensor,
    *,
    k: int = INTRUDER_K,
    eps: float = INTRUDER_EPS,
) -> int:
    """How many of the top ``k`` left singular vectors of W0 + ΔW have no left singular vector
    of W0 (``base_left``, (out, p) orthonormal columns) with |cosine| >= ``eps``.

    All (out, in*) matrices. |cos| because singular vectors are defined up to sign."""
    y = torch.linalg.svd(w0 + delta, full_matrices=False).U[:, :k]
    best = (y.T @ base_left).abs().amax(dim=1)
    return int((best < eps).sum())


def _base_left(w0: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(w0, full_matrices=False).U


def _intruders(
    record: LoraRecord,
    base: Mapping[str, torch.Tensor],
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    k: int,
    eps: float,
) -> list[int]:
    out = []
    for name, m in record.modules.items():
        w0 = base.get(name)
        if w0 is None:
            raise ZooFormatError(
                "no base weight for this module (the base weights file holds "
                f"{len(base)} tensor(s) named '<module>.weight')",
                file=record.lora_id,
                key=name,
            )
        if name not in cache:
            mat = _as_matrix(w0, m.fan_in_fan_out)
            cache[name] = (mat, _base_left(mat))
        mat, left = cache[name]
        # the layer's full change: for DoRA that includes the magnitude's row rescaling
        full = m.merged_weight(w0) - w0.to(torch.float64) if m.is_dora else m.delta_w(torch.float64)
        delta = _as_matrix(full, m.fan_in_fan_out)
        if delta.shape != mat.shape:
            raise ShapeMismatchError(
                f"ΔW is {tuple(delta.shape)} but the base weight is {tuple(mat.shape)}",
                file=record.lora_id,
                key=name,
            )
        out.append(intruder_dimensions(left, mat, delta, k=k, eps=eps))
    return out


def lora_columns(
    record: LoraRecord,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    k: int = INTRUDER_K,
    eps: float = INTRUDER_EPS,
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """The spectral columns of one LoRA: per statistic a ``.per_module`` list (the record's
    module order, the weights cell's order), its ``.mean`` and ``.max``; with ``base``, also
    ``spectral.intruders.per_module`` and ``spectral.intruders.sum``."""
    per: dict[str, list[float]] = {s: [] for s in STATS}
    for sv in module_svals(record).values():
        for stat, val in stats_from_svals(sv).items():
            per[stat].append(float(val))
    cols: dict[str, Any] = {}
    for stat, vals in per.items():
        if stat == "energy_rank90":
            cols[f"{PREFIX}{stat}.per_module"] = [int(v) for v in vals]
        else:
            cols[f"{PREFIX}{stat}.per_module"] = vals
        cols[f"{PREFIX}{stat}.mean"] = sum(vals) / len(vals) if vals else 0.0
        cols[f"{PREFIX}{stat}.max"] = float(max(vals, default=0.0))
    if base is not None:
        counts = _intruders(record, base, {} if cache is None else cache, k=k, eps=eps)
        cols[f"{PREFIX}intruders.per_module"] = counts
        cols[f"{PREFIX}intruders.sum"] = sum(counts)
    return cols


def read_base_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Base weights from a safetensors file (a model's ``state_dict``): ``<module>.weight`` keys
    become ``{module: tensor}`` (a ``base_model.model.`` prefix is dropped). Checked by the one
    safetensors decoder before any tensor is read."""
    p = Path(path)
    state = load_safetensors_bytes(p.read_bytes(), file=str(p))
    out = {}
    for key, t in state.items():
        if key.endswith(".weight"):
            out[key.removeprefix("base_model.model.")[: -len(".weight")]] = t
    return out


def _summary(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for col, vals in values.items():
        v = [x for x in vals if x is not None and math.isfinite(x)]
        if not v:
            continue
        out[col] = {
            "mean": statistics.fmean(v),
            "std": statistics.pstdev(v),
            "min": min(v),
            "median": statistics.median(v),
            "max": max(v),
        }
    return out


def _copy_row(zoo: Zoo, split: str, i: int, label_cols: set[str]) -> tuple[dict, dict, dict]:
    """(core cells, metadata, labels) of one row, without old spectral columns; null cells are
    kept so a column that is null everywhere still survives the rewrite."""
    row = zoo[split].row(i)
    extra = {k: v for k, v in row.items() if k not in CORE_COLUMNS and not k.startswith(PREFIX)}
    meta = {k: v for k, v in extra.items() if k not in label_cols}
    labels = {k: v for k, v in extra.items() if k in label_cols}
    return row, meta, labels


def analyze_zoo(
    root: str | os.PathLike[str],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    k: int = INTRUDER_K,
    eps: float = INTRUDER_EPS,
    progress: bool = True,
) -> dict[str, Any]:
    """Add (or replace) the ``spectral.*`` label columns of every LoRA of a local zoo.

    The zoo is rewritten through ``ZooWriter(mode="overwrite")``: new shards, new hashes, the
    manifest last, so ``verify`` holds and a kill leaves the old zoo intact. Every existing
    column, split, named split and ``info`` entry is kept; ``info.spectral`` gets the zoo-level
    summary (per column: mean, std, min, median, max over LoRAs), which is also returned."""
    if not is_local(root):
        raise ZooFormatError("analyze rewrites a zoo in place: give a local folder", file=root)
    zoo = load_zoo(root)
    assert isinstance(zoo, Zoo)
    label_cols = set(zoo.columns_with_role("label"))
    pq = zoo.manifest.get("parquet") or {}
    limits = {k2: pq[k2] for k2 in ("shard_max_rows", "shard_max_bytes") if k2 in pq}
    limits.update({k2: pq[k2] for k2 in ("row_group_max_bytes", "row_group_max_rows") if k2 in pq})
    w = ZooWriter(root, mode="overwrite", **limits)
    values: dict[str, list[float]] = {}
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for split in zoo.splits:
            sp = zoo[split]
            for i in track(range(len(sp)), desc=f"analyze {split}", unit="lora", enabled=progress):
                row, meta, labels = _copy_row(zoo, split, i, label_cols)
                rec = sp.record(i)
                cols = lora_columns(rec, base, k=k, eps=eps, cache=cache)
                for c, v in cols.items():
                    if not c.endswith(".per_module"):
                        values.setdefault(c, []).append(float(v))
                w.add(
                    rec, lora_id=row["lora_id"], split=split, metadata=meta,
                    labels={**labels, **cols}, base_model=row.get("base_model") or "",
                    collection=row.get("collection") or "default",
                )  # fmt: skip
        summary = {
            "stats": list(STATS),
            "energy": ENERGY,
            "intruders": None if base is None else {"k": k, "eps": eps, "vectors": "left"},
            "columns": _summary(values),
        }
        w.set_info(**{**zoo.info, "spectral": summary})
        w.close()
    except BaseException:
        w.abort()
        raise
    log.info("analyze %s: %d spectral columns", root, len(summary["columns"]))
    return summary
