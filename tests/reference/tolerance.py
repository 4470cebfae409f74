"""Tolerances derived from an error model, not fitted to one machine's BLAS.

Every numeric comparison in the tests is ``|got - want| <= tol`` with

    tol = c * eps(dtype) * n * cond * scale

- ``eps(dtype)``: machine epsilon of the dtype the computation runs in (2.2e-16 float64,
  1.2e-7 float32), i.e. twice the unit roundoff.
- ``n``: the problem size that enters the rounding-error bound: the inner dimension of a
  GEMM / dot product (a length-n sum has error <= n u sum|x_i y_i|, Higham Thm 3.5), or the
  long dimension max(n, m) of a Householder QR / SVD (backward error ||dA|| <= ~n eps ||A||,
  Higham Thm 19.4; the worst-case constant is n^{3/2} but in practice sqrt(n)..n, so ``n``
  alone, with a constant c, has margin on every BLAS/LAPACK: blocked, threaded, FMA or not).
- ``cond``: how much the problem amplifies a backward error into the forward error:
  - ΔW = U V^T and its singular values (Weyl: |ds| <= ||dΔW||) from thin QRs of U and V: a
    backward error eps*||U|| in U becomes eps*||U|| ||V|| in ΔW, so relative to ||ΔW|| the
    amplification is ``pair_cond(U, V) = ||U||_2 ||V||_2 / ||U V^T||_2`` (>= 1; about cond(R)
    for factors mixed by a badly conditioned R in GL(r), 1 for balanced canonical factors);
  - singular vectors (the ``canonical`` form, Procrustes) additionally scale by the inverse
    relative gap (Wedin's sin-theta theorem: ||dx_j|| <= ||E|| / gap_j, the gap measured to
    every other singular value, including the zero ones of the complement when n > r), which
    is ``gap_factor(s) = sigma_1 / min gap``;
- ``scale``: the magnitude the error is absolute in: sigma_1 for ΔW entries and singular
  values, sqrt(sigma_1) for balanced factors U' = X sqrt(S) (||U'_j|| = sqrt(s_j)).
- ``c``: a small constant (default 10) covering the constant factors the model drops (the two
  factorisations of U and V, the r x r SVD and the GEMMs after it, each adding one more
  eps*n*cond term, and two independent computations being compared, each with its own error).
  A comparison of two results that are each within the bound of the exact one needs 2x that.

The bounds are worst case, so observed errors are usually 10-1000x below them (random roundings
partly cancel, ~sqrt(n) instead of n); that is the margin that makes them machine-independent.
They are still far below anything a real bug produces (a wrong sign, column order, a dropped
transpose or scale: errors of order ``scale`` itself).
"""

from __future__ import annotations

import torch

__all__ = ["eps", "tol", "pair_cond", "gap_factor", "canonical_tol", "svals_tol"]


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the dtype a computation runs in (fp16/bf16 inputs compute in float32
    in ``lora_zoo.load.symmetry``: pass the compute dtype, not the storage dtype)."""
    return float(torch.finfo(dtype).eps)


def tol(
    dtype: torch.dtype, *, n: int, cond: float = 1.0, scale: float = 1.0, c: float = 10.0
) -> float:
    """``c * eps(dtype) * n * cond * scale``: see the module docstring for each factor."""
    return c * eps(dtype) * max(int(n), 1) * float(cond) * float(scale)


def _spectral_norm(x: torch.Tensor) -> torch.Tensor:
    """||X||_2 per matrix, (...,), in float64 (0 for empty matrices)."""
    x = x.to(torch.float64)
    if x.numel() == 0:
        return torch.zeros(x.shape[:-2], dtype=torch.float64)
    return torch.linalg.matrix_norm(x, ord=2)


def pair_cond(u: torch.Tensor, v: torch.Tensor) -> float:
    """``||U||_2 ||V||_2 / ||U V^T||_2``, the amplification of a factor backward error into ΔW
    (max over any batch dims; 1.0 for ΔW == 0, where there is nothing to amplify)."""
    num = _spectral_norm(u) * _spectral_norm(v)
    den = _spectral_norm(u.to(torch.float64) @ v.to(torch.float64).mT)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
    return max(float(ratio.max()) if ratio.numel() else 1.0, 1.0)


def gap_factor(s: torch.Tensor, *, n: int | None = None, cols: list[int] | None = None) -> float:
    """``sigma_1 / min gap`` for singular vectors, max over batch dims of ``s (..., k)``.

    The gap of column j is its distance to every other singular value, including the zeros of
    the complement (so it is at most s_j itself, and the factor at least sigma_1 / sigma_min).
    With ``cols``, those columns are one block (a repeated value): only the block's span is
    compared, and its gap is the distance from the block's values to the values outside it.
    Values below ``max(n, m) * eps * sigma_1`` (pass n) count as zero, like
    ``symmetry.canonical``'s threshold. Returns 1.0 when there are no nonzero values.
    """
    s = s.to(torch.float64).reshape(-1, s.shape[-1]) if s.numel() else s.reshape(1, 0)
    worst = 1.0
    for row in s:
        row = torch.sort(row, descending=True).values
        top = float(row[0]) if row.numel() else 0.0
        if top <= 0:
            continue
        cut = (n or 1) * torch.finfo(torch.float64).eps * top
        kept = [float(x) for x in row if float(x) > cut]
        blocks = [cols] if cols is not None else [[j] for j in range(len(kept))]
        for block in blocks:
            inside = [kept[j] for j in block if j < len(kept)]
            outside = [kept[i] for i in range(len(kept)) if i not in block] + [0.0]
            gap = min(abs(a - b) for a in inside for b in outside) if inside else top
            worst = max(worst, top / gap) if gap > 0 else float("inf")
    return worst


def svals_tol(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, *, c: float = 10.0) -> float:
    """Absolute tolerance on the singular values (and ΔW entries) of a pair computed in
    ``dtype`` through its factors: ``c * eps * max(n, m) * pair_cond * sigma_1``."""
    n, m = u.shape[-2], v.shape[-2]
    s1 = float(_spectral_norm(u.to(torch.float64) @ v.to(torch.float64).mT).max())
    return tol(dtype, n=max(n, m), cond=pair_cond(u, v), scale=max(s1, 1e-300), c=c)


def canonical_tol(
    u: torch.Tensor,
    v: torch.Tensor,
    dtype: torch.dtype,
    *,
    c: float = 10.0,
    cols: list[int] | None = None,
) -> float:
    """Absolute tolerance on the entries of ``canonical(U, V)`` computed in ``dtype``:
    ``c * eps * max(n, m) * pair_cond * gap_factor * sqrt(sigma_1)`` (an error ||E|| =
    eps n pair_cond sigma_1 in ΔW moves x_j by ||E||/gap_j, U'_j = x_j sqrt(s_j) by
    sqrt(sigma_1) ||E||/gap, i.e. eps n pair_cond (sigma_1/gap) sqrt(sigma_1)). ``cols``: see
    ``gap_factor`` (a repeated block, compared only up to rotation)."""
    n, m = u.shape[-2], v.shape[-2]
    s = torch.linalg.svdvals(u.to(torch.float64) @ v.to(torch.float64).mT)
    s = s[..., : u.shape[-1]]
    s1 = float(s.max()) if s.numel() else 0.0
    g = gap_factor(s, n=max(n, m), cols=cols)
    return tol(dtype, n=max(n, m), cond=pair_cond(u, v) * g, scale=max(s1, 1e-300) ** 0.5, c=c)
