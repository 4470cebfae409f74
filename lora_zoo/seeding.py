"""The one place seeds are derived, for every stage (build, load, lol, builders).

Why here, at the bottom of the layers beside ``errors``: a rule "derive seeds only in seeding"
can only hold if every stage may import it; it used to live in ``build/`` above ``load/``, so
loaders and the bench did ``seed + 7919`` instead. Never do arithmetic on a seed: ask for a
named sub-stream (``sub_seed(seed, "augment")``), so two streams never collide by accident and
adding one never shifts another. ``tests/unit/test_seeding.py`` scans the tree for
``seed + <int>`` / ``seed * <int>`` and fails.

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
import random

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


def sub_seed(seed: int, *names: str, bits: int = 63) -> int:
    """A named sub-stream of any integer ``seed`` (a JobSpec stream, a bench repeat, a user's
    ``--seed``): ``sha256("lora-zoo/sub/v1/{seed}/{name}/{name}...")``, top ``bits`` bits.
    Distinct names give independent seeds; the formula is fixed (outputs of builders depend on it)."""
    if bits not in (31, 63):
        raise ValueError(f"bits must be 31 or 63, got {bits}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"sub_seed needs one or more non-empty names, got {names!r}")
    msg = "/".join(("lora-zoo/sub/v1", str(seed), *names)).encode()
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big") >> (64 - bits)


def augment_seed(seed: int, epoch: int, index: int, module: str) -> int:
    """The GL-augmentation seed for (seed, epoch, LoRA index, module): the same R every run, on
    every worker, whatever the batch composition (Python's ``hash()`` is salted per process; this
    is not). Its own formula (blake2b, kept from format version 1 so augmented runs repeat)."""
    h = hashlib.blake2b(f"gl_augment|{seed}|{epoch}|{index}|{module}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def shuffle_rng(seed: int, epoch: int, worker: int) -> random.Random:
    """The streaming loader's shuffle-buffer draw for (seed, epoch, worker): ``random.Random``
    seeded by a string is hashed with SHA-512 by CPython, stable across runs and versions."""
    return random.Random(f"lora-zoo/stream/{seed}/{epoch}/{worker}")
