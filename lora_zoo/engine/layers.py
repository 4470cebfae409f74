"""The stacked multi-LoRA layer: one frozen base layer plus K adapters evaluated with bmm.

Why a wrapper and not K PEFT adapters: PEFT evaluates adapters one after another and its
mixed-batch inference path has no training support; stacking the factors makes the K LoRA paths
one batched matmul while the (expensive) base matmul runs once over all K*b rows.
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
        xk = self._dropout(xk)
        h = torch.bmm(xk, A.transpose(1, 2))  # (K, N, r_max)
        d = torch.bmm(h, B.transpose(1, 2))  # (K, N, out)
        d = d * self.scale.view(K, 1, 1)
        return y + d.reshape(*lead, self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, K={self.num_loras}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )
