"""One optimisation step for K LoRAs at once, with per-LoRA stopping and failure isolation, and
the stacking of K per-LoRA batches into one grouped (K*b, ...) batch.

Why failures are per LoRA: in a zoo sweep some hyperparameter draws diverge (lr 1e-3 on a tiny
batch). One NaN must cost that LoRA only, not the K-1 others sharing its pass; and a LoRA that
finished its steps must not drift while the others go on (AdamW's weight decay alone would move
it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from lora_zoo.engine.model import MultiLoraModel
from lora_zoo.engine.optim import (
    StackedAdamW,
    TrainHParams,
    clip_grad_norm_per_lora,
    per_lora_grad_norms,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = (
    -100
)  # the label of a position that carries no loss (PyTorch's cross-entropy default)


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


def stack_rows(
    per_lora: Sequence[Mapping[str, torch.Tensor] | None],
    pad: Mapping[str, int | float],
    rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack K per-LoRA batches (each key (b_k, T_k)) into (K*rows, T_max) tensors.

    Sequences are right-padded with ``pad[key]``; LoRAs with fewer rows (or ``None``: done or
    failed) are filled with whole padding rows. Padding rows keep attention_mask 1 (a fully
    masked row gives NaN in some attention kernels) and labels IGNORE_INDEX, so they carry zero
    loss weight; right padding cannot change a causal model's outputs at real positions.
    """
    present = [b for b in per_lora if b is not None]
    if not present:
        raise ValueError("stack_rows needs at least one non-empty batch")
    keys = list(present[0].keys())
    b_max = rows if rows is not None else max(int(b[keys[0]].shape[0]) for b in present)
    t_max = max(int(b[key].shape[1]) for b in present for key in keys)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        ref = present[0][key]
        fill_row = 1 if key == "attention_mask" else pad[key]
        parts = []
        for b in per_lora:
            block = torch.full((b_max, t_max), fill_row, dtype=ref.dtype, device=ref.device)
            if b is not None:
                x = b[key]  # (b_k, T_k)
                if x.shape[0] > b_max:
                    raise ValueError(f"{key}: {x.shape[0]} rows > rows={b_max}")
                block[: x.shape[0]] = pad[key]
                block[: x.shape[0], : x.shape[1]] = x
            parts.append(block)
        out[key] = torch.cat(parts, dim=0)  # (K*b_max, T_max)
    return out
