"""One optimisation step for K LoRAs at once, with per-LoRA stopping and failure isolation.

Why failures are per LoRA: in a zoo sweep some hyperparameter draws diverge (lr 1e-3 on a tiny
batch). One NaN must cost that LoRA only, not the K-1 others sharing its pass; and a LoRA that
finished its steps must not drift while the others go on (AdamW's weight decay alone would move
it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from lora_zoo.engine.model import MultiLoraModel
from lora_zoo.engine.optim import (
    StackedAdamW,
    TrainHParams,
    clip_grad_norm_per_lora,
    per_lora_grad_norms,
)

logger = logging.getLogger(__name__)


class MultiLoraTrainer:
    """Per-LoRA AdamW + clipping + schedule + stop/fail bookkeeping over a MultiLoraModel."""

    def __init__(self, mm: MultiLoraModel, hparams: Sequence[TrainHParams]) -> None:
        if len(hparams) != mm.num_loras:
            raise ValueError(f"{len(hparams)} hparams for {mm.num_loras} LoRAs")
        self.mm = mm
        self.hparams = list(hparams)
        self.params = mm.parameters()
        self.masks = mm.grad_masks()
        self.opt = StackedAdamW(self.params, self.hparams)
        k = mm.num_loras
        dev = self.params[0].device
        self.total_steps = torch.tensor([h.total_steps for h in hparams], device=dev)  # (K,)
        self.max_norm = torch.tensor(
            [float("inf") if h.max_grad_norm is None else h.max_grad_norm for h in hparams],
            dtype=torch.float64,
            device=dev,
        )  # (K,)
        self.steps_done = torch.zeros(k, dtype=torch.long, device=dev)  # (K,)
        self.failed = torch.zeros(k, dtype=torch.bool, device=dev)  # (K,)
        self.failed_step: list[int | None] = [None] * k
        self.failure_reason: list[str | None] = [None] * k
        self.last_loss = torch.full(
            (k,), float("nan"), dtype=torch.float64
        )  # (K,) last finite loss per LoRA
        self.loss_history: list[torch.Tensor] = []  # per step: (K,) loss, NaN where inactive

    @property
    def active(self) -> torch.Tensor:
        """(K,) bool: LoRAs that still take updates."""
        return (self.steps_done < self.total_steps) & ~self.failed

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def _fail(self, idx: torch.Tensor, reason: str) -> None:
        for k in idx.nonzero().flatten().tolist():
            self.failed[k] = True
            self.failed_step[k] = int(self.steps_done[k])
            self.failure_reason[k] = reason
            logger.warning("LoRA %d %s at step %d; frozen", k, reason, self.failed_step[k])

    def step(self, closure: Callable[..., torch.Tensor], micro_steps: int = 1) -> torch.Tensor:
        """Run ``closure`` (returns (K,) per-LoRA losses), backprop, clip, update.

        With ``micro_steps > 1`` the closure is called as ``closure(i)`` for each micro-batch and
        must return that micro-batch's share of each LoRA's loss (token-CE sum divided by the
        LoRA's token count over the whole batch), so gradients accumulate to the full-batch ones.
        Returns the (K,) detached losses (NaN for LoRAs that did not train this step).
        """
        self.mm.train()
        for p in self.params:
            p.grad = None
        active = self.active
        k = self.mm.num_loras
        use = active.clone()
        det = torch.zeros(k, dtype=torch.float64, device=active.device)
        for i in range(micro_steps):
            losses = closure(i) if micro_steps > 1 else closure()  # (K,)
            if losses.shape != (k,):
                raise ValueError(f"closure must return ({k},) losses, got {tuple(losses.shape)}")
            finite = torch.isfinite(losses.detach())
            self._fail(use & ~finite, "loss is NaN/inf")
            use = use & finite
            det = det + losses.detach().double()
            if bool(use.any()):
                # torch.where (not multiply): a 0 * NaN would poison the sum's gradient.
                torch.where(use, losses, torch.zeros_like(losses)).sum().backward()
        with torch.no_grad():
            for p, m in zip(self.params, self.masks):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                sel = use.view((-1,) + (1,) * (p.dim() - 1))
                # zero grads of inactive / failed LoRAs and of padded rank entries (exact 0)
                p.grad = torch.where(sel, p.grad * m, torch.zeros_like(p.grad))
            norms = per_lora_grad_norms(self.params)  # (K,)
            bad = use & ~torch.isfinite(norms)
            self._fail(bad, "gradient is NaN/inf")
            update = use & ~bad
            if bool(bad.any()):
                for p in self.params:
                    sel = update.view((-1,) + (1,) * (p.dim() - 1))
                    p.grad = torch.where(sel, p.grad, torch.zeros_like(p.grad))
                norms = torch.where(update, norms, torch.zeros_like(norms))
            clip_grad_norm_per_lora(self.params, self.max_norm, norms)
            self.opt.step(update)
        self.steps_done += update.long()
        out = torch.where(update, det, torch.full_like(det, float("nan"))).cpu().double()
        self.last_loss = torch.where(update.cpu(), out, self.last_loss)
        self.loss_history.append(out)
        return out
