"""Per-LoRA losses and batch stacking for a grouped (K*b, ...) batch.

Why each LoRA's loss is the mean over its *own* tokens and the total is their sum: the gradient
of LoRA k's factors then equals what a separate run on LoRA k's batch would get, whatever the
other LoRAs' batch sizes or token counts are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (float32/float64 kept: reference tests run in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def causal_lm_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: logits (N, T, V), labels (N, T) -> (N, T-1).

    Positions whose target is IGNORE_INDEX get 0. Computed in float32 (bf16 logsumexp over a
    150k vocabulary loses the digits accuracy scoring needs).
    """
    lg = _upcast(logits[:, :-1])  # (N, T-1, V)
    tgt = labels[:, 1:]  # (N, T-1)
    valid = tgt != IGNORE_INDEX
    safe = torch.where(valid, tgt, torch.zeros_like(tgt))
    lp = torch.log_softmax(lg, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return lp * valid


def causal_lm_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """((K,) summed token CE, (K,) token counts) for micro-batching: divide each micro-batch's
    sums by the LoRA's token count over the *whole* batch to get the same gradient."""
    n, t, v = logits.shape
    tgt = labels[:, 1:].reshape(-1)  # (K*b*(T-1),)
    ce = F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, v), tgt, ignore_index=IGNORE_INDEX, reduction="none"
    ).view(k, -1)  # (K, b*(T-1)); ignored positions are exactly 0
    valid = (tgt != IGNORE_INDEX).view(k, -1)  # (K, b*(T-1))
    return ce.sum(dim=1), valid.sum(dim=1)


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) next-token cross-entropy, each the mean over that LoRA's non-ignored tokens.

    logits (K*b, T, V), labels (K*b, T). Matches transformers' ForCausalLMLoss (shift by one,
    ignore -100, mean) applied to LoRA k's rows alone. A LoRA without tokens gets 0.
    """
    n, t, v = logits.shape
    tgt = labels[:, 1:].reshape(-1)  # (K*b*(T-1),)
    ce = F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, v), tgt, ignore_index=IGNORE_INDEX, reduction="none"
    ).view(k, -1)  # (K, b*(T-1))
    valid = (tgt != IGNORE_INDEX).view(k, -1).to(ce.dtype)  # (K, b*(T-1))
    count = valid.sum(dim=1)  # (K,)
    return (ce * valid).sum(dim=1) / count.clamp_min(1.0)


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
