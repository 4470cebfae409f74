"""The adapter-format registry (``FORMATS``): one ``AdapterFormat`` per format module of this
folder. Kept apart from the package's ``__init__`` so format modules and ``detect`` can import
it without importing each other."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    packages=("lora_zoo.contrib.formats",),
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
