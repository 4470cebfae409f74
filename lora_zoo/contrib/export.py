"""Export one LoRA of a zoo as a file its target tool loads (PEFT folder, diffusers or kohya
file). The zoo row's weights are a PEFT state dict plus config; the format writers rebuild each
tool's own layout from the ``LoraRecord`` so alpha (and every module's exact scale) survives."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from lora_zoo.contrib.formats import format_names, write_adapter
from lora_zoo.errors import SelectionError
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraRecord

log = logging.getLogger(__name__)


def find_record(
    zoo_path: str | os.PathLike[str], lora_id: str, *, revision: str | None = None
) -> LoraRecord:
    """The validated record of ``lora_id`` in any split; the error suggests close ids."""
    zoo = load_zoo(zoo_path, revision=revision)
    all_ids: list[str] = []
    for split in zoo.splits:
        sp = zoo[split]
        if lora_id in sp.index:
            return sp.record(lora_id, validate=True)
        all_ids += sp.ids
    close = difflib.get_close_matches(lora_id, all_ids, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise SelectionError(f"no LoRA {lora_id!r} in this zoo{hint}", file=zoo_path, key="lora_id")


def export_lora(
    zoo_path: str | os.PathLike[str],
    lora_id: str,
    format: str,
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
) -> Path:
    """Write ``lora_id`` of the zoo as ``format`` at ``out``; returns the path written."""
    if format not in format_names():
        raise SelectionError(f"format must be one of {', '.join(format_names())}", key="format")
    rec = find_record(zoo_path, lora_id, revision=revision)
    path = write_adapter(rec, out, format)
    log.info("exported %s from %s as %s: %s", lora_id, zoo_path, format, path)
    return path
