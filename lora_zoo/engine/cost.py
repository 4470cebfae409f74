"""FLOPs and memory of a batched pass at full size, measured without weights or a GPU.

Why: a user picks the accelerator, K and the number of GPU-hours for a zoo of thousands of
LoRAs before downloading a checkpoint or a data set. Two shape-only devices make that free:

* ``meta`` tensors carry shapes and dtypes and no storage: the real transformers / diffusers
  code runs on them in about a second, so ``count_flops`` there is the architecture's exact
  matmul / conv count (torch's ``FlopCounterMode``). On meta, scaled-dot-product attention runs
  its math path (two bmm, counted); the CPU flash kernel has no formula in torch's counter, so
  ``count_flops`` registers one (below), and counts agree on every device.
* ``FakeTensorMode`` tensors claim a real device (CPU) and carry no storage: kernel choice
  follows the CPU's (flash attention, which keeps the logsumexp, not the T x T probabilities,
  as CUDA's flash / memory-efficient kernels do), so ``engine.memory``'s probe of what autograd
  saves gives the activation bytes of a GPU pass to within the kernels' own differences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

_aten = torch.ops.aten
_REGISTERED: list[bool] = []


def _register_cpu_flash() -> None:
    """Formulas for the CPU flash-attention kernels: torch's own ones for the CUDA kernels
    (forward QK^T and PV over the whole s_q x s_k square; backward recomputes the scores and
    takes dV, dP, dQ, dK), so a count does not depend on which device's kernel ran."""
    if _REGISTERED:
        return
    _REGISTERED.append(True)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kw: Any):
        return sdpa_flop_count(query, key, value)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kw: Any) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(run: Callable[[], Any]) -> int:
    """Total FLOPs (multiply-adds count 2) of the matmuls, convolutions and attention ``run``
    executes, forward and any backward inside it."""
    _register_cpu_flash()
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def fake_device() -> Iterator[None]:
    """Tensors made inside claim the CPU and hold no memory (``FakeTensorMode``): modules built
    here cost nothing, and a forward / backward runs the CPU's kernel choice on shapes only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def meta_device() -> contextlib.AbstractContextManager[Any]:
    """Modules and tensors made inside live on ``meta`` (shapes only)."""
    return torch.device("meta")
