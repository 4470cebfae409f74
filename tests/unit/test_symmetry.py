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
