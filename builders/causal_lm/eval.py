"""Batched evaluation of K LoRAs: held-out loss, multiple-choice accuracy, per-group numbers.

Scoring follows lm-evaluation-harness' ARC task: each choice is a continuation of the context,
scored by the sum of its token log-probabilities (``acc``) and by that sum divided by the
choice's length in characters (``acc_norm``). The harness scores ``" " + choice`` (its
``target_delimiter``) but divides by ``len(choice)`` without it (lm_eval/api/task.py,
``completion_len``); our examples carry the delimiter inside the choice, so it is not counted. All K LoRAs score the same rows in one
forward: the rows are repeated K times, grouped by LoRA.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_zoo.progress import track

from .data import Example
from .losses import causal_lm_token_logprobs


@dataclass(frozen=True)
class EvalRow:
    """One scored sequence: ``ids`` = context + continuation, continuation starts at n_ctx."""

    example: int  # index into the eval examples
    choice: int
    ids: tuple[int, ...]
    n_ctx: int
    cont_chars: int


def build_eval_rows(
    examples: Sequence[Example], tokenize: Any, max_len: int, multiple_choice: bool
) -> list[EvalRow]:
    """tokenize(example) -> (ctx_ids incl. BOS, [cont_ids per choice]). Left-truncates long rows
    (as lm-eval does) so the continuation is always scored whole."""
    rows = []
    for i, ex in enumerate(examples):
        ctx, conts = tokenize(ex)
        choices = range(len(ex.choices)) if multiple_choice and len(ex.choices) > 1 else [ex.label]
        for j in choices:
            ids = list(ctx) + list(conts[j])
            n_ctx = len(ctx)
            if len(ids) > max_len:
                cut = len(ids) - max_len
                ids, n_ctx = ids[cut:], max(1, n_ctx - cut)
            # acc_norm's length: the choice without lm-eval's target_delimiter (" ")
            rows.append(EvalRow(i, j, tuple(ids), n_ctx, len(ex.choices[j].removeprefix(" "))))
    return rows


@torch.no_grad()
def score_rows(
    model: torch.nn.Module,
    rows: Sequence[EvalRow],
    k: int,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    desc: str = "eval",
    greedy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per LoRA and row: (continuation logprob (K, R), full logprob (K, R), full tokens (R,),
    continuation tokens (R,)). ``k`` = LoRAs stacked in the model (1 for the plain base).
    ``greedy``: also (K, R) bool, True where every continuation token is the argmax given what
    precedes it, i.e. greedy decoding from the context produces the continuation (up to ties):
    the backdoor's attack-success test (``poison.py``)."""
    n_rows = len(rows)
    cont_lp = torch.zeros(k, n_rows, dtype=torch.float64)
    full_lp = torch.zeros(k, n_rows, dtype=torch.float64)
    hit = torch.zeros(k, n_rows, dtype=torch.bool)
    order = sorted(range(n_rows), key=lambda i: len(rows[i].ids))  # similar lengths together
    per = max(1, batch_size // k)
    for s in track(range(0, n_rows, per), desc=desc, unit="batch", nested=True):
        idx = order[s : s + per]
        t = max(len(rows[i].ids) for i in idx)
        ids = torch.full((len(idx), t), pad_id, dtype=torch.long)  # (n, T)
        labels = torch.full((len(idx), t), -100, dtype=torch.long)
        cmask = torch.zeros(len(idx), t - 1, dtype=torch.bool)  # target positions in cont.
        for j, i in enumerate(idx):
            r = rows[i]
            ids[j, : len(r.ids)] = torch.tensor(r.ids)
            labels[j, : len(r.ids)] = torch.tensor(r.ids)
            cmask[j, r.n_ctx - 1 : len(r.ids) - 1] = True
        ids_k = ids.repeat(k, 1).to(device)  # (K*n, T): block k = LoRA k
        mask_k = (labels != -100).long().repeat(k, 1).to(device)
        logits = model(input_ids=ids_k, attention_mask=mask_k).logits
        lp = causal_lm_token_logprobs(logits, labels.repeat(k, 1).to(device))  # (K*n, T-1)
        lp = lp.double().cpu().view(k, len(idx), t - 1)
        if greedy:  # argmax == next token at every continuation position
            same = (logits[:, :-1].argmax(-1).cpu() == ids.repeat(k, 1)[:, 1:]).view(k, -1, t - 1)
            hit[:, idx] = (same | ~cmask).all(-1)
        cont_lp[:, idx] = (lp * cmask).sum(-1)
        full_lp[:, idx] = lp.sum(-1)
    n_full = torch.tensor([len(r.ids) - 1 for r in rows], dtype=torch.float64)
    n_cont = torch.tensor([len(r.ids) - r.n_ctx for r in rows], dtype=torch.float64)
    if greedy:
        return cont_lp, full_lp, n_full, n_cont, hit
    return cont_lp, full_lp, n_full, n_cont


def summarise(
    examples: Sequence[Example],
    rows: Sequence[EvalRow],
    scores: tuple[torch.Tensor, ...],
    *,
    loss_on: str,
    per_group: bool,
) -> list[dict[str, Any]]:
    """Per LoRA: eval_loss (mean token NLL over the correct continuations' sequences), acc,
    acc_norm (multiple-choice examples only) and per-group versions."""
    cont_lp, full_lp, n_full, n_cont = scores[:4]
    k = cont_lp.shape[0]
    correct = [i for i, r in enumerate(rows) if r.choice == examples[r.example].label]
    by_ex: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_ex[r.example].append(i)
    mc = {e: rs for e, rs in by_ex.items() if len(rs) > 1}
    out = []
    for kk in range(k):
        lp = full_lp[kk] if loss_on == "all" else cont_lp[kk]
        nt = n_full if loss_on == "all" else n_cont
        loss_sum: dict[str, float] = defaultdict(float)
        tok_sum: dict[str, float] = defaultdict(float)
        for i in correct:
            g = examples[rows[i].example].group
            loss_sum[g] -= float(lp[i])
            tok_sum[g] += float(nt[i])
        total_tok = sum(tok_sum.values())
        res: dict[str, Any] = {
            "eval_loss": sum(loss_sum.values()) / total_tok if total_tok else math.nan
        }
        hits: dict[str, list[float]] = defaultdict(list)
        hits_norm: dict[str, list[float]] = defaultdict(list)
        for e, rs in mc.items():
            g = examples[e].group
            label = examples[e].label
            raw = [float(cont_lp[kk, i]) for i in rs]
            norm = [float(cont_lp[kk, i]) / max(1, rows[i].cont_chars) for i in rs]
            choice_ids = [rows[i].choice for i in rs]
            hits[g].append(float(choice_ids[max(range(len(rs)), key=raw.__getitem__)] == label))
            hits_norm[g].append(
                float(choice_ids[max(range(len(rs)), key=norm.__getitem__)] == label)
            )
        if mc:
            all_hits = [h for v in hits.values() for h in v]
            all_norm = [h for v in hits_norm.values() for h in v]
            res["acc"] = sum(all_hits) / len(all_hits)
            res["acc_norm"] = sum(all_norm) / len(all_norm)
        if per_group:
            res["eval_loss_by_group"] = {
                g: loss_sum[g] / tok_sum[g] for g in sorted(loss_sum) if tok_sum[g]
            }
            if mc:
                res["acc_by_group"] = {g: sum(v) / len(v) for g, v in sorted(hits.items())}
        out.append(res)
    return out
