"""The GL(r) symmetry of LoRA factors, and the small-matrix math that removes it.

A LoRA module stores ΔW = U V^T with U = B (n=out, r) and V = A^T (m=in*, r). For any invertible
R in GL(r), (U R, V R^-T) gives the same ΔW, so a model that reads raw factors sees r^2 spurious
degrees of freedom per module. Everything here works on the thin factors only: one QR of each
factor (O((n + m) r^2); ``canonical`` gets it from the r x r Gram matrix by Cholesky QR where that
is provably as accurate, Householder otherwise) plus one r x r SVD, never a dense n x m matrix,
because dense SVDs of Stable-Diffusion / LLM sized modules are 100-1000x slower and need n*m
memory. ``svals`` / ``canonical`` run single-threaded (see ``threads.single_threaded``).

All functions accept arbitrary leading batch dimensions, ``U (..., n, r)``, ``V (..., m, r)``,
so a whole batch of LoRAs (same module shape) is processed by one batched LAPACK call.

Precision: the math runs in float64 when the input is float64 and float32 otherwise (fp16/bf16
inputs are upcast; LAPACK has no half kernels); results are cast back to the input dtype unless
``out_dtype`` is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from lora_zoo.load.threads import single_threaded

__all__ = [
    "SmallSVD",
    "small_svd",
    "svals",
    "svals_many",
    "canonical",
    "dense",
    "procrustes",
    "align",
    "random_gl",
    "apply_gl",
    "pad_rank",
    "compute_dtype_for",
]


class SmallSVD(NamedTuple):
    """ΔW = Qu P diag(S) W^T Qv^T, with the r x r (or smaller) SVD in the middle.

    Shapes (k = min(n, r), l = min(m, r), s = min(k, l)): Qu (..., n, k), Qv (..., m, l),
    P (..., k, s), S (..., s) descending, W (..., l, s).
    """

    Qu: torch.Tensor
    Qv: torch.Tensor
    P: torch.Tensor
    S: torch.Tensor
    W: torch.Tensor


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64, everything else (fp32, fp16, bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_pair(u: torch.Tensor, v: torch.Tensor) -> None:
    if u.dim() < 2 or v.dim() < 2 or u.shape[-1] != v.shape[-1] or u.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"expected U (..., n, r) and V (..., m, r) with equal r and batch dims, "
            f"got {tuple(u.shape)} and {tuple(v.shape)}"
        )


def small_svd(u: torch.Tensor, v: torch.Tensor) -> SmallSVD:
    """SVD of U V^T via thin QRs: U = Qu Ru, V = Qv Rv, Ru Rv^T = P diag(S) W^T.

    Qu and Qv have orthonormal columns, so the singular values of Ru Rv^T (a k x l matrix, at
    most r x r) are exactly those of U V^T. Cost O((n + m) r^2 + r^3) instead of O(n m min(n, m)).
    """
    _check_pair(u, v)
    qu, ru = torch.linalg.qr(u, mode="reduced")  # (..., n, k), (..., k, r)
    qv, rv = torch.linalg.qr(v, mode="reduced")  # (..., m, l), (..., l, r)
    core = ru @ rv.transpose(-1, -2)  # (..., k, l)
    p, s, wh = torch.linalg.svd(core, full_matrices=False)  # (..., k, s), (..., s), (..., s, l)
    return SmallSVD(qu, qv, p, s, wh.transpose(-1, -2))


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size`` (a rank-deficient shape has fewer than r values)."""
    if x.shape[-1] >= size:
        return x
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def svals(
    u: torch.Tensor, v: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Singular values of ΔW = U V^T, descending, shape (..., r) (zeros past min(n, m, r)).

    GL(r)-invariant exactly (up to floating point): they are a function of ΔW alone.

    The R factors come from the r x r Gram matrices (Cholesky QR, run twice where needed, with
    the provable accuracy test of ``canonical``'s fast path; rows failing it take Householder
    QR), single-threaded (see ``threads.single_threaded``). Measured on a 64-LoRA batch of
    Qwen2-0.5B-sized modules (bf16, 1 thread): about 2x faster than LAPACK's R-only Householder
    QR, whose per-matrix calls and column-major input copies dominate at r = 4.
    """
    return svals_many([(u, v)], out_dtype=out_dtype)[0]


def svals_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    out_dtype: torch.dtype | Sequence[torch.dtype | None] | None = None,
) -> list[torch.Tensor]:
    """``svals`` of many (U, V) pairs (e.g. every module of a batch of LoRAs) in one go: the
    thin-factor work runs per pair (its data stays in cache), the r x r SVDs of all pairs with
    the same rank, dtype and device in one batched LAPACK call. Each pair's result equals
    ``svals`` of that pair alone (the same kernels on the same rows; tested). ``out_dtype``:
    one for all, or one per pair (None: the pair's own dtype)."""
    ods = list(out_dtype) if isinstance(out_dtype, (list, tuple)) else [out_dtype] * len(pairs)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    cores: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, torch.Tensor]]] = {}
    with single_threaded():
        for k, (u, v) in enumerate(pairs):
            _check_pair(u, v)
            fast = _cholesky_pair(u, v)
            if fast is None or not bool(fast.ok.all()):
                out[k] = _svals_householder(u, v, fast)
                continue
            core = fast.lu.mT @ fast.lv  # Ru Rv^T, (B, r, r)
            cores.setdefault((u.shape[-1], core.dtype, core.device), []).append((k, core))
        for group in cores.values():
            stack = group[0][1] if len(group) == 1 else torch.cat([c for _, c in group])
            s_all = torch.linalg.svdvals(stack)  # (sum B, r)
            j = 0
            for k, core in group:
                out[k] = s_all[j : j + core.shape[0]]
                j += core.shape[0]
    res = []
    for (u, _), s, od in zip(pairs, out, ods):
        assert s is not None
        s = _pad_last(s, u.shape[-1]).reshape(*u.shape[:-2], u.shape[-1])  # (..., r)
        res.append(s.to(od or u.dtype))
    return res


