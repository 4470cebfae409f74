"""``lora-zoo bench ZOO --target T --hold-out COLUMN``: transfer across the values of a column.

Why: a detector that is perfect within one training method can fail across methods (arXiv
2604.08844), and in-distribution accuracy cannot show it. Holding out whole values of a column
(a backdoor zoo's ``trigger_kind``: train on two kinds, test on the third) measures transfer
to a kind of LoRA the model never saw. One fold per value of the column: the fold's test rows
are every LoRA of the zoo (train and test splits together) with that value, its training rows
all the others; the validation slice is carved from the training rows as in ``bench`` (seeded
random). Everything else (models, views, seeds, metrics, the baseline) is ``lol.bench``'s, so a
fold's table reads like a bench table. Results go to ``bench/holdout-<COLUMN>.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_zoo.errors import SelectionError
from lora_zoo.lol import bench as B


def merge_rows(parts: Sequence[tuple[dict[str, Any], Sequence[int]]]) -> dict[str, Any]:
    """One collated batch made of rows ``idx`` of each batch in ``parts`` (same keys, same
    module union and ranks; ``module_info`` is taken from the first)."""
    first = parts[0][0]
    out: dict[str, Any] = {}
    for key, v in first.items():
        if key == "module_info":
            out[key] = v
        elif isinstance(v, dict):
            if any(set(p[key]) != set(v) for p, _ in parts):
                raise SelectionError("splits differ in their modules or labels", key=key)
            out[key] = merge_rows([(p[key], idx) for p, idx in parts])
        elif isinstance(v, torch.Tensor):
            if any(p[key].shape[1:] != v.shape[1:] for p, _ in parts):
                raise SelectionError("splits differ in shape (ranks?); cannot merge", key=key)
            out[key] = torch.cat(
                [p[key][torch.as_tensor(list(idx), dtype=torch.long)] for p, idx in parts]
            )
        elif isinstance(v, list):
            out[key] = [p[key][i] for p, idx in parts for i in idx]
        else:
            out[key] = v
    return out


@dataclass
class HoldOutBench(B._Bench):
    """A ``_Bench`` whose train / test rows are the zoo's LoRAs with ``column != value`` /
    ``column == value`` (both splits pooled)."""

    column: str = ""
    value: Any = None
    values: dict[str, list[Any]] = field(default_factory=dict)  # split -> value per row
    full: dict[str, dict[str, Any]] = field(default_factory=dict)  # view -> split -> batch

    def data(self, view: str) -> dict[str, dict[str, Any]]:
        if view not in self.cache:
            if view not in self.full:
                self.full[view] = {
                    s: B.load_view(self.zoo[s], view, self.columns, self.dev)
                    for s in ("train", "test")
                }
            full = self.full[view]
            pick = {
                side: [
                    (
                        full[s],
                        [i for i, x in enumerate(self.values[s]) if (x == self.value) == side],
                    )
                    for s in ("train", "test")
                ]
                for side in (False, True)
            }
            self.cache[view] = {"train": merge_rows(pick[False]), "test": merge_rows(pick[True])}
        return self.cache[view]


def _column_values(zoo: Any, column: str) -> dict[str, list[Any]]:
    """The column's value per row of each split (in the split's row order)."""
    sp = zoo["train"]
    if column not in (*sp.label_columns, *sp.metadata_columns):
        raise SelectionError(
            f"--hold-out names no label/metadata column; labels: {sp.label_columns}",
            file=str(getattr(zoo, "source", "")),
            key=column,
        )
    return {s: zoo[s].table(columns=[column]).column(column).to_pylist() for s in ("train", "test")}


def run_hold_out(
    zoo_or_path: Any,
    target: str | Sequence[str],
    column: str,
    *,
    models: Sequence[str] | None = None,
    views: Sequence[str] | None = None,
    repeats: int = 3,
    device: str = "cpu",
    train: B.TrainConfig | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    write: bool = True,
    progress: bool = True,
    split_seed: int = 0,
) -> dict[str, Any]:
    """One bench per value of ``column`` (that value held out); returns ``{"hold_out", "folds":
    [bench results + {"held_out": value}], "summary": {model/view: mean primary metric}}``."""
    cfg = train or B.TrainConfig()
    b0 = B._open_bench(zoo_or_path, target, device, cfg, progress=progress, split_seed=split_seed)
    if column in b0.columns:
        raise SelectionError("the held-out column cannot be a target", key=column)
    values = _column_values(b0.zoo, column)
    kinds = sorted({v for vs in values.values() for v in vs if v is not None}, key=str)
    if len(kinds) < 2:
        raise SelectionError(f"--hold-out needs >= 2 values of {column!r}; has {kinds}", key=column)
    runs = B.plan_runs(models, views, False)
    t0 = time.perf_counter()
    folds, full = [], {}
    for v in kinds:
        t_fold = time.perf_counter()
        b = HoldOutBench(**{**b0.__dict__, "cache": {}}, column=column, value=v, values=values)
        b.full = full  # the splits are loaded once per view for all folds
        B._prepare_task(b, runs)
        out = [
            B._run_one(b, m, vw, aug, repeats, dict((hparams or {}).get(m, {})))
            for m, vw, aug in runs
        ]
        res = B._results(b, target, repeats, out, t_fold)
        res["held_out"] = {"column": column, "value": v}
        folds.append(res)
    result = {
        "format": B.FORMAT,
        "zoo": b0.where,
        "hold_out": column,
        "values": kinds,
        "target": folds[0]["target"],
        "primary_metric": folds[0]["primary_metric"],
        "time_s": round(time.perf_counter() - t0, 1),
        "folds": folds,
        "summary": summary(folds),
    }
    if write and getattr(b0.zoo, "is_local", False):
        dest = Path(b0.zoo.root) / "bench" / f"holdout-{column}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        B._write_results(result, b0.zoo, False, dest)
        result["written"] = str(dest)
    return result


def summary(folds: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """(model/view) -> mean and min over folds of the fold's mean primary metric."""
    prim = folds[0]["primary_metric"]
    by: dict[str, list[float]] = {}
    for f in folds:
        for r in f["runs"]:
            # the matched-noise control (same model, permuted labels) is its own row
            key = f"{r['model']}/{r['view']}" + (" (permuted labels)" if r.get("control") else "")
            by.setdefault(key, []).append(r["summary"][prim]["mean"])
    return {
        k: {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v))}
        if not all(math.isnan(x) for x in v)
        else {"mean": math.nan, "min": math.nan}
        for k, v in by.items()
    }


def format_hold_out(res: dict[str, Any]) -> str:
    """Each fold's bench table, then the mean (and worst) primary metric over the folds."""
    parts = []
    for f in res["folds"]:
        h = f["held_out"]
        parts.append(f"held out {h['column']} = {h['value']}\n{B.format_table(f)}")
    prim = res["primary_metric"]
    lines = [f"{'model/view':<34}{'mean ' + prim:>14}{'worst fold':>12}"]
    lines += [f"{k:<34}{v['mean']:>14.3f}{v['min']:>12.3f}" for k, v in res["summary"].items()]
    parts.append(
        f"over {len(res['folds'])} held-out values of {res['hold_out']}:\n" + "\n".join(lines)
    )
    return "\n\n".join(parts)
