"""The stacked multi-LoRA layer: one frozen base layer plus K adapters evaluated with bmm.

Why a wrapper and not K PEFT adapters: PEFT evaluates adapters one after another and its
mixed-batch inference path has no training support; stacking the factors makes the K LoRA paths
one batched matmul while the (expensive) base matmul runs once over all K*b rows.

Variants, per LoRA of a chunk (PEFT's math, checked against PEFT in tests/builders/):
- DoRA: a trained magnitude m_k (out,) beside B_k, A_k; the layer is
  ``m_k / ||W0 + s B_k A_k||_row * (W0 + s B_k A_k)`` with the norm detached (PEFT, DoRA paper
  section 4.3), computed from the factors (``dora_row_norms``) without forming K dense matrices.
- PiSSA / OLoRA: PEFT subtracts s B0 A0 from the base weight; the base here is shared by K LoRAs,
  so each LoRA keeps its frozen init factors instead and the LoRA path is s (B A - B0 A0) x:
  the same function and gradients, with the true base untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def base_in_out(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a transformers Conv1D.

    GPT-2's Conv1D stores its weight as (in, out) and computes x @ W; PEFT then sets
    fan_in_fan_out=True. The LoRA path itself is identical (A: in -> r, B: r -> out).
    """
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "weight"):
        w = layer.weight  # (in, out)
        return int(w.shape[0]), int(w.shape[1]), True
    raise TypeError(f"cannot put a LoRA on {type(layer).__name__}; need nn.Linear or Conv1D")


