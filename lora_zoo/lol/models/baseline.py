"""The baseline: predicts from the fit rows' labels alone, never from the weights, so every
other model's score reads as "how much do the weights tell beyond the label statistics"."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lora_zoo.lol.models import register_model


@register_model("baseline", symmetry={"-": "-"}, order=0, label_only=True)
def baseline_predict(task: Any, y_fit: torch.Tensor, n: int) -> np.ndarray:
    """Majority class per label (probability = the fit rows' positive rate, so AUROC is 0.5) /
    the most frequent class / the fit rows' mean value."""
    if task.kind == "binary":
        rate = torch.nanmean(y_fit, 0).numpy()  # (k,)
        p = np.where(rate > 0.5, 0.5 + 1e-6, 0.5 - 1e-6)  # majority decision, constant score
        return np.broadcast_to(p, (n, len(rate))).copy()
    if task.kind == "multiclass":
        counts = np.bincount(y_fit[y_fit >= 0].numpy(), minlength=len(task.classes))
        p = np.zeros((n, len(task.classes)))
        p[:, int(counts.argmax())] = 1.0
        return p
    return np.broadcast_to(np.array(task.mean), (n, len(task.mean))).copy()