def _svals_householder(u: torch.Tensor, v: torch.Tensor, fast: _Fast | None) -> torch.Tensor:
    """(B, min(k, l)) singular values through Householder R factors (Q never formed); with
    ``fast``, only its failed rows (the others from the Cholesky R factors)."""
    cd = compute_dtype_for(u.dtype)

    def qr_svals(uf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
        ru = torch.linalg.qr(uf.to(cd), mode="r").R  # (B, k, r)
        rv = torch.linalg.qr(vf.to(cd), mode="r").R  # (B, l, r)
        return torch.linalg.svdvals(ru @ rv.transpose(-1, -2))  # (B, min(k, l))

    if fast is None:
        return qr_svals(_flat(u), _flat(v))
    s = torch.linalg.svdvals(fast.lu.mT @ fast.lv)  # (B, r); failed rows recomputed below
    bad = (~fast.ok).nonzero().flatten()
    s[bad] = qr_svals(_flat(u)[bad], _flat(v)[bad]).to(s.dtype)
    return s


def _eps(compute: torch.dtype, stored: torch.dtype) -> float:
    """The resolution of the data: a bf16 zoo computed in float32 is still only bf16-accurate."""
    return max(torch.finfo(compute).eps, torch.finfo(stored).eps)


def _tolerance(s: torch.Tensor, n: int, m: int, stored: torch.dtype | None = None) -> torch.Tensor:
    """Numerical-rank threshold per matrix, (..., 1). Singular values below it are exact zeros.

    sigma_max * max(max(n, m) * eps_compute, sqrt(r) * eps_stored): the first term is numpy's
    matrix_rank rule (what the factorisation itself can resolve); the second is what the stored
    factors can (rounding each entry of U, V to the stored dtype moves ΔW by about
    sqrt(r) * eps_stored * sigma_max for balanced factors), so singular values of a bf16 zoo
    below bf16 rounding noise are not reported as structure. Both depend on ΔW only, so the
    threshold is GL(r)-invariant."""
    eps_c = torch.finfo(s.dtype).eps
    eps_s = torch.finfo(stored).eps if stored is not None else eps_c
    r = s.shape[-1]
    rel = max(max(n, m) * eps_c, (r**0.5) * eps_s if eps_s > eps_c else 0.0)
    smax = s[..., :1] if s.shape[-1] else torch.zeros((*s.shape[:-1], 1), dtype=s.dtype)
    return smax * rel


def canonical(
    u: torch.Tensor, v: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A GL(r)-invariant canonical pair (U', V') with U' V'^T = U V^T.

    U' = Qu P sqrt(S), V' = Qv W sqrt(S) (the balanced SVD factorisation of ΔW), columns in
    descending singular-value order, shapes (..., n, r) and (..., m, r).

    Sign rule (v3): the SVD fixes each singular pair only up to a joint sign (p_j, w_j) ->
    (-p_j, -w_j). We flip column j of both U' and V' so that the sum of U'[:, j] is positive;
    where that sum is within rounding of zero (|sum| <= SIGN_MARGIN * eps * ||U'[:, j]||_2, eps of
    the stored dtype), so that noise could decide it, the largest-|.| entry is made positive
    instead (on an exact +x/-x tie: no flip). v1 used the largest entry alone, which flips
    between GL(r)-equivalent inputs whenever the two largest magnitudes nearly tie (common: any
    column with two dominant rows); a sum is decided by all n entries at once. v2's margin used
    ||.||_1, the worst case of n rounding errors of one sign; a random column's sum is about
    ||.||_2 while its ||.||_1 is about 0.8 sqrt(n) ||.||_2, so for a bf16 zoo (16 eps ~ 0.12)
    nearly every column fell back to the largest entry and v2 flipped as often as v1 (2.1% vs
    2.0% of columns of bf16 GL-equivalent Qwen2-sized pairs; v3 ~1%). The n rounding errors are
    independent in sign, so their sum is ~eps ||.||_2, which v3's margin covers 16 times.

    What is and is not invariant:
    - Distinct, nonzero singular values: U', V' are unique, hence invariant under any R in
      GL(r), to floating-point accuracy ~ cond(R) * eps * ||ΔW|| (the QR/SVD run on R-scaled
      factors, so a badly conditioned R costs digits; use float64 for cond(R) >> 1e3).
    - Repeated singular values: the singular vectors inside a repeated block are only defined up
      to an orthogonal O(d) rotation of the block, so U', V' are invariant only up to O(d) acting
      on those d columns (ΔW, svals and the block's span still are invariant). Near-repeated
      values (gap ~ eps) make those columns numerically unstable for the same reason.
    - Zero singular values (rank-deficient ΔW, including zero-padded ranks): the corresponding
      columns are set to exactly zero, so they are invariant and zero padding is exact. "Zero"
      means below sigma_max * max(max(n, m) * eps_compute, sqrt(r) * eps_stored) (see
      ``_tolerance``: a bf16 zoo's bf16 rounding noise is not structure).

    The returned tensors may be non-contiguous views (the fast path computes U'^T).
    """
    _check_pair(u, v)
    n, m, r = u.shape[-2], v.shape[-2], u.shape[-1]
    od = out_dtype or u.dtype
    with single_threaded():
        fast = _cholesky_pair(u, v)
        if fast is None:
            uc, vc = _canonical_householder(u, v, compute_dtype_for(u.dtype), stored=u.dtype)
            return uc.to(od), vc.to(od)
        lu, lv, ut, vt, ok, cd = fast
        p, s, wh = torch.linalg.svd(lu.mT @ lv)  # Ru Rv^T = P diag(S) W^T, (B, r, r) / (B, r)
        keep = s > _tolerance(s, n, m, u.dtype)
        root = torch.where(keep, s.clamp_min(0).sqrt(), torch.zeros_like(s)).unsqueeze(-2)
        # U' = U Ru^-1 P sqrt(S): an r x r map applied to U (no Q formed); U'^T = M_u^T U^T.
        mu = torch.linalg.solve_triangular(lu.mT, p * root, upper=True)  # (B, r, r)
        mv = torch.linalg.solve_triangular(lv.mT, wh.mT * root, upper=True)
        uct = mu.mT @ ut  # (B, r, n), rows contiguous: fast reductions below
        # Sign rule (v2, see the docstring), folded into V's r x r map (free); U's columns
        # flipped in place.
        sign = _signs(uct, -1, _eps(cd, u.dtype)).to(cd)  # (B, r, 1)
        vct = (mv * sign.mT).mT @ vt  # (B, r, m)
        uct = uct.mul_(sign).to(od)  # in place, then one cast (measured faster than mul(out=))
        uc, vc = uct.mT, vct.mT  # (B, n, r), (B, m, r) views
        bad = (~ok).nonzero().flatten()
        if bad.numel():
            hu, hv = _canonical_householder(_flat(u)[bad], _flat(v)[bad], cd, stored=u.dtype)
            uc[bad], vc[bad] = hu.to(uc.dtype), hv
        batch = u.shape[:-2]
        return uc.reshape(*batch, n, r).to(od), vc.reshape(*batch, m, r).to(od)


def _canonical_householder(
    u: torch.Tensor, v: torch.Tensor, cd: torch.dtype, *, stored: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """canonical via Householder QR (any shape and conditioning), in ``cd``."""
    n, m, r = u.shape[-2], v.shape[-2], u.shape[-1]
    stored = stored or u.dtype
    f = small_svd(u.to(cd), v.to(cd))
    s = f.S  # (..., s)
    keep = s > _tolerance(s, n, m, stored)  # (..., s)
    root = torch.where(keep, s.clamp_min(0).sqrt(), torch.zeros_like(s))  # (..., s)
    uc = (f.Qu @ f.P) * root.unsqueeze(-2)  # (..., n, s)
    vc = (f.Qv @ f.W) * root.unsqueeze(-2)  # (..., m, s)
    sign = _signs(uc, -2, _eps(cd, stored)).to(uc.dtype)  # (..., 1, s)
    return _pad_last(uc * sign, r), _pad_last(vc * sign, r)


SIGN_MARGIN = 16.0  # sums within SIGN_MARGIN * eps * ||column||_2 of zero are "undecided"


def _signs(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """+-1 per column of ``x`` along ``dim`` (kept as size 1): the sign rule v3 of
    ``canonical``. By the column sum where it is clearly nonzero, else by the largest-|.|
    entry (max >= -min: an exact tie keeps the sign)."""
    total = x.sum(dim, keepdim=True)
    margin = SIGN_MARGIN * eps * torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    decided = total.abs() > margin
    if x.device.type == "cpu" and bool(decided.all()):  # the usual case: no column undecided,
        return torch.sign(total)  # so the largest-entry rule (an aminmax pass) is not needed
    lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    by_max = torch.where(hi >= -lo, 1.0, -1.0)
    return torch.where(decided, torch.sign(total), by_max)


# ---- fast path: Cholesky QR2 on the r x r Gram matrices ---------------------------------------
# Why: LAPACK's batched Householder QR / Q formation runs one small call per matrix on an (n, r)
# layout with r ~ 4-16, which is slow (canonical of a 64-LoRA Qwen2-0.5B q_proj stack: ~1.9 ms,
# 1 thread, vs ~0.75 ms here). The Gram matrix X X^T of the (r, n) row layout is one batched GEMM, its Cholesky
# factor is R, and everything else is r x r. One Cholesky QR squares the condition number, so
# we run it twice (CholeskyQR2: Q1 = X R1^-1, then R2 from Q1's Gram, R = R2 R1), which is as
# accurate as Householder QR (orthogonality and residual O(eps)) whenever
# cond(X)^2 <= 1 / (11 (n r + r (r + 1)) eps) (Yamamoto, Nakatsukasa, Yanagisawa, Fukaya,
# ETNA 44, 2015). Rows whose Gram matrix fails that test (an upper bound on cond(G) =
# ||G||_F ||L^-1||_F^2 is checked, never an estimate from below), fail to factor, or are
# rank-deficient fall back to Householder QR, row by row.


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., n, r) -> (B, n, r), a view when possible."""
    return x.reshape(-1, *x.shape[-2:])


def _rows(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """X^T as a contiguous (B, r, n) tensor in ``cd``: one fused cast + transpose copy (the (r, n)
    layout makes the Gram GEMM and the reductions ~4x faster than the (n, r) layout). Always
    contiguous, whatever the input strides: GEMM kernels (and so the last bits) depend on the
    layout, and a LoRA's result must not depend on how its batch was stacked."""
    xt = _flat(x).mT
    if xt.dtype == cd:  # .to() would return xt itself, ignoring memory_format
        return xt.contiguous()
    return xt.to(cd, memory_format=torch.contiguous_format)


class _Fast(NamedTuple):
    """Cholesky-QR results for a flattened batch: lower Lu, Lv (B, r, r) with Lu Lu^T = U^T U
    (so Ru = Lu^T), the row layouts Ut (B, r, n), Vt (B, r, m) in ``cd``, and ``ok`` (B,)
    marking the rows where the fast path is provably accurate (L of the others: identity)."""

    lu: torch.Tensor
    lv: torch.Tensor
    ut: torch.Tensor
    vt: torch.Tensor
    ok: torch.Tensor
    cd: torch.dtype


def _cholesky_pair(u: torch.Tensor, v: torch.Tensor) -> _Fast | None:
    """Cholesky QR (one or two passes) of both factors, their r x r work fused into one batch of
    2B; None when no row can take the fast path (n < r or m < r: rank-deficient by shape).

    The second pass is skipped for rows whose Gram matrix is near-orthogonal (bound <= 4 r, so
    cond(X) <= 2 sqrt(r)): one pass then loses about that factor in accuracy against Householder
    QR, a few ulps (and is not run at all when every row qualifies, the common case)."""
    n, m, r = u.shape[-2], v.shape[-2], u.shape[-1]
    if n < r or m < r or r == 0 or u.numel() == 0 or v.numel() == 0:
        return None
    cd = compute_dtype_for(u.dtype)
    ut, vt = _rows(u, cd), _rows(v, cd)  # (B, r, n), (B, r, m)
    b = ut.shape[0]
    g1 = torch.cat([ut @ ut.mT, vt @ vt.mT])  # (2B, r, r)
    l1, info = torch.linalg.cholesky_ex(g1)
    eye = torch.eye(r, dtype=cd, device=u.device)
    l1inv = torch.linalg.solve_triangular(l1, eye.expand_as(l1), upper=False)
    # cond_2(G) <= ||G||_F ||G^-1||_F <= ||G||_F ||L^-1||_F^2: an upper bound, never an estimate
    bound = torch.linalg.matrix_norm(g1) * torch.linalg.matrix_norm(l1inv).square()
    limit = 1.0 / (11 * (max(n, m) * r + r * (r + 1)) * torch.finfo(cd).eps)
    ok = (info == 0) & (bound <= limit)  # a NaN / inf bound is not ok
    low = l1
    if not bool(((bound <= 4 * r) | ~ok).all()):  # CholeskyQR2: R2 from Q1 = X R1^-1
        q1u, q1v = l1inv[:b] @ ut, l1inv[b:] @ vt  # Q1^T, (B, r, n) / (B, r, m)
        l2, info2 = torch.linalg.cholesky_ex(torch.cat([q1u @ q1u.mT, q1v @ q1v.mT]))
        two = (bound > 4 * r) & ok  # per row, so a row's result never depends on its batch
        low, ok = torch.where(two[:, None, None], l1 @ l2, l1), ok & ((info2 == 0) | ~two)
    ok = ok[:b] & ok[b:]
    lu, lv = low[:b], low[b:]
    if not bool(ok.all()):  # keep the failed rows' (unused) r x r math finite: identity
        lu = torch.where(ok[:, None, None], lu, eye)
        lv = torch.where(ok[:, None, None], lv, eye)
    return _Fast(lu, lv, ut, vt, ok, cd)


def dense(
    u: torch.Tensor, v: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """ΔW = U V^T, (..., n, m). Large (n*m per module): only on request."""
    _check_pair(u, v)
    cd = compute_dtype_for(u.dtype)
    return (u.to(cd) @ v.to(cd).transpose(-1, -2)).to(out_dtype or u.dtype)


def procrustes(
    u: torch.Tensor, v: torch.Tensor, u_t: torch.Tensor, v_t: torch.Tensor
) -> torch.Tensor:
    """Orthogonal Q (..., r, r) minimising ||U Q - U_t||_F^2 + ||V Q - V_t||_F^2 jointly.

    Joint orthogonal Procrustes on the stacked factor [U; V]: with M = U^T U_t + V^T V_t and
    M = A diag(s) B^T, Q = A B^T. Because Q is orthogonal, Q^-T = Q, so (U Q, V Q) keeps ΔW.
    """
    cd = compute_dtype_for(u.dtype)
    mm = u.to(cd).transpose(-1, -2) @ u_t.to(cd) + v.to(cd).transpose(-1, -2) @ v_t.to(cd)
    a, _, bh = torch.linalg.svd(mm)  # (..., r, r) each
    return a @ bh


def align(
    u: torch.Tensor,
    v: torch.Tensor,
    u_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U Q, V Q) with Q = ``procrustes(U, V, U_t, V_t)``: factors rotated onto a template.

    Only O(r)-invariant: for orthogonal R0, align(U R0, V R0) == align(U, V) (when M has full
    rank; with a singular M the optimal Q is not unique). A non-orthogonal R in GL(r) changes
    the Gram matrices U^T U and V^T V, which no rotation can undo; use ``canonical`` (or
    canonicalise both LoRA and template first) when full GL(r) invariance is needed.
    Ranks must match; zero-pad the smaller one with ``pad_rank`` first.
    """
    cd = compute_dtype_for(u.dtype)
    q = procrustes(u, v, u_t, v_t)  # (..., r, r)
    od = out_dtype or u.dtype
    return (u.to(cd) @ q).to(od), (v.to(cd) @ q).to(od)


def random_gl(
    r: int,
    *,
    generator: torch.Generator,
    log_cond: float = 2.0,
    dtype: torch.dtype = torch.float64,
    batch: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random well-conditioned R and its R^-T, each (*batch, r, r), without any inversion.

    R = Q1 diag(exp(t)) Q2 with Q1, Q2 Haar-random orthogonal and t ~ U(-a, a), a = log_cond / 2,
    so cond(R) <= exp(log_cond) exactly; R^-T = Q1 diag(exp(-t)) Q2 in closed form.
    """

    def haar(shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.randn(*shape, r, r, generator=generator, dtype=torch.float64)
        q, rr = torch.linalg.qr(g)
        # Sign fix makes Q Haar-distributed (plain QR is biased by LAPACK's sign convention).
        d = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
        d = torch.where(d == 0, torch.ones_like(d), d)
        return q * d.unsqueeze(-2)

    q1, q2 = haar(batch), haar(batch)  # (*batch, r, r)
    a = log_cond / 2.0
    t = (torch.rand(*batch, r, generator=generator, dtype=torch.float64) * 2 - 1) * a  # (*b, r)
    r_mat = (q1 * t.exp().unsqueeze(-2)) @ q2
    r_inv_t = (q1 * (-t).exp().unsqueeze(-2)) @ q2
    return r_mat.to(dtype), r_inv_t.to(dtype)


def apply_gl(
    u: torch.Tensor, v: torch.Tensor, r_mat: torch.Tensor, r_inv_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U R, V R^-T): the symmetry action; ΔW is unchanged. Computed in the compute dtype and
    cast back to the factors' dtype."""
    cd = compute_dtype_for(u.dtype)
    return (
        (u.to(cd) @ r_mat.to(cd)).to(u.dtype),
        (v.to(cd) @ r_inv_t.to(cd)).to(v.dtype),
    )


def pad_rank(x: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad the rank (last) dim to ``r``. Exact under the symmetry: zero columns add nothing
    to U V^T, and ``svals`` / ``canonical`` of padded factors equal the padded results."""
    if x.shape[-1] > r:
        raise ValueError(f"cannot pad rank {x.shape[-1]} down to {r}")
    return _pad_last(x, r)


def condition_number(r_mat: torch.Tensor) -> float:
    """2-norm condition number (for tests and logging)."""
    s = torch.linalg.svdvals(r_mat.to(torch.float64))
    return float(s.max() / s.min()) if float(s.min()) > 0 else math.inf
