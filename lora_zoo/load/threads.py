"""Torch intra-op threading for many small ops (batched decoding, r x r linear algebra), without
touching torch's process-wide thread setting.

Why: decoding is memory-bound and the symmetry views are many tiny LAPACK/GEMM calls: an
intra-op parallel region on cores shared with anything else (a training step, other processes)
stalls on its OpenMP barrier. Measured on 2 cores with one busy: decode 2-10x slower with 2
threads; 256 Qwen2-0.5B-sized LoRAs through the loader, canonical 1.10 s -> 0.23 s and svals
0.37 s -> 0.14 s single-threaded.

How, and why not ``torch.set_num_threads``: that call is process state. Besides the calling
thread's OpenMP setting it stores the count torch hands every thread created later (its lazy
per-thread initialisation reads it), resizes the shared pthreadpool and sets MKL's count, so
toggling it around a view leaks into a training loop running beside it, into threads started
meanwhile, and races with another thread doing the same. OpenMP's ``nthreads-var`` is a
*per-thread* setting (OpenMP 4.5, sec. 2.3), and torch's CPU parallel regions (ATen's OpenMP
backend) size themselves from it (``at::get_num_threads() == omp_get_max_threads()``). So
``single_threaded`` sets it for the calling thread only, through the OpenMP runtime torch
already loaded, and restores it: other threads and torch's stored default never change
(``torch.get_num_threads()`` seen from any other thread stays what it was; tests check it).

Where the runtime is not reachable (torch built without OpenMP, or with a runtime whose symbols
are not exported), the context is a no-op: the work runs with the thread's normal count, which
is slower on busy cores but gives the same numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _omp() -> Any | None:
    """The process's OpenMP runtime (the one torch loaded), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(None)  # symbols already loaded into the process (torch's libgomp/iomp)
        get, set_ = lib.omp_get_max_threads, lib.omp_set_num_threads
    except (OSError, AttributeError):
        logger.debug("OpenMP runtime not reachable; single_threaded() is a no-op")
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    set_.restype, set_.argtypes = None, [ctypes.c_int]
    return lib


def thread_count() -> int:
    """The calling thread's intra-op thread count (what torch's next parallel region uses)."""
    return int(torch.get_num_threads())


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch CPU ops on the calling thread only; nothing global changes."""
    lib = _omp()
    if lib is None:
        yield
        return
    n = thread_count()  # also runs torch's lazy per-thread init first, so it cannot undo ours
    if n == 1:
        yield
        return
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        lib.omp_set_num_threads(n)
