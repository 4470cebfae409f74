"""Slow, obvious reference for ``lora_zoo.load.spectra``: the dense ΔW, a full dense SVD in
float64, and each statistic written out with plain Python loops from its textbook definition."""

from __future__ import annotations

import math

import torch


def ref_stats(delta: torch.Tensor, energy: float = 0.9) -> dict[str, float]:
    """top_sv, stable_rank, effective_rank, energy_rank90 of a dense (n, m) matrix."""
    s = [float(x) for x in torch.linalg.svdvals(delta.double())]
    if not s or s[0] == 0.0:
        return {"top_sv": 0.0, "stable_rank": 0.0, "effective_rank": 0.0, "energy_rank90": 0.0}
    fro2 = sum(x * x for x in s)
    l1 = sum(s)
    h = -sum((x / l1) * math.log(x / l1) for x in s if x > 0)
    acc, k90 = 0.0, 0
    for x in s:
        acc += x * x
        k90 += 1
        if acc >= energy * fro2:
            break
    return {
        "top_sv": s[0],
        "stable_rank": fro2 / s[0] ** 2,
        "effective_rank": math.exp(h),
        "energy_rank90": float(k90),
    }


def ref_energy_margin(delta: torch.Tensor, energy: float = 0.9) -> float:
    """How far (relative to ||ΔW||_F^2) the nearest cumulative energy is from the threshold:
    below the rounding error, ``energy_rank90`` of two correct computations may differ by one."""
    s2 = torch.linalg.svdvals(delta.double()).square()
    total = float(s2.sum())
    if total == 0:
        return math.inf
    return float(((s2.cumsum(0) / total) - energy).abs().min())


def ref_intruders(w0: torch.Tensor, w1: torch.Tensor, k: int, eps: float) -> int:
    """Intruder dimensions by the paper's definition, one vector at a time: of the top ``k``
    left singular vectors y_j of ``w1``, those with max_i |cos(y_j, x_i)| < eps over every left
    singular vector x_i of ``w0``."""
    x = torch.linalg.svd(w0.double(), full_matrices=False).U
    y = torch.linalg.svd(w1.double(), full_matrices=False).U
    count = 0
    for j in range(min(k, y.shape[1])):
        best = max(abs(float(y[:, j] @ x[:, i])) for i in range(x.shape[1]))
        count += best < eps
    return count
