"""Mixed precision for the batched pass: autocast of the base model's matmuls, factors in fp32.

Why autocast and not a bf16 base: on a GPU the base matmuls dominate and run 2-8x faster in
bf16, while the LoRA factors, their gradients and AdamW's moments stay float32 (the engine's
optimizer math is exact float32 AdamW); the loss is computed from upcast logits by the
builders. The error this adds is measured against float32 in tests/builders/test_engine_precision.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device | str, dtype: str = "none") -> Any:
    """``torch.autocast`` for ``device``'s type with ``dtype`` (a name of AUTOCAST_DTYPES);
    ``"none"`` is a no-op context, so callers need not branch."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype {dtype!r}: one of {sorted(AUTOCAST_DTYPES)}")
    dt = AUTOCAST_DTYPES[dtype]
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dt)
