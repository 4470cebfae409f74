"""Safe reading of one tensor file: safetensors only, pickles refused, truncation named.

Adapter files come from strangers. The only decoder we run on their bytes is safetensors, after
checking the header ourselves so a truncated or lying file gets a message naming the file and the
tensor instead of a Rust panic. Pickle-based checkpoints (``.bin/.pt/.ckpt/.pth``, or pickle
bytes under any name) are refused; converting them needs an explicit opt-in and then uses
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from lora_zoo.errors import CorruptFileError, FileTooLargeError, PickleRefusedError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 << 20


def convert_hint(path: str | os.PathLike[str]) -> str:
    return (
        f"convert it yourself with safetensors (`safetensors.torch.save_file(torch.load('{path}', "
        "weights_only=True), 'adapter.safetensors')`) or pass --allow-pickle-conversion "
        "(uses torch.load(weights_only=True))"
    )


def looks_pickled(data: bytes) -> bool:
    """Pickle protocol 2-5 opcodes, or a zip archive (torch.save's default container)."""
    if len(data) > 9 and data[8:9] == b"{":
        return False
    return data[:2] == b"PK" or (data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05")


def check_size(path: Path, max_bytes: int | None) -> int:
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise FileTooLargeError(
            f"file is {size:,} bytes, over the limit of {max_bytes:,} bytes "
            "(raise --max-file-mb to accept it)",
            file=path,
        )
    return size


def parse_header(data: bytes, *, file: str | os.PathLike[str]) -> dict[str, Any]:
    """The safetensors JSON header, checked against the byte count (truncation, overlaps)."""
    if len(data) < 8:
        raise CorruptFileError(f"only {len(data)} bytes: not a safetensors file", file=file)
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CorruptFileError(
            f"header claims {n} bytes but the file has {len(data)}: truncated or not safetensors",
            file=file,
        )
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"safetensors header is not JSON ({e})", file=file) from e
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", file=file)
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            nbytes = _DTYPE_BYTES.get(info["dtype"], 0)
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"malformed tensor entry ({e})", file=file, key=key) from e
        if end > body:
            raise CorruptFileError(
                f"tensor data ends at byte {end} of the data section but only {body} bytes "
                "are present: the file is truncated",
                file=file,
                key=key,
            )
        if nbytes and end - start != numel * nbytes:
            raise CorruptFileError(
                f"tensor needs {numel * nbytes} bytes but its offsets span {end - start}",
                file=file,
                key=key,
            )
    return header


def decode_safetensors(
    data: bytes, *, file: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of safetensors ``data``; pickles refused."""
    if looks_pickled(data):
        raise PickleRefusedError(
            "these bytes are a pickle / torch.save archive, not safetensors; " + convert_hint(file),
            file=file,
        )
    header = parse_header(data, file=file)
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # SafetensorError and friends: always name the file
        raise CorruptFileError(f"not valid safetensors ({e})", file=file) from e
    meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in meta.items()}


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
