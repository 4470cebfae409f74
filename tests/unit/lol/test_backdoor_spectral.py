"""The spectral backdoor baseline (``lol/models/spectral.py``): its four statistics on spectra
whose values are known in closed form, their scale behaviour, absent modules, registration.

Tolerances: the statistics are a few float64 flops on r <= 4 numbers (eps 2.2e-16 times a
handful of operations), so 1e-12 is loose and still catches any formula error."""

from __future__ import annotations

import math

import torch

from lora_zoo.lol.models import ModuleSpec, make_model, model_info
from lora_zoo.lol.models.spectral import STATS, SpectralLogReg, spectral_stats

F64 = torch.float64


def test_statistics_match_their_closed_forms():
    s = torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=F64)  # any order, zero-padded
    log_top, stable, ent, erank = spectral_stats(s)[0].tolist()
    p = [0.8, 0.2]  # s^2 / ||s||^2 = 4/5, 1/5
    assert abs(log_top - math.log(2.0)) < 1e-12
    assert abs(stable - 5.0 / 4.0) < 1e-12  # ||s||^2 / s_1^2
    assert abs(ent - -sum(x * math.log(x) for x in p)) < 1e-12
    assert erank == 2.0  # 0.8 < 0.9 <= 1.0: two singular values hold 90 %
    flat = spectral_stats(torch.ones(1, 4, dtype=F64))[0].tolist()
    assert abs(flat[1] - 4.0) < 1e-12 and abs(flat[2] - math.log(4)) < 1e-12 and flat[3] == 4.0


def test_scale_moves_only_the_top_singular_value():
    s = torch.tensor([[3.0, 1.0, 0.5, 0.1]], dtype=F64)
    a, b = spectral_stats(s)[0], spectral_stats(7.0 * s)[0]
    assert abs(float(b[0] - a[0]) - math.log(7.0)) < 1e-12
    assert torch.allclose(a[1:], b[1:], rtol=0, atol=1e-12)


def test_zero_module_gives_zeros_not_nan():
    out = spectral_stats(torch.zeros(2, 4, dtype=F64))
    assert torch.equal(out, torch.zeros(2, len(STATS), dtype=F64))


def test_registered_as_gl_invariant_logistic_regression():
    info = model_info("spectral")
    assert dict(info.symmetry) == {"svals": "GL(r)"}
    specs = [
        ModuleSpec("a.q_proj", 6, 5, 3, "q_proj", 0),
        ModuleSpec("a.v_proj", 4, 7, 2, "v_proj", 0),
    ]
    m = make_model("spectral", "svals", specs, 1)
    assert isinstance(m, SpectralLogReg) and m.invariance == "GL(r)"
    g = torch.Generator().manual_seed(0)
    mods = {
        "a.q_proj": {"S": torch.rand(5, 3, generator=g) + 0.1, "present": torch.ones(5)},
        "a.v_proj": {"S": torch.rand(5, 2, generator=g) + 0.1, "present": torch.ones(5)},
    }
    m.calibrate(mods)
    x = (m.features(mods) - m.mu) / m.sd
    assert x.shape == (5, 2 * (len(STATS) + 1)) and torch.isfinite(x).all()
    assert m(mods).shape == (5, 1)
    # one linear layer: the only parameters are its weight and bias (logistic regression)
    assert sum(p.numel() for p in m.parameters()) == x.shape[1] + 1
