"""The streaming path of ``lora-zoo bench`` (``--stream``): train, validate and test from
``LoraIterableDataset`` minibatches, so only one minibatch of decoded LoRAs is in memory at a
time and peak memory does not grow with the number of LoRAs.

Why a second path: the in-memory path collates each split once (fast, exact, fine up to ~10^4
small LoRAs) but holds every LoRA's view, which is what stops a paper-size zoo (10^4 SD-sized
LoRAs, tens of GB of factors) on one machine. Here the labels are read from the Arrow table
alone (no weights decoded), every LoRA is found by its ``lora_id`` (its row in the train
split), and the fit / validation carve, the learning-curve subsets and the permuted-labels
control are all lookups into those label rows, so they mean exactly what they mean in memory.
What differs: minibatches come from a seeded shuffle buffer over row groups (not a global
permutation), each epoch reads the train split twice (training on the fit rows, then the
validation loss over the validation rows with the epoch's final weights), and the model's fixed
input scaling (``calibrate``) is fitted on the first ``calibrate_rows`` fit rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from lora_zoo.load.collate import label_masks, labels_to_batch
from lora_zoo.load.datasets import LoraIterableDataset

__all__ = ["batches", "split_labels", "stream_predict", "stream_train_epoch", "stream_val_loss"]

Mapper = Callable[[dict[str, Any]], dict[str, Any]]


def split_labels(split: Any, columns: list[str]) -> dict[str, Any]:
    """The split's ids and label columns as a batch (``labels``, ``label_mask``), read from the
    Arrow table without decoding a weight."""
    t = split.table(columns=["lora_id", *columns])
    cols = {c: t.column(c).to_pylist() for c in columns}
    return {
        "lora_id": t.column("lora_id").to_pylist(),
        "labels": labels_to_batch(cols),
        "label_mask": label_masks(cols),
    }


def batches(
    split: Any,
    view: str,
    batch_size: int,
    device: torch.device,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: int = 0,
) -> Iterator[dict[str, Any]]:
    """Collated minibatches of ``view`` (a seeded shuffle buffer of ``shuffle`` rows, or the
    split's order)."""
    ds = LoraIterableDataset(
        split, view, batch_size=batch_size, shuffle_buffer=shuffle, seed=seed, device=device
    )
    ds.set_epoch(epoch)
    yield from ds


def batch_rows(batch: dict[str, Any], pos: dict[str, int], keep: set[int]) -> torch.Tensor:
    """(rows of the batch whose LoRA is in ``keep``, as batch indices)."""
    return torch.tensor(
        [i for i, lid in enumerate(batch["lora_id"]) if pos[lid] in keep], dtype=torch.long
    )


def take(modules: dict[str, dict[str, torch.Tensor]], idx: torch.Tensor) -> dict[str, Any]:
    return {n: {k: t[idx.to(t.device)] for k, t in m.items()} for n, m in modules.items()}


def stream_train_epoch(
    step: Callable[[dict[str, Any], torch.Tensor], None],
    source: Callable[[int], Iterator[dict[str, Any]]],
    epoch: int,
    pos: dict[str, int],
    fit: set[int],
    y: torch.Tensor,
) -> int:
    """One pass over the train split: ``step(modules, targets)`` on each minibatch's fit rows.
    Returns the number of rows trained on."""
    seen = 0
    for batch in source(epoch):
        idx = batch_rows(batch, pos, fit)
        if len(idx) == 0:
            continue
        rows = torch.tensor([pos[batch["lora_id"][int(i)]] for i in idx])
        step(take(batch["modules"], idx), y[rows])
        seen += len(idx)
    return seen


def stream_val_loss(
    loss_sum: Callable[[dict[str, Any], torch.Tensor], tuple[float, int]],
    source: Iterator[dict[str, Any]],
    pos: dict[str, int],
    valid: set[int],
    y: torch.Tensor,
) -> float:
    """The validation loss over the validation rows, accumulated minibatch by minibatch as
    (sum, count), so it equals the in-memory loss over all validation rows at once."""
    total, count = 0.0, 0
    for batch in source:
        idx = batch_rows(batch, pos, valid)
        if len(idx) == 0:
            continue
        rows = torch.tensor([pos[batch["lora_id"][int(i)]] for i in idx])
        s, c = loss_sum(take(batch["modules"], idx), y[rows])
        total, count = total + s, count + c
    return total / count if count else math.inf


def stream_predict(
    predict: Callable[[dict[str, Any]], np.ndarray],
    source: Iterator[dict[str, Any]],
    ids: list[str],
) -> np.ndarray:
    """Predictions for every LoRA of ``ids``, in that order, from minibatches in any order
    (``predict`` gets the whole collated batch: its modules and their ``module_info``)."""
    at = {lid: i for i, lid in enumerate(ids)}
    out: np.ndarray | None = None
    for batch in source:
        p = predict(batch)
        if out is None:
            out = np.zeros((len(ids), *p.shape[1:]), dtype=p.dtype)
        out[[at[lid] for lid in batch["lora_id"]]] = p
    assert out is not None, "empty test split"
    return out
