"""Causal-LM per-LoRA losses over a grouped (K*b, T) batch (the engine stays family-agnostic).

Why each LoRA's loss is the mean over its *own* tokens and the total is their sum: the gradient
of LoRA k's factors then equals what a separate run on LoRA k's batch would get, whatever the
other LoRAs' batch sizes or token counts are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_zoo.engine import IGNORE_INDEX


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
