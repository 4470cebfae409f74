"""FlatMLP(magnitude=True) reads DoRA's magnitude ``M`` beside the view: the features hold it
exactly (an invariant input, so GL(r) invariance of the invariant views is untouched), the
output depends on it, and without the option it is ignored."""

from __future__ import annotations

import torch

from lora_zoo.lol.models import FlatMLP
from tests.unit.lol.test_models import SPECS, B, act, batch, build, factors


def _with_m(mods: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in SPECS:
        out[s.name] = {**mods[s.name], "M": torch.rand(B, s.out_features, generator=g).double()}
    return out


def test_magnitude_is_a_feature_and_stays_invariant():
    fac = factors()
    plain = build(FlatMLP, view="svals")
    dora = build(FlatMLP, view="svals", magnitude=True)
    b0, b1 = _with_m(batch(fac, "svals"), 1), _with_m(batch(fac, "svals"), 2)
    x = dora.features(b0)
    assert x.shape[1] == plain.features(b0).shape[1] + sum(s.out_features for s in SPECS)
    j = 0
    for s in SPECS:  # per module: the view's block (rank wide for svals), then M exactly
        j += s.rank
        assert torch.equal(x[:, j : j + s.out_features], b0[s.name]["M"])
        j += s.out_features
    # the magnitude changes the output; the plain model ignores it exactly
    assert not torch.allclose(dora(b0), dora(b1))
    assert torch.equal(plain(b0), plain(b1))
    # GL(r) acting on the factors leaves M, and the svals, as they were: same features up to
    # the svals' rounding (test_models bounds it); here M's block is bit-identical
    acted = _with_m(batch(act(fac, 100.0), "svals"), 1)
    xa = dora.features(acted)
    # svals of factors mixed by cond-100 R, float64, values O(1): far below 1e-10
    assert float((xa - x).abs().max()) < 1e-10


def test_zeros_for_a_batch_without_dora():
    fac = factors()
    dora = build(FlatMLP, view="svals", magnitude=True)
    x = dora.features(batch(fac, "svals"))
    assert x.shape[1] == dora.mu.shape[0]
