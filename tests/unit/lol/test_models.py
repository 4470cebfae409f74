"""Reference LoL models: invariant models do not move under a random GL(r) per module (badly
conditioned R included), equivariant layers commute with the action, the raw MLP does move.

Tolerances (derived, first order; formula beside each assertion): a model output f changes by at
most ||J||_F * ||Δx|| when its input changes by Δx (J the Jacobian at the input, computed by
autograd; second-order terms are O(||Δx||^2), ~1e-20 here). Δx is bounded by the view's own
error bound from tests/reference/tolerance.py (svals / canonical / dense), or, for a model on raw
factors, by backward error: fl(U R) = (U + δU) R with ||δU|| <= r eps cond(R) ||U||, and the
model's own rounding modelled as a backward error of c eps n ||x|| on its input (n the longest
inner dimension along the network), both amplified by ||J||. Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_zoo.errors import SelectionError
from lora_zoo.load.views import ViewContext, apply_view
from lora_zoo.lol.models import (
    FlatMLP,
    GLLinear,
    GLNet,
    ModuleSpec,
    ModuleTransformer,
    OAlignMLP,
    gl_gate,
)
from tests.reference.factors import exact_cond_gl, well_separated
from tests.reference.tolerance import canonical_tol, eps, pair_cond, svals_tol, tol

F64 = torch.float64
SPECS = [
    ModuleSpec("layers.0.q_proj", 6, 5, 3, "q_proj", 0),
    ModuleSpec("layers.1.v_proj", 4, 7, 2, "v_proj", 1),
]
B = 3


def factors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (U (B, n, r), V (B, m, r))} with well-separated singular values."""
    out = {}
    for k, s in enumerate(SPECS):
        us, vs = zip(
            *(
                well_separated(s.out_features, s.in_features, s.rank, 100 * seed + 10 * k + j)
                for j in range(B)
            )
        )
        out[s.name] = (torch.stack(us), torch.stack(vs))
    return out


def act(fac, cond: float, seed: int = 1):
    """(U R, V R^-T) with an exact-condition R per LoRA and module; returns factors and cond."""
    out = {}
    for k, (name, (u, v)) in enumerate(fac.items()):
        rs = [exact_cond_gl(u.shape[-1], cond, seed + 31 * k + j) for j in range(B)]
        r_m = torch.stack([a for a, _ in rs])
        r_it = torch.stack([b for _, b in rs])
        out[name] = (u @ r_m, v @ r_it)
    return out


def batch(fac, view: str) -> dict:
    mods = {}
    for name, (u, v) in fac.items():
        res = apply_view(view, u, v, ViewContext(module=name, indices=tuple(range(B))))
        res["mask"] = torch.ones(B, u.shape[-1], dtype=torch.bool)
        res["present"] = torch.ones(B, dtype=torch.bool)
        mods[name] = res
    return mods


def jac_norms(fn, x: torch.Tensor) -> torch.Tensor:
    """||J_i||_F of fn at each row x_i (fn maps (B, d) -> (B, k) row-wise)."""
    out = []
    for i in range(x.shape[0]):
        j = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], x[i])
        out.append(torch.linalg.norm(j.reshape(-1)))
    return torch.stack(out)


def build(cls, **kw):
    torch.manual_seed(0)
    m = cls(SPECS, 2, **kw).to(F64).eval()
    return m


@pytest.mark.parametrize("view", ["svals", "canonical", "dense"])
@pytest.mark.parametrize("cond", [10.0, 1e5])
def test_flat_mlp_on_invariant_views_is_invariant(view, cond):
    fac = factors()
    acted = act(fac, cond)
    model = build(FlatMLP, view=view)
    model.calibrate(batch(factors(7), view))
    x0 = model.features(batch(fac, view))
    x1 = model.features(batch(acted, view))
    # per-entry bound of the view on the acted factors (the worse of the two inputs)
    per_entry = 0.0
    for u, v in acted.values():
        if view == "svals":  # 10 eps max(n, m) pair_cond(U R, V R^-T) s1 (Weyl)
            t = svals_tol(u, v, F64)
        elif view == "canonical":  # 10 eps max(n, m) pair_cond gap_factor sqrt(s1) (Wedin)
            t = max(canonical_tol(u[j], v[j], F64) for j in range(B))
        else:  # ΔW = U V^T: an r-term dot product, absolute in ||U|| ||V||: 10 eps r pair_cond s1
            s1 = float(torch.linalg.matrix_norm(u @ v.mT, ord=2).max())
            t = tol(F64, n=u.shape[-1], cond=pair_cond(u, v), scale=s1)
        per_entry = max(per_entry, t)
    dx = per_entry * math.sqrt(x0.shape[1])  # ||Δx||_2 <= sqrt(d) max|Δx_i|
    assert float((x1 - x0).abs().max()) <= per_entry
    head = lambda z: model.net((z - model.mu) / model.sd)  # noqa: E731
    j = jac_norms(head, x0)
    # |Δf| <= ||J||_F ||Δx|| + own rounding c eps d ||J||_F ||x||
    bound = j * dx + j * tol(F64, n=x0.shape[1], scale=float(x0.norm(dim=1).max()))
    diff = (model(batch(acted, view)) - model(batch(fac, view))).abs().max(1).values
    assert (diff <= bound).all(), (diff, bound)


