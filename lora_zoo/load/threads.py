"""Torch intra-op threading for many small ops (batched decoding, r x r linear algebra)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on the calling thread only.

    Decoding is memory-bound and the symmetry views are many tiny LAPACK/GEMM calls: an intra-op
    parallel region on cores shared with anything else (a training step, other processes) stalls
    on its OpenMP barrier. Measured on 2 cores with one busy: decode 2-10x slower with 2 threads;
    256 Qwen2-0.5B-sized LoRAs through the loader, canonical 1.10 s -> 0.23 s and svals 0.37 s ->
    0.14 s single-threaded (on idle cores 2 threads were ~10% faster for svals only). DataLoader
    workers already run with one thread; this covers ``num_workers=0``. Toggling costs well
    under a microsecond.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
