"""Which format is this file? Decided from the tensor names, never from the file name.

Each registered format (``FORMATS``) has ``sniff(keys, path)``; in ``key_order``, the first that
claims the keys wins. A folder is the first format (``folder_order``) whose ``folder_marker``
file it holds (``adapter_config.json``: PEFT). Detection reads only the safetensors header (no
tensors).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_zoo.contrib.formats.files import PICKLE_SUFFIXES, check_size
from lora_zoo.contrib.formats.registry import FORMATS, AdapterFormat
from lora_zoo.errors import CorruptFileError, UnknownLayoutError
from lora_zoo.weights import header_length, looks_pickled, parse_header


def _formats(order: str) -> list[AdapterFormat]:
    return sorted((f for _, f in FORMATS.items()), key=lambda f: (getattr(f, order), f.name))


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
    """The registered format of an adapter folder or file; UnknownLayoutError else."""
    p = Path(path)
    if p.is_dir():
        marked = [f for f in _formats("folder_order") if f.folder_marker]
        for f in marked:
            if (p / str(f.folder_marker)).is_file():
                return f.name
        raise UnknownLayoutError(
            f"folder has none of {', '.join(str(f.folder_marker) for f in marked)}", file=p
        )
    if p.suffix.lower() in PICKLE_SUFFIXES:
        marker = str(FORMATS.get("peft").folder_marker)  # adapter_config.json beside it: PEFT
        return "peft" if (p.parent / marker).is_file() else "kohya"  # refused later
    keys = header_keys(p, max_bytes)
    if not keys:
        return "peft"  # unreadable header: let the reader raise the precise error
    by_keys = _formats("key_order")
    for f in by_keys:
        if f.sniff(keys, None):
            return f.name
    sample = next((k for k in keys if "lora" not in k.lower()), keys[0])
    raise UnknownLayoutError(
        f"tensor names match none of the {' / '.join(f.name for f in by_keys)} LoRA layouts",
        file=p,
        key=sample,
    )
