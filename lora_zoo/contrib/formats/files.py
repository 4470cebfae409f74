"""Safe reading of one tensor file: safetensors only, pickles refused, truncation named.

Adapter files come from strangers. The only decoder we run on their bytes is safetensors, after
checking the header ourselves so a truncated or lying file gets a message naming the file and the
tensor instead of a Rust panic. Pickle-based checkpoints (``.bin/.pt/.ckpt/.pth``, or pickle
bytes under any name) are refused; converting them needs an explicit opt-in and then uses
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from lora_zoo.errors import CorruptFileError, FileTooLargeError, PickleRefusedError
from lora_zoo.weights import looks_pickled, parse_safetensors

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"


def convert_hint(path: str | os.PathLike[str]) -> str:
    return (
        f"convert it yourself with safetensors (`safetensors.torch.save_file(torch.load('{path}', "
        "weights_only=True), 'adapter.safetensors')`) or pass --allow-pickle-conversion "
        "(uses torch.load(weights_only=True))"
    )


def check_size(path: Path, max_bytes: int | None) -> int:
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise FileTooLargeError(
            f"file is {size:,} bytes, over the limit of {max_bytes:,} bytes "
            "(raise --max-file-mb to accept it)",
            file=path,
        )
    return size


def decode_safetensors(
    data: bytes, *, file: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of safetensors ``data``; pickles refused."""
    if looks_pickled(data):
        raise PickleRefusedError(
            "these bytes are a pickle / torch.save archive, not safetensors; " + convert_hint(file),
            file=file,
        )
    header = parse_safetensors(data, file=str(file))  # the one decoder's structural check
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # SafetensorError and friends: always name the file
        raise CorruptFileError(f"not valid safetensors ({e})", file=file) from e
    return tensors, dict(header.metadata)


def _load_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """The one sanctioned unpickling: tensors and plain containers only (weights_only=True)."""
    try:
        # weights_only=True refuses arbitrary classes; reached only behind the explicit
        # --allow-pickle-conversion flag.
        obj = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251
    except Exception as e:
        raise CorruptFileError(
            f"torch.load(weights_only=True) refused or failed ({e})", file=path
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CorruptFileError("pickle does not hold a flat {name: tensor} state dict", file=path)
    log.warning("%s: converted a pickle checkpoint with torch.load(weights_only=True)", path)
    return {k: v.contiguous() for k, v in obj.items()}


def read_tensor_file(
    path: str | os.PathLike[str],
    *,
    allow_pickle_conversion: bool = False,
    max_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one file, refusing pickles unless explicitly allowed."""
    p = Path(path)
    if not p.is_file():
        raise CorruptFileError("no such file", file=p)
    check_size(p, max_bytes)
    pickled_suffix = p.suffix.lower() in PICKLE_SUFFIXES
    if pickled_suffix and not allow_pickle_conversion:
        raise PickleRefusedError(
            f"{p.suffix} checkpoints are pickles and are never unpickled; " + convert_hint(p),
            file=p,
        )
    data = p.read_bytes()
    if pickled_suffix or (allow_pickle_conversion and looks_pickled(data)):
        return _load_pickle_weights_only(p), {}
    return decode_safetensors(data, file=p)
