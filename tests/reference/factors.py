"""LoRA factors with known structure for the symmetry and view tests: well-separated
singular values (so singular vectors are well defined) and GL(r) elements of exact condition."""

from __future__ import annotations

import math

import torch

from lora_zoo.load import symmetry


def well_separated(n: int, m: int, r: int, seed: int, gap: float = 0.2):
    """Random U (n, r), V (m, r) whose ΔW has distinct singular values (relative gap >= gap)
    and a random (non-orthogonal) mixing of the rank dim, so factors are not already canonical."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m, r)
    x, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    y, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0 + gap * (k - j) * 2 for j in range(k)], dtype=torch.float64)
    u = torch.zeros(n, r, dtype=torch.float64)
    v = torch.zeros(m, r, dtype=torch.float64)
    u[:, :k], v[:, :k] = x * s.sqrt(), y * s.sqrt()
    if k == r:
        mix, mix_it = symmetry.random_gl(r, generator=g, log_cond=1.0)
        u, v = u @ mix, v @ mix_it
    return u, v


def exact_cond_gl(r: int, cond: float, seed: int):
    """R = Q1 diag(geomspace(1/sqrt(c), sqrt(c))) Q2 with cond(R) == c exactly (r >= 2), and
    R^-T in closed form."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    t = torch.linspace(-0.5, 0.5, r, dtype=torch.float64) * math.log(cond)
    return (q1 * t.exp()) @ q2, (q1 * (-t).exp()) @ q2