class MultiLoraLinear(nn.Module):
    """``y = base(x) + scale_k * (drop_k(x) @ A_k^T) @ B_k^T`` for the rows of LoRA k.

    Parameters are *owned by the MultiLoraModel* and handed in, so every wrapper of a model can be
    re-pointed to a new chunk of K LoRAs without rebuilding the module tree.
    """

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base
        self.name = name
        self.in_features, self.out_features, self.fan_in_fan_out = base_in_out(base)
        self.enabled = True
        # Filled by MultiLoraModel.reset(): A (K, r_max, in), B (K, out, r_max)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        # Per-LoRA constants (not trained): scale (K,), dropout p (K,) as floats, rank mask.
        self.register_buffer("scale", torch.zeros(0), persistent=False)
        self.register_buffer("rank_mask", torch.zeros(0, 0), persistent=False)
        self.dropout_p: list[float] = []
        self.generators: list[torch.Generator | None] = []
        # Variants (set_variants): DoRA magnitudes (K, out) and which LoRAs use them (K,);
        # frozen init factors of PiSSA / OLoRA LoRAs, zeros for the others.
        self.magnitude: nn.Parameter | None = None
        self.register_buffer("dora", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.init_A: torch.Tensor | None = None  # (K, r_max, in)
        self.init_B: torch.Tensor | None = None  # (K, out, r_max)

    @property
    def num_loras(self) -> int:
        return 0 if self.lora_A is None else int(self.lora_A.shape[0])

    def set_factors(
        self,
        A: nn.Parameter,
        B: nn.Parameter,
        scale: torch.Tensor,
        rank_mask: torch.Tensor,
        dropout_p: list[float],
        generators: list[torch.Generator | None],
    ) -> None:
        # Plain attribute assignment of Parameters registers them as this module's parameters.
        self.lora_A = A  # (K, r_max, in)
        self.lora_B = B  # (K, out, r_max)
        self.scale = scale  # (K,)
        self.rank_mask = rank_mask  # (K, r_max)
        self.dropout_p = list(dropout_p)
        self.generators = list(generators)

    def set_variants(
        self,
        magnitude: nn.Parameter | None,
        dora: torch.Tensor,
        init_A: torch.Tensor | None,
        init_B: torch.Tensor | None,
    ) -> None:
        self.magnitude = magnitude  # (K, out) or None when no LoRA of the chunk uses DoRA
        self.dora = dora  # (K,) bool
        self.init_A, self.init_B = init_A, init_B

    def base_matrix(self) -> torch.Tensor:
        """The frozen base weight as an (out, in) matrix (Conv1D stores (in, out))."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def dora_row_norms(self) -> torch.Tensor:
        """(K, out) ||W0 + s_k B_k A_k|| per output row, from the factors:
        |w_i|^2 + 2 s (W0 A^T)_i . b_i + s^2 b_i^T (A A^T) b_i, so no (K, out, in) tensor is
        formed (a Qwen2-0.5B MLP layer at K = 16 would be 280 MB per call)."""
        A, B = self.lora_A, self.lora_B
        assert A is not None and B is not None
        w = self.base_matrix().to(A.dtype)  # (out, in)
        s = self.scale.view(-1, 1)  # (K, 1)
        p = torch.matmul(w, A.transpose(1, 2))  # (K, out, r)
        g = torch.bmm(A, A.transpose(1, 2))  # (K, r, r)
        sq = (w * w).sum(-1)  # (out,)
        cross = (p * B).sum(-1)  # (K, out)
        quad = (torch.bmm(B, g) * B).sum(-1)  # (K, out)
        return (sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def _dropout(self, xk: torch.Tensor) -> torch.Tensor:
        """Inverted dropout per LoRA, each from its own generator (own RNG stream), so one
        LoRA's masks depend on its own seed and on the chunk's padded batch shape (b_max, T_max)
        only, never on the other LoRAs' draws. The runner keeps chunks fixed, so a rebuild
        draws the same masks; a separate run with the same shapes draws them too (tested
        against PEFT in tests/builders/test_engine_vs_peft.py)."""
        if not self.training or not any(p > 0 for p in self.dropout_p):
            return xk
        out = []
        for k, p in enumerate(self.dropout_p):
            x = xk[k]  # (N, in)
            if p > 0:
                u = torch.rand(
                    x.shape, generator=self.generators[k], device=x.device, dtype=torch.float32
                )
                x = x * (u >= p).to(x.dtype) / (1.0 - p)
            out.append(x)
        return torch.stack(out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.enabled or self.lora_A is None:
            return y
        K = self.lora_A.shape[0]
        lead = x.shape[:-1]
        if x.shape[0] % K != 0:
            raise ValueError(
                f"{self.name}: batch dim {x.shape[0]} is not a multiple of K={K}; inputs must be "
                "grouped by LoRA (rows k*b:(k+1)*b belong to LoRA k)"
            )
        A, B = self.lora_A, self.lora_B
        xk = x.to(A.dtype).reshape(K, -1, self.in_features)  # (K, N, in), N = b*...
        xd = self._dropout(xk)
        h = torch.bmm(xd, A.transpose(1, 2))  # (K, N, r_max)
        d = torch.bmm(h, B.transpose(1, 2))  # (K, N, out)
        if self.init_A is not None and self.init_B is not None:  # PiSSA / OLoRA: minus B0 A0
            h0 = torch.bmm(xd, self.init_A.transpose(1, 2))  # (K, N, r_max)
            d = d - torch.bmm(h0, self.init_B.transpose(1, 2))
        d = d * self.scale.view(K, 1, 1)
        if self.magnitude is not None:
            d = self._dora(xd, xd is not xk, y, d)
        return y + d.reshape(*lead, self.out_features).to(y.dtype)

    def _dora(
        self, xd: torch.Tensor, dropped: bool, y: torch.Tensor, d: torch.Tensor
    ) -> torch.Tensor:
        """PEFT's DoRA output on top of the base for the DoRA LoRAs of the chunk:
        (m / n - 1) * W0 x' + (m / n) * s B A x', n the detached row norms, x' the dropped-out
        input (PEFT reuses the base output when there is no dropout: W0 x = y - bias)."""
        K = d.shape[0]
        assert self.magnitude is not None
        mag = (self.magnitude / self.dora_row_norms().detach()).unsqueeze(1)  # (K, 1, out)
        if dropped:
            base = torch.matmul(xd, self.base_matrix().to(xd.dtype).T)  # (K, N, out)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = y if bias is None else y - bias
            base = base.to(d.dtype).reshape(K, -1, self.out_features)
        dd = (mag - 1) * base + mag * d
        return torch.where(self.dora.view(K, 1, 1), dd, d)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, K={self.num_loras}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )
