"""Where and with what a zoo was built: versions, hardware, git commit, builder, wall times.

Why: a LoRA zoo is a measurement. Two zoos built from one recipe should be identical on the
same machine, and explainably different elsewhere (other torch, other GPU); provenance is how a
user finds out which. Wall times are kept here (a side table in ``info.provenance``), never in
the zoo's rows, so the rows of a resumed build are byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_zoo import env

log = logging.getLogger(__name__)

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "diffusers",
    "datasets",
    "pyarrow",
    "safetensors",
    "huggingface_hub",
    "numpy",
    "pydantic",
    "lora-zoo",
)


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of the libraries a reader looks for first (None: not installed)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def git_commit(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """Commit (and whether the tree is dirty) of the lora-zoo source, if it is a git checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment() -> dict[str, Any]:
    """Versions, interpreter, OS, hardware, BLAS and every installed distribution of this
    process (``env.capture``), plus the short library table and the lora-zoo git commit."""
    return {**env.capture(), "libraries": library_versions(), "lora_zoo_git": git_commit()}


def timing_summary(wall_times: Mapping[str, float], device: str) -> dict[str, Any]:
    """Per-LoRA wall seconds plus totals; hours are counted as GPU hours on a CUDA device and
    CPU hours otherwise (wall time of the process, not CPU time summed over cores)."""
    total = float(sum(wall_times.values()))
    gpu = device.startswith("cuda")
    return {
        "device": device,
        "wall_time_s": {k: round(float(v), 4) for k, v in wall_times.items()},
        "total_wall_s": round(total, 3),
        "cpu_hours": 0.0 if gpu else round(total / 3600, 6),
        "gpu_hours": round(total / 3600, 6) if gpu else 0.0,
    }


def collect(
    builder: Mapping[str, Any],
    wall_times: Mapping[str, float],
    device: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``provenance`` entry of a zoo's info."""
    return {
        "environment": environment(),
        "builder": dict(builder),
        "timing": timing_summary(wall_times, device),
        **(extra or {}),
    }
