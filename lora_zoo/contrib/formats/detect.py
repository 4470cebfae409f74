"""Which format is this file? Decided from the tensor names, never from the file name.

Each format module exposes ``sniff(keys, path)``; the first that claims the keys wins. A folder
with ``adapter_config.json`` is PEFT. Detection reads only the safetensors header (no tensors).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_zoo.contrib.formats import diffusers, kohya, peft
from lora_zoo.contrib.formats.files import PICKLE_SUFFIXES, check_size
from lora_zoo.errors import CorruptFileError, UnknownLayoutError
from lora_zoo.weights import header_length, looks_pickled, parse_header

FORMATS = {"peft": peft, "diffusers": diffusers, "kohya": kohya}


def header_keys(path: Path, max_bytes: int | None = None) -> list[str]:
    """Tensor names from the safetensors header only (cheap, safe on untrusted bytes); [] when
    the header does not pass the one decoder's check (the format reader then names why)."""
    size = check_size(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            n = header_length(head, size, file=str(path))
        except CorruptFileError:
            return []
        body = f.read(n)
    if looks_pickled(head + body[:2]):
        return []
    try:
        return list(parse_header(body, size, file=str(path)).names)
    except CorruptFileError:
        return []


def detect_format(path: str | os.PathLike[str], max_bytes: int | None = None) -> str:
    """'peft' | 'diffusers' | 'kohya' for an adapter folder or file; UnknownLayoutError else."""
    p = Path(path)
    if p.is_dir():
        if peft.sniff([], p):
            return "peft"
        if (p / diffusers.DEFAULT_WEIGHT_NAME).is_file():
            return "diffusers"
        raise UnknownLayoutError(
            f"folder has neither {peft.CONFIG_NAME} nor {diffusers.DEFAULT_WEIGHT_NAME}", file=p
        )
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return "peft" if (p.parent / peft.CONFIG_NAME).is_file() else "kohya"  # refused later
    keys = header_keys(p, max_bytes)
    if not keys:
        return "peft"  # unreadable header: let the reader raise the precise error
    for name in ("kohya", "diffusers", "peft"):
        if FORMATS[name].sniff(keys, None):
            return name
    sample = next((k for k in keys if "lora" not in k.lower()), keys[0])
    raise UnknownLayoutError(
        "tensor names match none of the PEFT / diffusers / kohya LoRA layouts", file=p, key=sample
    )
