"""Metrics of the LoL benchmark, on numpy arrays, with missing labels (NaN) left out per label.

Classification: accuracy per label and their mean, AUROC (the Mann-Whitney U statistic over
ranks, ties counted half; scipy's ``rankdata``); regression: R² (1 - SSE / SST against the test
mean), Kendall τ-b and Spearman ρ (scipy.stats). Why per label then the mean: a multi-label
target such as ``in_group.*`` is six separate questions of different difficulty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of binary ``y`` (0/1) for ``score``; NaN with one class only."""
    y = np.asarray(y, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = stats.rankdata(score)  # average ranks for ties
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / sst if sst > 0 else math.nan


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def classification_metrics(y: np.ndarray, prob: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Binary labels y (n, k) (NaN = missing), predicted probabilities prob (n, k)."""
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        ok = ~np.isnan(y[:, j])
        yj, pj = y[ok, j], prob[ok, j]
        per[name] = {
            "accuracy": float(((pj > 0.5) == (yj > 0.5)).mean()) if ok.any() else math.nan,
            "auroc": auroc(yj > 0.5, pj) if ok.any() else math.nan,
        }
    return {
        "accuracy": _mean([m["accuracy"] for m in per.values()]),
        "auroc": _mean([m["auroc"] for m in per.values()]),
        "per_label": per,
    }


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Class indices y (n,) (-1 = missing), probabilities prob (n, C): accuracy, macro
    one-vs-rest AUROC, per-class AUROC."""
    ok = y >= 0
    y, prob = y[ok], prob[ok]
    per = {c: {"auroc": auroc(y == i, prob[:, i])} for i, c in enumerate(classes)}
    return {
        "accuracy": float((prob.argmax(1) == y).mean()) if len(y) else math.nan,
        "auroc": _mean([m["auroc"] for m in per.values()]),
        "per_label": per,
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Targets y (n, k) (NaN = missing) and predictions (n, k), in the targets' units."""
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        ok = ~np.isnan(y[:, j])
        yj, pj = y[ok, j], pred[ok, j]
        const = len(yj) < 2 or np.ptp(yj) == 0 or np.ptp(pj) == 0
        per[name] = {
            "r2": r2(yj, pj) if len(yj) > 1 else math.nan,
            "kendall_tau": math.nan if const else float(stats.kendalltau(yj, pj).statistic),
            "spearman": math.nan if const else float(stats.spearmanr(yj, pj).statistic),
        }
    return {k: _mean([m[k] for m in per.values()]) for k in ("r2", "kendall_tau", "spearman")} | {
        "per_label": per
    }


def bootstrap_ci(
    score: Callable[[np.ndarray, np.ndarray], dict[str, Any]],
    y: np.ndarray,
    preds: Sequence[np.ndarray],
    seed: int,
    n_boot: int = 1000,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap over test LoRAs of each scalar metric's mean over seeds.

    Why over LoRAs and not only seeds: the quickstart test splits hold 24-40 LoRAs, so the
    seed std (training noise) says nothing about how much the score would move on another
    draw of test LoRAs, which is usually the larger error. Each resample draws test rows with
    replacement, scores every seed's predictions on those rows and averages over seeds (the
    statistic the table reports); a resample where a metric is undefined (one class only) is
    left out of that metric's interval."""
    rng = np.random.default_rng(seed)
    n = len(y)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        ms = [score(y[idx], np.asarray(p)[idx]) for p in preds]
        for k, v in ms[0].items():
            if isinstance(v, float):
                draws.setdefault(k, []).append(_mean([m[k] for m in ms]))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for k, xs in draws.items():
        a = np.array([x for x in xs if not math.isnan(x)])
        out[k] = (
            [float(np.percentile(a, lo)), float(np.percentile(a, hi))]
            if len(a)
            else [
                math.nan,
                math.nan,
            ]
        )
    return out


__all__ = [
    "auroc",
    "bootstrap_ci",
    "classification_metrics",
    "multiclass_metrics",
    "r2",
    "regression_metrics",
]
