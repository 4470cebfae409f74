"""Slow, obvious reference implementations the fast symmetry paths are checked against.

Everything here goes through the dense ΔW = U V^T (n x m) and a full dense SVD, in float64:
the textbook definition, with no QR tricks. Only for tests and the benchmark's baseline.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def ref_svals(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Top-r singular values of the dense ΔW, zero-padded to r, (r,)."""
    r = u.shape[-1]
    s = torch.linalg.svdvals(u.double() @ v.double().T)[:r]
    return torch.nn.functional.pad(s, (0, r - s.shape[0]))


def ref_canonical(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors from the dense SVD, ΔW = X S Y^T: U' = X_r sqrt(S_r), V' = Y_r sqrt(S_r),
    with the same documented sign rule v3 (column sum positive; where the sum is within
    16 * eps * ||column||_2 of zero, the largest-|.| entry positive) and the same zero threshold
    (sigma_max * max(max(n, m) * eps_f64, sqrt(r) * eps_stored))."""
    n, m, r = u.shape[0], v.shape[0], u.shape[-1]
    eps = max(torch.finfo(torch.float64).eps, torch.finfo(u.dtype).eps)
    eps_s = torch.finfo(u.dtype).eps
    x, s, yh = torch.linalg.svd(u.double() @ v.double().T, full_matrices=False)
    k = min(r, s.shape[0])
    x, s, y = x[:, :k], s[:k], yh[:k].T
    f64 = torch.finfo(torch.float64).eps
    rel = max(max(n, m) * f64, r**0.5 * eps_s if eps_s > f64 else 0.0)
    tol = rel * (s[0] if k else 0.0)
    root = torch.where(s > tol, s.clamp_min(0).sqrt(), torch.zeros_like(s))
    uc, vc = x * root, y * root
    for j in range(k):
        col = uc[:, j]
        total = float(col.sum())
        if abs(total) > 16 * eps * float(col.norm()):
            flip = total < 0
        else:
            i = int(col.abs().argmax())  # (a positive entry wins an exact +x/-x tie)
            flip = bool(col[i] < 0) and not bool((col == -col[i]).any())
        if flip:
            uc[:, j], vc[:, j] = -uc[:, j], -vc[:, j]
    pad = (0, r - k)
    return torch.nn.functional.pad(uc, pad), torch.nn.functional.pad(vc, pad)


def ref_procrustes(
    u: torch.Tensor, v: torch.Tensor, u_t: torch.Tensor, v_t: torch.Tensor
) -> torch.Tensor:
    """SciPy's orthogonal Procrustes on the stacked factors [U; V] -> [U_t; V_t]."""
    a = np.concatenate([u.double().numpy(), v.double().numpy()])
    b = np.concatenate([u_t.double().numpy(), v_t.double().numpy()])
    q, _ = scipy.linalg.orthogonal_procrustes(a, b)
    return torch.from_numpy(q)


def ref_factors_from_bytes(data: bytes, fold_scale: bool = True) -> dict[str, tuple]:
    """Decode zoo weight bytes with plain safetensors.torch.load and build (U, V) by hand:
    U = B.reshape(out, r), V = A.reshape(r, -1).T, times sqrt(scale) from the embedded config."""
    import json
    import math

    from safetensors.torch import load

    from lora_zoo.record import peft_rank_alpha_scale, safetensors_metadata

    state = load(data)
    config = json.loads(safetensors_metadata(data).get("lora_zoo.config", "{}"))
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model.") : -len(".lora_A.weight")]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        u, v = b.reshape(b.shape[0], r), a.reshape(r, -1).T
        if fold_scale:
            _, _, scale = peft_rank_alpha_scale(config, name)
            s = math.sqrt(abs(scale))
            u, v = u * (s if scale >= 0 else -s), v * s
        out[name] = (u, v)
    return out
