from __future__ import annotations

import torch

from lora_zoo.lol.probe import cross_val_accuracy, membership_probe


def test_probe_finds_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n = 120
    member = torch.rand(n, generator=g) < 0.5
    x_signal = torch.randn(n, 6, generator=g) + 2.0 * member[:, None].double()
    x_noise = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = member.double()
    assert cross_val_accuracy(x_signal.double(), y) > 0.9
    assert cross_val_accuracy(x_noise, y) < 0.7
    res = membership_probe(x_signal, [["a"] if m else ["b"] for m in member], ["a", "b"])
    assert [r.target for r in res] == ["a", "b"]
    assert all(r.accuracy > r.baseline + 0.3 for r in res)
