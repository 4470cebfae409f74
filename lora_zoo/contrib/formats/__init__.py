"""Adapter file formats: PEFT folders, diffusers LoRA files, kohya / A1111 files.

``read_adapter`` / ``write_adapter`` convert between files and ``LoraRecord``. Every format is
one module of this folder that registers an ``AdapterFormat`` (``sniff`` / ``read`` / ``write``
plus how detection finds it) with ``register_format``; ``FORMATS`` (a
``lora_zoo.registry.Registry``) imports the folder's modules on the first lookup, so a new
format is ONE new file here plus its tests. ``detect`` picks one from the tensor names;
``naming`` maps every tool's module names to one canonical naming.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_zoo.contrib.formats.registry import (
    FORMATS,
    AdapterFormat,
    format_names,
    register_format,
)
from lora_zoo.record import LoraRecord


def _format(fmt: str, path: Any = None) -> AdapterFormat:
    return FORMATS.get(fmt, file=None if path is None else str(path))


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
    spec = _format(fmt, path)
    options = {
        "known_modules": known_modules,
        "assume_alpha_equals_rank": assume_alpha_equals_rank,
    }
    rec = spec.read(
        path,
        allow_pickle_conversion=allow_pickle_conversion,
        max_bytes=max_bytes,
        **{k: v for k, v in options.items() if k in spec.read_options},
    )
    if rec.lora_id is None:
        p = Path(path)
        rec.lora_id = p.name if p.is_dir() else p.stem
    return rec


def write_adapter(record: LoraRecord, path: str | os.PathLike[str], format: str = "peft") -> Path:
    """Write ``record`` as ``format``; returns the file or folder written."""
    return _format(format, path).write(record, path)


__all__ = [
    "FORMATS",
    "AdapterFormat",
    "format_names",
    "read_adapter",
    "register_format",
    "write_adapter",
]
