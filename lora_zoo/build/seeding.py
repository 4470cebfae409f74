"""The one place seeds are derived.

Why a hash and not ``np.random.SeedSequence`` or ``random.Random(seed + index)``: a zoo must be
reproducible from its recipe years later, on another OS, with other numpy/torch versions. A
seed derived by hashing a fixed, documented string with SHA-256 depends on nothing but that
string. Adding a LoRA (index) or a new stream never changes the seeds of existing ones, so a
partial rebuild (``only_ids``) and a sharded build give exactly the seeds of a full build.

Derivation (version 1, stable forever; a change means a new ``SEED_SCHEME``)::

    digest = sha256(f"lora-zoo/seed/v1/{recipe_seed}/{index}/{stream}".encode("utf-8"))
    seed   = int.from_bytes(digest[:8], "big") >> (64 - bits)        # bits = 63 (default) or 31

63 bits fit a signed int64 (``torch.Generator.manual_seed``, Arrow int64 columns); 31 bits fit
APIs that want a non-negative int32. ``index = -1`` is the recipe-level stream (draws shared by
all jobs). A stream name is one of ``STREAMS`` optionally followed by ``/<sub-name>`` (e.g.
``hparams/lr``: each varied hparam gets its own stream, so adding a new varied hparam to a
recipe does not change the values drawn for the others).
"""

from __future__ import annotations

import hashlib

import numpy as np

SEED_SCHEME = "lora-zoo/seed/v1"

#: Named streams. init: LoRA factor init; data: subset draw + data order; dropout: LoRA dropout
#: masks; noise / timestep: diffusion noise and timesteps; eval: evaluation sampling; hparams:
#: sampling varied hyperparameters; subset: choosing data groups.
STREAMS: tuple[str, ...] = (
    "init",
    "data",
    "dropout",
    "noise",
    "timestep",
    "eval",
    "hparams",
    "subset",
)

#: The streams handed to builders in ``JobSpec.seeds`` (hparams / subset are used by plan.py).
JOB_STREAMS: tuple[str, ...] = ("init", "data", "dropout", "noise", "timestep", "eval")


def _check_stream(stream: str) -> None:
    base = stream.split("/", 1)[0]
    if base not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; streams are {', '.join(STREAMS)}")


def derive_seed(recipe_seed: int, index: int, stream: str, bits: int = 63) -> int:
    """Seed for (recipe seed, job index, stream); see the module docstring for the formula."""
    if bits not in (31, 63):
        raise ValueError(f"bits must be 31 or 63, got {bits}")
    if isinstance(recipe_seed, bool) or not isinstance(recipe_seed, int):
        raise TypeError(f"recipe_seed must be an int, got {type(recipe_seed).__name__}")
    if isinstance(index, bool) or not isinstance(index, int) or index < -1:
        raise ValueError(f"index must be an int >= -1, got {index!r}")
    _check_stream(stream)
    msg = f"{SEED_SCHEME}/{recipe_seed}/{index}/{stream}".encode()
    digest = hashlib.sha256(msg).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def job_seeds(recipe_seed: int, index: int) -> dict[str, int]:
    """The ``JobSpec.seeds`` dict: one independent 63-bit seed per builder-facing stream."""
    return {s: derive_seed(recipe_seed, index, s) for s in JOB_STREAMS}


def rng(recipe_seed: int, index: int, stream: str) -> np.random.Generator:
    """A numpy Generator (PCG64) seeded from ``derive_seed``; PCG64's output for a given seed
    is part of numpy's stability promise, so draws are reproducible across versions."""
    return np.random.Generator(np.random.PCG64(derive_seed(recipe_seed, index, stream)))
