"""views.py: the registry, and every built-in view's invariance / equivariance contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_zoo.errors import SelectionError
from lora_zoo.load import symmetry, views
from lora_zoo.load.views import ViewContext, apply_view, available_views, get_view, register_view
from tests.reference.dense_ref import ref_svals
from tests.reference.factors import exact_cond_gl, well_separated
from tests.reference.tolerance import canonical_tol, pair_cond, svals_tol, tol

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dims = st.tuples(st.integers(1, 10), st.integers(1, 10), st.integers(1, 5), st.integers(0, 10**6))


def test_registry_lists_builtins_and_suggests():
    assert {"factors", "dense", "svals", "canonical", "aligned", "gl_augment"} <= set(
        available_views()
    )
    with pytest.raises(SelectionError, match="did you mean 'canonical'") as e:
        get_view("canonicl")
    assert e.value.key == "view"


def test_register_a_new_view_has_one_home():
    @register_view("_test_frob")
    def frob(u, v, ctx):
        return {"S": symmetry.svals(u, v).square().sum(-1, keepdim=True).sqrt()}

    try:
        u, v = well_separated(6, 5, 3, 0)
        out = apply_view("_test_frob", u, v, ViewContext())
        # ||s||_2 == ||ΔW||_F: r values each within 10 eps max(n, m) pair_cond s1 (and the dense
        # norm within that): 2 sqrt(r) x svals_tol
        t = 2 * math.sqrt(3) * svals_tol(u, v, torch.float64)
        torch.testing.assert_close(out["S"][0], torch.linalg.norm(u @ v.T), atol=t, rtol=0)
        with pytest.raises(SelectionError, match="already registered"):
            register_view("_test_frob")(lambda u, v, c: {})
    finally:
        views.VIEWS.unregister("_test_frob")


@SETTINGS
@given(dims=dims, log_cond=st.floats(0.0, math.log(1e4)))
def test_invariant_views_and_equivariant_factors(dims, log_cond):
    n, m, r, seed = dims
    u, v = well_separated(n, m, r, seed)
    rm, rit = exact_cond_gl(r, math.exp(log_cond), seed + 7)
    u2, v2 = u @ rm, v @ rit
    ctx = ViewContext(module="m", indices=(0,))
    f64, s1 = torch.float64, float(symmetry.svals(u, v)[0])
    bound = {
        # two computations, each 10 eps max(n, m) pair_cond s1 (Weyl); pair_cond ~ cond(R)
        "S": svals_tol(u, v, f64) + svals_tol(u2, v2, f64),
        # GEMMs of inner dim r on both sides: 2 x 10 eps r pair_cond(U R, V R^-T) s1
        "W": 2 * tol(f64, n=r, cond=pair_cond(u2, v2), scale=s1),
        # each 10 eps max(n, m) pair_cond (s1 / gap) sqrt(s1) (Wedin)
        "U": canonical_tol(u, v, f64) + canonical_tol(u2, v2, f64),
    }
    for name, key in (("svals", "S"), ("dense", "W"), ("canonical", "U"), ("canonical", "V")):
        a, b = apply_view(name, u, v, ctx)[key], apply_view(name, u2, v2, ctx)[key]
        t = bound["U" if key == "V" else key]
        torch.testing.assert_close(b, a, atol=t, rtol=0, msg=f"{name}.{key}")
    f1, f2 = apply_view("factors", u, v, ctx), apply_view("factors", u2, v2, ctx)
    # equivariant, not invariant: one GEMM of inner dim r, 10 eps r ||U|| ||R||
    nrm = torch.linalg.matrix_norm
    t_u = tol(f64, n=r, scale=float(nrm(u, 2) * nrm(rm, 2)))
    t_v = tol(f64, n=r, scale=float(nrm(v, 2) * nrm(rit, 2)))
    torch.testing.assert_close(f2["U"], f1["U"] @ rm, atol=t_u, rtol=0)
    torch.testing.assert_close(f2["V"], f1["V"] @ rit, atol=t_v, rtol=0)


def test_svals_view_agrees_with_svdvals_of_dense_view():
    u, v = well_separated(33, 21, 4, 9)
    ctx = ViewContext()
    w = apply_view("dense", u, v, ctx)["W"]
    s = apply_view("svals", u, v, ctx)["S"]
    t = 2 * svals_tol(u, v, torch.float64)  # both within 10 eps max(n, m) pair_cond s1
    torch.testing.assert_close(s, torch.linalg.svdvals(w)[:4], atol=t, rtol=0)
    torch.testing.assert_close(s, ref_svals(u, v), atol=t, rtol=0)


def test_gl_augment_reproducible_keeps_delta_w_and_bounded():
    u, v = well_separated(12, 9, 4, 1)
    ctx = ViewContext(module="layers.0.q", indices=(17,), seed=3, epoch=0)
    a = apply_view("gl_augment", u, v, ctx)
    b = apply_view("gl_augment", u, v, ctx)
    assert torch.equal(a["U"], b["U"]) and torch.equal(a["V"], b["V"])
    # ΔW kept: GEMMs of inner dim r, 2 x 10 eps r pair_cond(U R, V R^-T) s1
    s1 = float(symmetry.svals(u, v)[0])
    t = 2 * tol(torch.float64, n=4, cond=pair_cond(a["U"], a["V"]), scale=s1)
    torch.testing.assert_close(a["U"] @ a["V"].T, u @ v.T, atol=t, rtol=0)
    assert (a["U"] - u).abs().max() > 1e-2  # it really transformed
    # recover R = U^+ U_aug and check its conditioning bound (default log_cond 2 -> e^2): the
    # zero-residual least squares gives R to a relative 10 eps n cond(U), which moves cond(R)
    # by a relative cond(R) times that
    r_mat = torch.linalg.lstsq(u, a["U"]).solution
    su = torch.linalg.svdvals(u)
    rel = tol(torch.float64, n=12, cond=float(su[0] / su[-1]) * math.exp(2.0))
    assert symmetry.condition_number(r_mat) <= math.exp(2.0) * (1 + rel)
    for other in (
        ViewContext(module="layers.0.q", indices=(17,), seed=3, epoch=1),
        ViewContext(module="layers.0.q", indices=(18,), seed=3, epoch=0),
        ViewContext(module="layers.0.k", indices=(17,), seed=3, epoch=0),
        ViewContext(module="layers.0.q", indices=(17,), seed=4, epoch=0),
    ):
        assert not torch.allclose(apply_view("gl_augment", u, v, other)["U"], a["U"])


def test_batched_views_equal_per_item():
    us, vs = zip(*(well_separated(10, 8, 3, s) for s in range(4)))
    ub, vb = torch.stack(us), torch.stack(vs)  # (4, 10, 3), (4, 8, 3)
    idx = (5, 6, 7, 8)
    f64 = torch.float64
    for name in ("factors", "dense", "svals", "canonical", "gl_augment"):
        batched = apply_view(name, ub, vb, ViewContext(module="x", indices=idx, seed=1))
        for i in range(4):
            single = apply_view(
                name, us[i], vs[i], ViewContext(module="x", indices=(idx[i],), seed=1)
            )
            u, v = us[i], vs[i]
            s1 = float(symmetry.svals(u, v)[0])
            norm = float(max(torch.linalg.matrix_norm(u, 2), torch.linalg.matrix_norm(v, 2)))
            bound = {
                "factors": 0.0,  # the stored factors themselves: exact
                # GEMM of inner dim r, both sides: 2 x 10 eps r pair_cond s1
                "dense": 2 * tol(f64, n=3, cond=pair_cond(u, v), scale=s1),
                "svals": 2 * svals_tol(u, v, f64),  # 2 x 10 eps max(n, m) pair_cond s1
                "canonical": 2 * canonical_tol(u, v, f64),  # 2 x ... (s1 / gap) sqrt(s1)
                # U R, V R^-T with ||R||, ||R^-T|| <= e^(log_cond / 2) = e: 2 x 10 eps r e ||U||
                "gl_augment": 2 * tol(f64, n=3, cond=math.e, scale=norm),
            }[name]
            for k, t in single.items():
                torch.testing.assert_close(batched[k][i], t, atol=bound, rtol=0, msg=name)


def test_aligned_view_orthogonal_invariant_and_mixed_rank():
    u, v = well_separated(12, 10, 4, 2)
    ut, vt = well_separated(12, 10, 4, 3)
    ctx = ViewContext(module="m", template=(ut, vt))
    q0, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    a, b = apply_view("aligned", u, v, ctx), apply_view("aligned", u @ q0, v @ q0, ctx)
    # Q = polar factor of M = U^T U_t + V^T V_t: moves by eps (n + m) (||U|| ||U_t|| +
    # ||V|| ||V_t||) / sigma_min(M) =: eps (n + m) cond_M; two Q's applied to U: 2 x 10 eps
    # (n + m) cond_M ||U||
    nrm, f64 = torch.linalg.matrix_norm, torch.float64
    cond_m = float(
        (nrm(u, 2) * nrm(ut, 2) + nrm(v, 2) * nrm(vt, 2))
        / torch.linalg.svdvals(u.T @ ut + v.T @ vt)[-1]
    )
    t_a = 2 * tol(f64, n=12 + 10, cond=cond_m, scale=float(nrm(u, 2)))
    torch.testing.assert_close(a["U"], b["U"], atol=t_a, rtol=0)
    # ΔW kept: Q orthogonal to 10 eps r, so 10 eps r pair_cond s1 (2x: the GEMMs themselves)
    s1 = float(symmetry.svals(u, v)[0])
    t_w = 2 * tol(f64, n=6, cond=pair_cond(u, v), scale=s1)
    torch.testing.assert_close(a["U"] @ a["V"].T, u @ v.T, atol=t_w, rtol=0)
    # template of rank 6: both padded to 6, ΔW kept
    ut6, vt6 = well_separated(12, 10, 6, 4)
    c = apply_view("aligned", u, v, ViewContext(module="m", template=(ut6, vt6)))
    assert c["U"].shape == (12, 6)
    torch.testing.assert_close(c["U"] @ c["V"].T, u @ v.T, atol=t_w, rtol=0)
    with pytest.raises(SelectionError, match="template"):
        apply_view("aligned", u, v, ViewContext(module="m"))
    with pytest.raises(SelectionError, match="template module has shape"):
        apply_view("aligned", u, v, ViewContext(module="m", template=(ut[:5], vt)))


@pytest.mark.parametrize("name", ["factors", "svals", "canonical", "gl_augment", "dense"])
def test_dtype_kept_or_cast(name):
    u, v = (t.to(torch.bfloat16) for t in well_separated(8, 6, 2, 0))
    out = apply_view(name, u, v, ViewContext(indices=(0,)))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    out = apply_view(name, u, v, ViewContext(indices=(0,), dtype=torch.float32))
    assert all(t.dtype == torch.float32 for t in out.values())


@pytest.mark.parametrize("layout", ["stacked", "A-transposed views", "strided rows"])
def test_batched_canonical_independent_of_batch_and_layout(layout):
    """A LoRA's canonical/svals must not depend on its batch neighbours or on how the loader's
    stack is strided. float32 with singular-value gaps of ~2% amplifies any last-bit difference
    (e.g. a GEMM kernel chosen by layout) ~50x, so the tolerance is a few ulps of the output."""
    g = torch.Generator().manual_seed(3)
    us, vs = [], []
    for _ in range(5):
        x, _ = torch.linalg.qr(torch.randn(96, 4, generator=g, dtype=torch.float64))
        y, _ = torch.linalg.qr(torch.randn(80, 4, generator=g, dtype=torch.float64))
        s = torch.tensor([1.06, 1.04, 1.02, 1.0], dtype=torch.float64).sqrt()
        mix, mix_it = symmetry.random_gl(4, generator=g, log_cond=1.0)
        us.append(((x * s) @ mix).float())
        vs.append(((y * s) @ mix_it).float())
    if layout == "stacked":
        ub, vb = torch.stack(us), torch.stack(vs)
    elif layout == "A-transposed views":  # what the decoder hands over: V = A^T, strided rows
        ub = torch.stack(us)
        vb = torch.stack([v.T.contiguous() for v in vs]).mT
    else:  # rows of a bigger buffer (batch stride != n * r)
        buf = torch.zeros(5, 2000)
        buf[:, : 96 * 4] = torch.stack(us).reshape(5, -1)
        buf[:, 500 : 500 + 80 * 4] = torch.stack(vs).reshape(5, -1)
        ub, vb = buf[:, : 96 * 4].view(5, 96, 4), buf[:, 500 : 500 + 80 * 4].view(5, 80, 4)
    ctx = ViewContext(module="x", indices=tuple(range(5)))
    for name, keys in (("canonical", ("U", "V")), ("svals", ("S",))):
        batched = apply_view(name, ub, vb, ctx)
        for i in (0, 3):
            single = apply_view(name, us[i], vs[i], ViewContext(module="x", indices=(i,)))
            for k in keys:
                # a determinism contract, not an accuracy bound: the same kernels run on the
                # same contiguous rows whatever the batch / strides (symmetry._rows), so a few
                # ulps of the output at most (observed: bit-equal): 4 eps32 max|single| (n = 1:
                # no accumulation). A layout-dependent kernel's last-bit difference would be
                # amplified ~s1 / gap (~50x here) past it.
                t = tol(torch.float32, n=1, scale=float(single[k].abs().max()), c=4)
                torch.testing.assert_close(batched[k][i], single[k], atol=t, rtol=0, msg=name)
