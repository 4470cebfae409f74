"""Adapter file formats: PEFT folders, diffusers LoRA files, kohya / A1111 files.

``read_adapter`` / ``write_adapter`` convert between files and ``LoraRecord``. Every format module
(``peft``, ``diffusers``, ``kohya``) has the same ``sniff`` / ``read`` / ``write``; ``detect`` picks
one from the tensor names; ``naming`` maps every tool's module names to one canonical naming.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_zoo.errors import LoraZooError
from lora_zoo.record import LoraRecord

FORMAT_NAMES = ("peft", "diffusers", "kohya")


def _module(fmt: str, path: Any = None) -> Any:
    from lora_zoo.contrib.formats.detect import FORMATS

    if fmt not in FORMATS:
        raise LoraZooError(
            f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_NAMES)}",
            file=path,
            key="format",
        )
    return FORMATS[fmt]


def read_adapter(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    allow_pickle_conversion: bool = False,
    max_bytes: int | None = None,
    known_modules: Iterable[str] | None = None,
    assume_alpha_equals_rank: bool = False,
) -> LoraRecord:
    """Read one adapter (folder or file) into a validated ``LoraRecord``.

    ``known_modules`` (canonical names of the base architecture) makes kohya's flattened names
    map back exactly. Pickle files are refused unless ``allow_pickle_conversion``.
    """
    from lora_zoo.contrib.formats.detect import detect_format

    fmt = detect_format(path, max_bytes) if format == "auto" else format
    mod = _module(fmt, path)
    kw: dict[str, Any] = {
        "allow_pickle_conversion": allow_pickle_conversion,
        "max_bytes": max_bytes,
    }
    if fmt == "kohya":
        kw.update(known_modules=known_modules, assume_alpha_equals_rank=assume_alpha_equals_rank)
    rec = mod.read(path, **kw)
    if rec.lora_id is None:
        p = Path(path)
        rec.lora_id = p.name if p.is_dir() else p.stem
    return rec


def write_adapter(record: LoraRecord, path: str | os.PathLike[str], format: str = "peft") -> Path:
    """Write ``record`` as ``format``; returns the file or folder written."""
    return _module(format, path).write(record, path)


__all__ = ["FORMAT_NAMES", "read_adapter", "write_adapter"]