def raw_bound(model, fac, norm_x: torch.Tensor | None = None, amp: float = 1.0) -> torch.Tensor:
    """Rounding bound for a model reading raw factors x at ``fac`` (module docstring):
    c eps n ||J(x)||_F * amp * ||x0||. For x = fl(x0 R) the input error is E with
    ||E|| <= r eps ||x0|| ||R|| (||R|| = sqrt(cond) for ``exact_cond_gl``: amp = sqrt(cond),
    x0 the un-acted factors); the model's own rounding is folded into the same c eps n term."""
    names = [s.name for s in SPECS]
    shapes = [(fac[n][0].shape[1:], fac[n][1].shape[1:]) for n in names]
    flat = torch.cat([torch.cat([fac[n][0].flatten(1), fac[n][1].flatten(1)], 1) for n in names], 1)

    def f(z):
        mods, off = {}, 0
        for n, (su, sv) in zip(names, shapes):
            ku, kv = su.numel(), sv.numel()
            u = z[:, off : off + ku].reshape(-1, *su)
            v = z[:, off + ku : off + ku + kv].reshape(-1, *sv)
            off += ku + kv
            mods[n] = {"U": u, "V": v, "present": torch.ones(z.shape[0], dtype=torch.bool)}
        return model(mods)

    j = jac_norms(f, flat)
    n = max(s.out_features + s.in_features for s in SPECS) + 64
    nx = flat.norm(dim=1) if norm_x is None else norm_x
    return tol(F64, n=n, cond=amp) * j * nx


def norms(fac) -> torch.Tensor:
    return torch.cat([torch.cat([u.flatten(1), v.flatten(1)], 1) for u, v in fac.values()], 1).norm(
        dim=1
    )


def raw(fac):
    return {
        n: {"U": u, "V": v, "present": torch.ones(B, dtype=torch.bool)} for n, (u, v) in fac.items()
    }


@pytest.mark.parametrize("cond", [10.0, 1e5])
def test_glnet_is_gl_invariant(cond):
    fac, acted = factors(), act(factors(), cond)
    model = build(GLNet, width=4)
    model.calibrate(raw(factors(3)))
    diff = (model(raw(acted)) - model(raw(fac))).abs().max(1).values
    # first order: c eps n ||J(x')||_F sqrt(cond) ||x|| + c eps n ||J(x)||_F ||x|| (docstring)
    bound = raw_bound(model, acted, norms(fac), math.sqrt(cond)) + raw_bound(model, fac)
    assert (diff <= bound).all(), (diff, bound)
    with torch.no_grad():
        assert float(bound.max()) < 1e-6 * float(model(raw(fac)).abs().max())  # it has teeth


def test_gl_layers_commute_with_the_action():
    ((u, v),) = [factors()[SPECS[0].name]]
    r_m, r_it = exact_cond_gl(3, 1e3, 5)
    layer = GLLinear(6, 5, 4, 3).to(F64)
    a_u, a_v = layer(u @ r_m, v @ r_it)
    b_u, b_v = layer(u, v)
    # products of three factors, inner dims n and r: 10 eps (n + r) cond(R) |W||U||R|
    t = tol(F64, n=6 + 3, cond=1e3, scale=float(layer.wu.abs().max() * u.abs().max() * 6))
    torch.testing.assert_close(a_u, b_u @ r_m, atol=t, rtol=0)
    t = tol(F64, n=5 + 3, cond=1e3, scale=float(layer.wv.abs().max() * v.abs().max() * 5))
    torch.testing.assert_close(a_v, b_v @ r_it, atol=t, rtol=0)
    g_u, g_v = gl_gate(u @ r_m, v @ r_it)
    h_u, h_v = gl_gate(u, v)
    # the gates are functions of ΔW (|Δgate| <= 1/4 |Δ(s/rms)|), applied to rows:
    # 10 eps (n + m + r) cond(R) max|U R| (and V)
    torch.testing.assert_close(
        g_u, h_u @ r_m, atol=tol(F64, n=14, cond=1e3, scale=float((u @ r_m).abs().max())), rtol=0
    )
    torch.testing.assert_close(
        g_v, h_v @ r_it, atol=tol(F64, n=14, cond=1e3, scale=float((v @ r_it).abs().max())), rtol=0
    )
    assert not torch.allclose(h_u, u * 0.5)  # the gate is not a constant


