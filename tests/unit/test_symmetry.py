"""symmetry.py: QR-based svals / canonical / Procrustes against dense references, and GL(r)
invariance including badly conditioned R (cond up to 1e4, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_zoo import symmetry
from tests.reference.dense_ref import ref_canonical, ref_procrustes, ref_svals

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


dims = st.tuples(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**31 - 1)
)


@SETTINGS
@given(dims=dims, log_cond=st.floats(0.0, math.log(1e4)))
def test_svals_canonical_dense_invariant_under_gl(dims, log_cond):
    n, m, r, seed = dims
    u, v = well_separated(n, m, r, seed)
    rm, rit = exact_cond_gl(r, math.exp(log_cond), seed + 1)
    if r > 1:
        assert symmetry.condition_number(rm) == pytest.approx(math.exp(log_cond), rel=1e-6)
    u2, v2 = symmetry.apply_gl(u, v, rm, rit)
    tol = 1e-14 * math.exp(log_cond) + 1e-12  # observed worst ~7e-12 at cond 1e4
    torch.testing.assert_close(symmetry.dense(u2, v2), symmetry.dense(u, v), atol=tol, rtol=0)
    torch.testing.assert_close(symmetry.svals(u2, v2), symmetry.svals(u, v), atol=tol, rtol=0)
    cu, cv = symmetry.canonical(u, v)
    cu2, cv2 = symmetry.canonical(u2, v2)
    torch.testing.assert_close(cu2, cu, atol=tol * 100, rtol=0)
    torch.testing.assert_close(cv2, cv, atol=tol * 100, rtol=0)


def test_random_gl_condition_bound_and_inverse():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rm, rit = symmetry.random_gl(5, generator=g, log_cond=math.log(1e4))
        assert symmetry.condition_number(rm) <= 1e4 * (1 + 1e-9)
        torch.testing.assert_close(rm @ rit.T, torch.eye(5, dtype=torch.float64))


def test_badly_conditioned_r_is_actually_bad():
    rm, rit = exact_cond_gl(5, 1e4, 0)
    assert symmetry.condition_number(rm) == pytest.approx(1e4, rel=1e-6)
    u, v = well_separated(40, 30, 5, 3)
    u2, v2 = symmetry.apply_gl(u, v, rm, rit)
    assert (u2 - u).abs().max() > 1e-1  # the factors really moved...
    cu, _ = symmetry.canonical(u, v)
    cu2, _ = symmetry.canonical(u2, v2)
    torch.testing.assert_close(cu2, cu, atol=1e-9, rtol=0)  # ...the canonical form did not


@SETTINGS
@given(dims=dims)
def test_against_dense_reference(dims):
    n, m, r, seed = dims
    u, v = well_separated(n, m, r, seed)
    torch.testing.assert_close(symmetry.svals(u, v), ref_svals(u, v), atol=1e-12, rtol=0)
    cu, cv = symmetry.canonical(u, v)
    ru, rv = ref_canonical(u, v)
    torch.testing.assert_close(cu, ru, atol=1e-10, rtol=0)
    torch.testing.assert_close(cv, rv, atol=1e-10, rtol=0)
    torch.testing.assert_close(cu @ cv.T, u @ v.T, atol=1e-12, rtol=0)


def test_svals_matches_torch_svdvals_on_generic_gaussian():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(7, 64, 4, generator=g, dtype=torch.float64)  # batched: (b, n, r)
    v = torch.randn(7, 48, 4, generator=g, dtype=torch.float64)
    want = torch.linalg.svdvals(u @ v.transpose(-1, -2))[:, :4]
    torch.testing.assert_close(symmetry.svals(u, v), want, atol=1e-12, rtol=1e-12)


def test_zero_padding_is_exact():
    u, v = well_separated(20, 12, 3, 7)
    up, vp = symmetry.pad_rank(u, 6), symmetry.pad_rank(v, 6)
    torch.testing.assert_close(symmetry.svals(up, vp), symmetry.pad_rank(symmetry.svals(u, v), 6))
    cu, cv = symmetry.canonical(u, v)
    cup, cvp = symmetry.canonical(up, vp)
    torch.testing.assert_close(cup, symmetry.pad_rank(cu, 6), atol=1e-12, rtol=0)
    torch.testing.assert_close(cvp, symmetry.pad_rank(cv, 6), atol=1e-12, rtol=0)
    assert (cup[:, 3:] == 0).all() and (cvp[:, 3:] == 0).all()  # exactly zero, not ~1e-17


def test_rank_deficient_columns_are_exact_zeros_and_invariant():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 2, generator=g, dtype=torch.float64)
    b = torch.randn(25, 2, generator=g, dtype=torch.float64)
    mix = torch.randn(2, 4, generator=g, dtype=torch.float64)
    u, v = a @ mix, b @ torch.linalg.pinv(mix).T  # rank 2 spread over r = 4 columns
    cu, cv = symmetry.canonical(u, v)
    assert (cu[:, 2:] == 0).all() and (cv[:, 2:] == 0).all()
    rm, rit = symmetry.random_gl(4, generator=g, log_cond=4.0)
    cu2, cv2 = symmetry.canonical(*symmetry.apply_gl(u, v, rm, rit))
    torch.testing.assert_close(cu2, cu, atol=1e-10, rtol=0)
    torch.testing.assert_close(cv2, cv, atol=1e-10, rtol=0)
    # n < r: fewer singular values than the rank; the rest are zero-padded.
    s = symmetry.svals(torch.randn(2, 5, dtype=torch.float64), torch.randn(9, 5).double())
    assert s.shape == (5,) and (s[2:] == 0).all() and (s[:2] > 0).all()


def test_repeated_singular_values_only_invariant_up_to_rotation():
    """Documented limitation: inside a repeated block, U' is defined up to O(d)."""
    g = torch.Generator().manual_seed(4)
    x, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    y, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))
    u, v = x * torch.tensor([2.0, 1.0, 1.0]).double(), y  # singular values 2, 1, 1
    rm, rit = symmetry.random_gl(3, generator=g, log_cond=2.0)
    cu, cv = symmetry.canonical(u, v)
    cu2, cv2 = symmetry.canonical(*symmetry.apply_gl(u, v, rm, rit))
    torch.testing.assert_close(cu2[:, :1], cu[:, :1])  # the distinct one is unique
    # the repeated block spans the same space and gives the same product
    torch.testing.assert_close(cu2[:, 1:] @ cv2[:, 1:].T, cu[:, 1:] @ cv[:, 1:].T)
    q = torch.linalg.lstsq(cu[:, 1:], cu2[:, 1:]).solution  # cu2 = cu Q
    torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)


