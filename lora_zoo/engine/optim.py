"""Vectorised AdamW, per-LoRA gradient clipping and lr schedules over stacked (K, ...) params.

Why our own optimizer: torch.optim.AdamW has one lr / weight decay / step count per param
group, but a stacked factor holds K LoRAs with K different hyperparameters that may stop at
different steps. This applies exactly torch's AdamW (single-tensor) update with (K,) vectors and
a per-LoRA step count, and leaves masked-out LoRAs bit-for-bit unchanged (state included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainHParams:
    """One LoRA's optimisation hyperparameters."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    total_steps: int = 100
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr for the update made after ``step`` completed updates.

    Same formulas as transformers' get_{constant,linear,cosine}_schedule_with_warmup, so a
    torch LambdaLR with this function reproduces our schedule in reference runs.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def per_lora_grad_norms(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K,) L2 norm of each LoRA's gradient over all stacked params (norm of per-param norms,
    as clip_grad_norm_ computes it). Params without grad contribute 0."""
    norms = []
    for p in params:
        if p.grad is not None:
            k = p.shape[0]
            g = p.grad.reshape(k, -1)  # (K, numel/K)
            if g.dtype in (torch.float16, torch.bfloat16):
                g = g.float()
            norms.append(torch.linalg.vector_norm(g, 2, dim=1))
    if not norms:
        return torch.zeros(params[0].shape[0], device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(norms), 2, dim=0)  # (K,)


def clip_grad_norm_per_lora(
    params: Sequence[torch.Tensor], max_norm: torch.Tensor, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale each LoRA's grads like torch.nn.utils.clip_grad_norm_ does for one model:
    coef = min(1, max_norm / (norm + 1e-6)). ``max_norm`` (K,), inf = no clipping.
    Returns the (K,) pre-clip norms."""
    if norms is None:
        norms = per_lora_grad_norms(params)
    coef = torch.clamp(max_norm.to(norms) / (norms + 1e-6), max=1.0)  # (K,)
    for p in params:
        if p.grad is not None:
            view = (-1,) + (1,) * (p.dim() - 1)
            p.grad.mul_(coef.to(p.grad.dtype).view(view))
    return norms


class StackedAdamW:
    """AdamW over params whose dim 0 indexes K LoRAs, with (K,) hyperparameters."""

    def __init__(self, params: Sequence[torch.Tensor], hparams: Sequence[TrainHParams]) -> None:
        self.params = list(params)
        k = len(hparams)
        for p in self.params:
            if p.shape[0] != k:
                raise ValueError(f"param of shape {tuple(p.shape)} does not stack K={k} LoRAs")
        dev = self.params[0].device
        dt = torch.float64

        def vec(vals: Sequence[float]) -> torch.Tensor:
            return torch.tensor([float(v) for v in vals], dtype=dt, device=dev)  # (K,)

        self.hparams = list(hparams)
        self.base_lr = vec([h.lr for h in hparams])
        self.weight_decay = vec([h.weight_decay for h in hparams])
        self.beta1 = vec([h.betas[0] for h in hparams])
        self.beta2 = vec([h.betas[1] for h in hparams])
        self.eps = vec([h.eps for h in hparams])
        self.step_count = torch.zeros(k, dtype=dt, device=dev)  # (K,) updates applied
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def current_lr(self) -> torch.Tensor:
        """(K,) lr for the next update (schedule evaluated at each LoRA's own step count)."""
        f = [
            lr_factor(h.schedule, int(s), h.total_steps, h.warmup_steps)
            for h, s in zip(self.hparams, self.step_count.tolist())
        ]
        return self.base_lr * torch.tensor(f, dtype=self.base_lr.dtype, device=self.base_lr.device)

    @torch.no_grad()
    def step(self, update: torch.Tensor) -> None:
        """Apply one AdamW update to the LoRAs where ``update`` (K,) bool is True.

        Follows torch.optim.adamw's single-tensor path op by op:
        p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
        p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
        """
        lr = self.current_lr()
        step = self.step_count + 1.0  # (K,) per-LoRA t
        bc1 = 1.0 - self.beta1**step
        bc2_sqrt = torch.sqrt(1.0 - self.beta2**step)
        step_size = lr / bc1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)

            def b(
                x: torch.Tensor, _s: tuple[int, ...] = shape, _dt: torch.dtype = p.dtype
            ) -> torch.Tensor:
                return x.to(_dt).view(_s)

            g = p.grad
            sel = update.view(shape)
            new_p = p * (1.0 - b(lr * self.weight_decay))
            new_m = torch.lerp(m, g, b(1.0 - self.beta1))
            new_v = v * b(self.beta2) + b(1.0 - self.beta2) * (g * g)
            denom = torch.sqrt(new_v) / b(bc2_sqrt) + b(self.eps)
            new_p = new_p - b(step_size) * (new_m / denom)
            p.copy_(torch.where(sel, new_p, p))
            m.copy_(torch.where(sel, new_m, m))
            v.copy_(torch.where(sel, new_v, v))
        self.step_count += update.to(self.step_count.dtype)