def test_transformer_is_gl_invariant():
    fac, acted = factors(), act(factors(), 1e5)
    model = build(ModuleTransformer, d_model=16, heads=2, layers=1)
    model.calibrate(batch(factors(4), "svals"))
    s0 = torch.cat([batch(fac, "svals")[s.name]["S"] for s in SPECS], 1)
    names = [s.name for s in SPECS]

    def f(z):
        mods, off = {}, 0
        for s in SPECS:
            mods[s.name] = {
                "S": z[:, off : off + s.rank],
                "present": torch.ones(z.shape[0], dtype=torch.bool),
            }
            off += s.rank
        return model(mods)

    # svals bound per entry: 10 eps max(n, m) pair_cond s1 (Weyl), on the acted factors
    per = max(svals_tol(*acted[n], F64) for n in names)
    j = jac_norms(f, s0)
    bound = j * per * math.sqrt(s0.shape[1]) + j * tol(F64, n=64, scale=float(s0.norm(dim=1).max()))
    diff = (model(batch(acted, "svals")) - model(batch(fac, "svals"))).abs().max(1).values
    assert (diff <= bound).all(), (diff, bound)


def test_raw_mlp_is_not_invariant_and_o_align_only_orthogonally():
    fac = factors()
    raw_mlp = build(FlatMLP, view="factors")
    raw_mlp.calibrate(batch(factors(2), "factors"))
    moved = (raw_mlp(raw(act(fac, 10.0))) - raw_mlp(raw(fac))).abs().max()
    bound = raw_bound(raw_mlp, act(fac, 10.0), norms(fac), math.sqrt(10.0)) + raw_bound(
        raw_mlp, fac
    )
    assert float(moved) > 100 * float(bound.max())  # far outside rounding: not invariant

    oal = build(OAlignMLP)
    oal.calibrate(
        raw(
            {
                n: (u[:1].expand(B, -1, -1) * 1.1, v[:1].expand(B, -1, -1))
                for n, (u, v) in factors(9).items()
            }
        )
    )
    # orthogonal R (cond 1): only rounding moves it
    ortho = act(fac, 1.0)
    x0, x1 = oal.features(raw(fac)), oal.features(raw(ortho))
    # Procrustes on M = U^T U_t + V^T V_t: Wedin, 10 eps max(n, m) gap_factor(M) ||U||
    from tests.reference.tolerance import gap_factor

    g = 1.0
    for n, (u, v) in fac.items():
        ut, vt = oal.template[n]
        m = u.mT @ ut + v.mT @ vt
        g = max(g, gap_factor(torch.linalg.svdvals(m)))
    t = tol(F64, n=8, cond=g, scale=float(x0.abs().max()))
    assert float((x1 - x0).abs().max()) <= t
    x2 = oal.features(raw(act(fac, 10.0)))  # a general R changes U^T U: not undone
    assert float((x2 - x0).abs().max()) > 1e6 * t


def test_dense_mlp_refuses_large_modules():
    with pytest.raises(SelectionError, match="dense"):
        FlatMLP([ModuleSpec("big", 4096, 4096, 8)], 1, view="dense")


def test_absent_module_is_zeros_with_present_flag():
    model = build(GLNet, width=4)
    fac = factors()
    mods = raw(fac)
    mods[SPECS[1].name]["present"] = torch.tensor([True, False, True])
    mods[SPECS[1].name]["U"] = mods[SPECS[1].name]["U"].clone()
    mods[SPECS[1].name]["U"][1] = 0
    mods[SPECS[1].name]["V"] = mods[SPECS[1].name]["V"].clone()
    mods[SPECS[1].name]["V"][1] = 0
    f = model.features(mods).reshape(B, len(SPECS), -1)
    assert torch.all(f[1, 1, :-1] == 0) and f[1, 1, -1] == 0 and f[0, 1, -1] == 1
    assert eps(F64) > 0
