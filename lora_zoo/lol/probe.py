"""A small, honest LoL probe: does a LoRA's weight view predict what it was trained on?

Used by the quick start (``lora-zoo demo``) and by tests to check that a zoo's labels carry
signal. Deliberately simple (standardised features, L2 logistic regression, k-fold CV, torch
only) so a positive result says something about the zoo, not about the probe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    target: str
    n: int
    positives: int
    accuracy: float  # cross-validated
    baseline: float  # majority-class accuracy (what "chance" means for an imbalanced label)

    @property
    def lift(self) -> float:
        return self.accuracy - self.baseline


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 300) -> torch.Tensor:
    """Full-batch L-BFGS on the L2-regularised logistic loss; returns weights (d+1,)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, d+1)
    w = torch.zeros(xb.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y)
        loss = loss + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def cross_val_accuracy(
    x: torch.Tensor, y: torch.Tensor, *, folds: int = 5, l2: float = 1e-2, seed: int = 0
) -> float:
    """k-fold accuracy of a logistic-regression probe; standardisation fit on train folds only."""
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for f in range(folds):
        test = perm[f::folds]
        mask = torch.ones(n, dtype=torch.bool)
        mask[test] = False
        xtr, ytr = x[mask], y[mask]
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
        w = _fit_logreg((xtr - mu) / sd, ytr, l2)
        xte = torch.cat([(x[test] - mu) / sd, torch.ones(len(test), 1, dtype=x.dtype)], 1)
        correct += int(((xte @ w > 0).to(y.dtype) == y[test]).sum())
    return correct / n


def membership_probe(
    features: torch.Tensor,
    memberships: Sequence[Sequence[str]],
    groups: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
) -> list[ProbeResult]:
    """One binary probe per group: "was group g in this LoRA's training data?"."""
    x = features.to(torch.float64)
    out = []
    for g in groups:
        y = torch.tensor([float(g in m) for m in memberships], dtype=torch.float64)
        pos = int(y.sum())
        base = max(pos, len(y) - pos) / len(y)
        if pos in (0, len(y)):
            logger.warning("group %s is in all or none of the LoRAs; skipped", g)
            continue
        acc = cross_val_accuracy(x, y, folds=folds, seed=seed)
        out.append(ProbeResult(g, len(y), pos, acc, base))
    return out


def format_table(results: Sequence[ProbeResult], feature_name: str) -> str:
    lines = [
        f"probe on the {feature_name!r} view: predict 'group g was in the LoRA's training data'",
        f"{'group':<14}{'LoRAs':>6}{'with g':>8}{'chance':>8}{'probe acc':>11}{'lift':>7}",
    ]
    for r in results:
        lines.append(
            f"{r.target:<14}{r.n:>6}{r.positives:>8}{r.baseline:>8.2f}"
            f"{r.accuracy:>11.2f}{r.lift:>+7.2f}"
        )
    if results:
        mean_acc = sum(r.accuracy for r in results) / len(results)
        mean_base = sum(r.baseline for r in results) / len(results)
        lines.append(
            f"{'mean':<14}{'':>6}{'':>8}{mean_base:>8.2f}{mean_acc:>11.2f}"
            f"{mean_acc - mean_base:>+7.2f}"
        )
    return "\n".join(lines)
