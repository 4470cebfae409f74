"""How much memory a batched pass of K LoRAs needs, before it runs.

Why: K is the one knob that trades memory for speed (the base matmuls are shared, the
activations grow with K). A build that picks K too large dies an hour in with an OOM on a GPU;
an estimate logged before the build (and checked against the CPU allocator in
tests/builders/test_engine_memory.py) lets one pick K from the table instead.

Model (all terms in bytes)::

    total(K) = base                      every parameter and buffer of the model (resident)
             + K * lora_state            per LoRA: factors + grads + 2 AdamW moments, fp32
             + K * rows * per_row        activations autograd saves for backward, per row
             + K * rows * transient      the largest saved tensor once more: its gradient is
                                         alive beside the saved tensors at the start of backward

``per_row`` and ``transient`` are not modelled per architecture (attention kernels, fused
norms and dtypes all differ): they are *measured* by one probe forward/backward of a single
row with ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps,
whatever the model. Activations are linear in the number of rows (K*b rows of the same length),
so the probe at one row scales exactly, up to allocator rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora_zoo.engine.layers import MultiLoraLinear

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one batched pass of ``k`` LoRAs with ``rows`` rows each (see module docstring)."""

    k: int
    rows: int
    base: int
    lora_state: int  # per LoRA
    per_row: int  # saved activations per row
    transient: int  # per row

    @property
    def total(self) -> int:
        return self.base + self.k * (self.lora_state + self.rows * (self.per_row + self.transient))

    def at(self, k: int) -> MemoryEstimate:
        """The same model and rows at another K."""
        return MemoryEstimate(
            k, self.rows, self.base, self.lora_state, self.per_row, self.transient
        )


def model_bytes(model: nn.Module) -> int:
    """Parameters + buffers (each tensor once, shared ones too)."""
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def lora_state_bytes(wrappers: Sequence[MultiLoraLinear], r: int) -> int:
    """Per LoRA of rank ``r``: A (r, in) + B (out, r), each with its grad and AdamW's two
    moments, in float32 (the engine's optimizer state is float32 whatever the factor dtype)."""
    return sum(4 * 4 * r * (w.in_features + w.out_features) for w in wrappers)


def _storage_key(t: torch.Tensor) -> int:
    """The identity of a tensor's storage: its StorageImpl, which fake tensors (shapes only,
    ``engine/cost.py``) have too, where every data pointer reads 0."""
    return int(t.untyped_storage()._cdata)


def probe_activations(
    run_one_row: Callable[[], torch.Tensor], model: nn.Module | None = None
) -> tuple[int, int]:
    """(bytes autograd saves, largest single saved tensor) for one row: ``run_one_row`` runs a
    one-row forward and returns the scalar loss; backward is run to free the graph."""
    sizes: dict[int, int] = {}
    # a frozen linear saves its weight (often as a transposed view, so not a Parameter
    # instance) for the input gradient: that memory is ``base``, already resident
    resident = set()
    if model is not None:
        resident = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # storage identity: a view saved twice must be counted once
        st = t.untyped_storage()
        if _storage_key(t) not in resident and st.nbytes() > 0:
            sizes[_storage_key(t)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run_one_row()
    if loss.requires_grad:
        loss.backward()
    return sum(sizes.values()), max(sizes.values(), default=0)


def estimate(
    model: nn.Module,
    wrappers: Sequence[MultiLoraLinear],
    *,
    k: int,
    rows: int,
    r: int,
    run_one_row: Callable[[], torch.Tensor],
) -> MemoryEstimate:
    """The estimate for ``k`` LoRAs of rank ``r`` with ``rows`` rows each (module docstring)."""
    per_row, largest = probe_activations(run_one_row, model)
    return MemoryEstimate(
        k=int(k),
        rows=int(rows),
        base=model_bytes(model),
        lora_state=lora_state_bytes(wrappers, r),
        per_row=per_row,
        transient=largest,
    )


def format_table(est: MemoryEstimate, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> str:
    """One line per K: total MiB and its parts, for the log before a build."""
    lines = [f"{'K':>4} {'total MiB':>10} {'base':>8} {'LoRA state':>11} {'activations':>12}"]
    for k in sorted(set(ks) | {est.k}):
        e = est.at(k)
        act = k * e.rows * (e.per_row + e.transient)
        lines.append(
            f"{k:>4} {e.total / 2**20:>10.1f} {e.base / 2**20:>8.1f} "
            f"{k * e.lora_state / 2**20:>11.2f} {act / 2**20:>12.1f}"
            + ("  <-" if k == est.k else "")
        )
    return "\n".join(lines)
