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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_zoo.errors import SelectionError
from lora_zoo.record import LoraRecord
from lora_zoo.registry import Registry


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter file format.

    ``sniff(keys, path)``: do these tensor names (or this folder) look like the format?
    ``read(path, *, allow_pickle_conversion, max_bytes, **options)`` -> LoraRecord, where
    ``options`` are the names in ``read_options``; ``write(record, path)`` -> the path written.
    ``key_order``: files are offered to the formats' ``sniff`` in this order (the most specific
    layout first). ``folder_marker``: a file whose presence makes a folder this format, checked
    in ``folder_order``."""

    name: str
    sniff: Callable[..., bool]
    read: Callable[..., LoraRecord]
    write: Callable[[LoraRecord, str | os.PathLike[str]], Path]
    key_order: int = 100
    folder_marker: str | None = None
    folder_order: int = 100
    read_options: tuple[str, ...] = ()


#: every adapter format by name: this package's modules, run-time registrations, entry points
FORMATS: Registry[AdapterFormat] = Registry(
    "adapter format",
    key="format",
    error=SelectionError,
    packages=(__name__,),
    entry_points="lora_zoo.formats",
    hint="a format is one file in lora_zoo/contrib/formats/ calling register_format",
)


def register_format(fmt: AdapterFormat, *, replace: bool = False) -> AdapterFormat:
    """Register ``fmt`` under ``fmt.name`` (a format module calls this at import)."""
    FORMATS.add(fmt.name, fmt, replace=replace, key_order=fmt.key_order)
    return fmt


def format_names() -> list[str]:
    """Every registered format name (for choices, help and errors)."""
    return FORMATS.names()


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