def test_procrustes_matches_scipy_and_is_orthogonal_invariant():
    u, v = well_separated(15, 11, 4, 11)
    ut, vt = well_separated(15, 11, 4, 12)
    q = symmetry.procrustes(u, v, ut, vt)
    torch.testing.assert_close(q, ref_procrustes(u, v, ut, vt), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    q0, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a1 = symmetry.align(u, v, ut, vt)
    a2 = symmetry.align(u @ q0, v @ q0, ut, vt)
    torch.testing.assert_close(a2[0], a1[0])
    torch.testing.assert_close(a2[1], a1[1])
    torch.testing.assert_close(a1[0] @ a1[1].T, u @ v.T)  # ΔW kept
    # Not GL-invariant (documented): a stretch changes the result.
    rm, rit = symmetry.random_gl(4, generator=g, log_cond=3.0)
    a3 = symmetry.align(u @ rm, v @ rit, ut, vt)
    assert (a3[0] - a1[0]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_kept_unless_asked(dtype):
    u, v = well_separated(16, 12, 4, 5)
    uh, vh = u.to(dtype), v.to(dtype)
    s = symmetry.svals(uh, vh)
    assert s.dtype == dtype
    cu, cv = symmetry.canonical(uh, vh)
    assert cu.dtype == dtype and cv.dtype == dtype
    s32 = symmetry.svals(uh, vh, out_dtype=torch.float32)
    assert s32.dtype == torch.float32
    # computed in float32 internally from the stored (rounded) values
    want = ref_svals(uh.double(), vh.double()).float()
    torch.testing.assert_close(s32, want, atol=1e-5, rtol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="equal r"):
        symmetry.svals(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="cannot pad"):
        symmetry.pad_rank(torch.zeros(3, 4), 2)


# ---- the Cholesky-QR fast path and its Householder fallback -------------------------------------
def _mixed_batch(dtype: torch.dtype):
    """Rows that take the fast path (one Cholesky-QR pass; row 5: two), and rows that must fall
    back: a zero (padded) rank column, a rank-deficient U, and factors too ill-conditioned for
    Cholesky QR in ``dtype``."""
    us, vs = zip(*(well_separated(40, 30, 4, s) for s in range(6)))
    us, vs = list(us), list(vs)
    us[1], vs[1] = symmetry.pad_rank(us[1][:, :3], 4), symmetry.pad_rank(vs[1][:, :3], 4)
    us[3] = us[3].clone()
    us[3][:, 3] = us[3][:, 0] * 2  # U has rank 3: its Gram matrix is singular
    rm, rit = exact_cond_gl(4, 1e7 if dtype == torch.float64 else 1e3, 5)
    us[4], vs[4] = symmetry.apply_gl(us[4], vs[4], rm, rit)
    rm, rit = exact_cond_gl(4, 10.0, 6)  # accepted, but past one pass: CholeskyQR2
    us[5], vs[5] = symmetry.apply_gl(us[5], vs[5], rm, rit)
    return torch.stack(us).to(dtype), torch.stack(vs).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_taken_only_where_provably_accurate(dtype):
    u, v = _mixed_batch(dtype)
    lu, lv, _, _, ok, cd = symmetry._cholesky_pair(u, v)
    assert ok.tolist() == [True, False, True, False, False, True]
    assert cd == dtype and torch.isfinite(lu).all() and torch.isfinite(lv).all()
    # on the accepted rows R = L^T is the QR's R up to row signs: R^T R == U^T U
    for i in (0, 2, 5):
        ru = torch.linalg.qr(u[i].double(), mode="r").R
        torch.testing.assert_close(
            (lu[i] @ lu[i].T).double(),
            ru.T @ ru,
            rtol=1e-5 if dtype == torch.float32 else 1e-12,
            atol=0,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_batch_equals_per_row_and_householder(dtype):
    """Fast and fallback rows in one batch: each equals its own single call and the pure
    Householder path (tolerance: float64 1e-12, float32 ~ 50 ulps of the largest entry)."""
    u, v = _mixed_batch(dtype)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    s, (cu, cv) = symmetry.svals(u, v), symmetry.canonical(u, v)
    hu, hv = symmetry._canonical_householder(u, v, dtype)
    torch.testing.assert_close(cu, hu, atol=tol, rtol=0)
    torch.testing.assert_close(cv, hv, atol=tol, rtol=0)
    for i in range(u.shape[0]):
        torch.testing.assert_close(symmetry.svals(u[i], v[i]), s[i], atol=tol, rtol=0)
        ci = symmetry.canonical(u[i], v[i])
        torch.testing.assert_close(ci[0], cu[i], atol=tol, rtol=0)
        torch.testing.assert_close(ci[1], cv[i], atol=tol, rtol=0)
        want = ref_svals(u[i].double(), v[i].double())
        cond = 1e7 if dtype == torch.float64 else 1e3  # row 4 was mixed by an R this bad
        atol = torch.finfo(dtype).eps * cond * 10 if i == 4 else tol * 10
        torch.testing.assert_close(s[i].double(), want, atol=atol, rtol=0)
    assert (cu[1, :, 3] == 0).all() and (cv[3, :, 3] == 0).all()  # fallback rows: exact zeros
    # a half-precision out_dtype is one rounding of the same values, fast and fallback rows alike
    bu, bv = symmetry.canonical(u, v, out_dtype=torch.bfloat16)
    assert torch.equal(bu, cu.to(torch.bfloat16)) and torch.equal(bv, cv.to(torch.bfloat16))


@SETTINGS
@given(
    dims=st.tuples(st.integers(4, 300), st.integers(4, 300), st.integers(1, 8)),
    log_cond=st.floats(0.0, math.log(1e6)),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_path_agrees_with_householder(dims, log_cond, seed):
    """canonical's fast path against the Householder path it replaces, float64 and float32, from
    orthogonal to cond(R) = 1e6 (where float32 must fall back and float64 takes CholeskyQR2)."""
    n, m, r = dims
    u, v = well_separated(n, m, min(r, n, m), seed)
    rm, rit = exact_cond_gl(u.shape[-1], math.exp(log_cond), seed + 3)
    u, v = symmetry.apply_gl(u, v, rm, rit)
    scale = float(symmetry.svals(u, v)[0])
    for dtype, rel in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        ud, vd = u.to(dtype), v.to(dtype)
        tol = rel * math.exp(log_cond) * max(scale, 1.0)
        cu, cv = symmetry.canonical(ud, vd)
        hu, hv = symmetry._canonical_householder(ud, vd, dtype)
        torch.testing.assert_close(cu, hu, atol=tol * 100, rtol=0)
        torch.testing.assert_close(cv, hv, atol=tol * 100, rtol=0)
        # balanced: ||U'_j||^2 == ||V'_j||^2 == s_j, the (Householder) singular values
        s = symmetry.svals(ud, vd)
        torch.testing.assert_close(cu.square().sum(-2), s, atol=tol * 10, rtol=0)
        torch.testing.assert_close(cv.square().sum(-2), s, atol=tol * 10, rtol=0)
