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
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    """Installed versions (None for a library that is not installed)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of visible CUDA devices (empty without torch / CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken driver must not break a build's bookkeeping
        log.debug("no GPU info: %s", e)
    return []


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
    """Versions, interpreter, OS and hardware of this process."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    return {
        "libraries": library_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "gpus": gpu_names(),
        "lora_zoo_git": git_commit(),
    }


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
