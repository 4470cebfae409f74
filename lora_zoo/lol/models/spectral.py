"""Spectral statistics + logistic regression: the backdoor-detection baseline of the literature
(per-module spectral summaries of ΔW, then a linear classifier; e.g. arXiv 2602.15195 reports
97 % on PADBench-style adapters with 20 such statistics).

Why a separate, deliberately simple model: a detector that only sees four numbers per module
says how much of "was this LoRA poisoned" is visible in the shape of each ΔW's spectrum alone.
If the neural LoL models do not beat it, they are not using anything beyond that.

Per module, from its singular values s_1 >= ... >= s_r (the ``svals`` view, computed from the
factors): top singular value ``log s_1``, stable rank ``||s||^2 / s_1^2``, spectral entropy
``-sum p_i log p_i`` with ``p = s^2 / ||s||^2``, and energy rank (the fewest singular values
holding 90 % of ||s||^2). All four are functions of ΔW only: **GL(r)-invariant**. Features are
standardised on the training rows (``calibrate``); the read-out is one linear layer (logistic
regression for binary targets; the bench's AdamW weight decay is its L2 penalty).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lora_zoo.lol.models import LolModel, Modules, ModuleSpec, register_model

STATS = ("log_top_sval", "stable_rank", "spectral_entropy", "energy_rank")
ENERGY = 0.9  # energy rank: singular values holding this fraction of ||ΔW||_F^2


def spectral_stats(s: torch.Tensor, energy: float = ENERGY) -> torch.Tensor:
    """(..., r) singular values (any order, zero-padded) -> (..., 4) ``STATS``. A zero ΔW (an
    absent module) gives zeros, not NaN: the present flag tells the model it is absent."""
    s = s.abs().sort(-1, descending=True).values
    e = s.pow(2)
    tot = e.sum(-1, keepdim=True)  # ||ΔW||_F^2
    top = s[..., :1]
    tiny = torch.finfo(s.dtype).tiny
    ok = tot > 0
    p = e / tot.clamp_min(tiny)
    ent = -(p * torch.log(p.clamp_min(tiny))).sum(-1, keepdim=True)
    stable = tot / top.pow(2).clamp_min(tiny)
    cum = p.cumsum(-1)
    erank = (cum < energy - 1e-12).sum(-1, keepdim=True).to(s.dtype) + 1
    out = torch.cat([torch.log(top.clamp_min(tiny)), stable, ent, erank], -1)
    return torch.where(ok, out, torch.zeros_like(out))


class SpectralLogReg(LolModel):
    """Four spectral statistics per module (``spectral_stats``) + present flags, standardised,
    then one linear layer. **GL(r)-invariant** (the statistics are functions of ΔW only)."""

    view = "svals"

    def __init__(self, specs: Sequence[ModuleSpec], out_dim: int, *, energy: float = ENERGY):
        super().__init__(specs)
        self.energy = energy
        d = len(self.specs) * (len(STATS) + 1)
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sd", torch.ones(d))
        self.linear = nn.Linear(d, out_dim)

    def features(self, modules: Modules) -> torch.Tensor:
        """(b, M * 5): the statistics of every module slot, then its present flag."""
        some = next(iter(modules.values()))["S"]
        b, dev = some.shape[0], some.device
        cols = []
        for s in self.specs:
            mod = modules.get(s.name)
            sv = (
                mod["S"].to(self.mu.dtype)
                if mod is not None
                else torch.zeros(b, max(1, s.rank), device=dev, dtype=self.mu.dtype)
            )
            cols.append(spectral_stats(sv, self.energy))  # (b, 4)
        pres = self._present(modules, b, dev).to(self.mu.dtype)  # (b, M)
        return torch.cat([*cols, pres], 1)

    @torch.no_grad()
    def calibrate(self, modules: Modules) -> None:
        x = self.features(modules)
        self.mu.copy_(x.mean(0))
        # a constant statistic (e.g. energy rank in a zoo where it never moves) is left unscaled
        self.sd.copy_(x.std(0).nan_to_num(1.0).clamp_min(1e-6))

    def forward(self, modules: Modules) -> torch.Tensor:
        return self.linear((self.features(modules) - self.mu) / self.sd)


@register_model("spectral", symmetry={"svals": "GL(r)"}, order=5)
def _make_spectral(specs: Sequence[ModuleSpec], out_dim: int, view: str, **hp: Any) -> LolModel:
    """Spectral statistics per module (top singular value, stable rank, entropy, energy rank)
    + logistic regression: the backdoor-detection baseline."""
    return SpectralLogReg(specs, out_dim, **hp)
