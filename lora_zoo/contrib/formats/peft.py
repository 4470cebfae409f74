"""PEFT adapters: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``.

The zoo's own weight column is this layout, so reading is mostly validation: the config must
parse, the factors must pair up and agree with the config's ranks (``rank_pattern`` included).
Writing emits a config under which ``PeftModel.from_pretrained`` recomputes every module's exact
scale (see ``common.peft_config_for``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_zoo.contrib.formats.common import peft_config_for
from lora_zoo.contrib.formats.files import PICKLE_SUFFIXES, read_tensor_file
from lora_zoo.contrib.formats.naming import split_component
from lora_zoo.contrib.formats.registry import AdapterFormat, register_format
from lora_zoo.errors import CorruptFileError, MissingAlphaError, UnsupportedVariantError
from lora_zoo.record import LoraRecord

log = logging.getLogger(__name__)

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def sniff(keys: Iterable[str], path: str | os.PathLike[str] | None = None) -> bool:
    """A folder with adapter_config.json, or tensor names in PEFT's ``lora_A/lora_B`` layout
    without a pipeline-component prefix."""
    if path is not None and Path(path).is_dir():
        return (Path(path) / CONFIG_NAME).is_file()
    ks = list(keys)
    return bool(ks) and all(
        (".lora_A." in k or ".lora_B." in k) and not k.startswith(("unet.", "text_encoder"))
        for k in ks
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"adapter config is not readable JSON ({e})", file=path) from e
    if not isinstance(cfg, dict):
        raise CorruptFileError("adapter config is not a JSON object", file=path)
    for key in ("r", "lora_alpha"):
        if key in cfg and not isinstance(cfg[key], int | float):
            raise CorruptFileError(f"must be a number, got {cfg[key]!r}", file=path, key=key)
    return cfg


def weights_file(folder: Path) -> Path:
    """The folder's safetensors weights, or a PickleRefusedError for a .bin-only folder."""
    st = folder / WEIGHTS_NAME
    if st.is_file():
        return st
    for suffix in PICKLE_SUFFIXES:
        cand = folder / f"adapter_model{suffix}"
        if cand.is_file():
            return cand  # read_tensor_file refuses it unless conversion is allowed
    raise CorruptFileError(f"PEFT folder has {CONFIG_NAME} but no {WEIGHTS_NAME}", file=folder)


def read(
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    allow_pickle_conversion: bool = False,
    max_bytes: int | None = None,
) -> LoraRecord:
    """Read a PEFT folder (or a PEFT-layout .safetensors file next to / with its config)."""
    p = Path(path)
    if p.is_dir():
        cfg_path, wpath = p / CONFIG_NAME, weights_file(p)
    else:
        cfg_path, wpath = p.parent / CONFIG_NAME, p
    state, meta = read_tensor_file(
        wpath, allow_pickle_conversion=allow_pickle_conversion, max_bytes=max_bytes
    )
    if config is None:
        if cfg_path.is_file():
            config = read_config(cfg_path)
        elif "lora_zoo.config" in meta:
            config = json.loads(meta["lora_zoo.config"])
        elif "lora_adapter_metadata" in meta:  # diffusers ``save_lora_adapter`` files
            config = json.loads(meta["lora_adapter_metadata"])
        else:
            raise MissingAlphaError(
                f"PEFT weights without {CONFIG_NAME}: rank/alpha (the scale) are unknown; "
                "ingest the whole adapter folder",
                file=wpath,
                key=CONFIG_NAME,
            )
    return LoraRecord.from_peft_state_dict(state, config, file=str(wpath))


def write(record: LoraRecord, path: str | os.PathLike[str]) -> Path:
    """Write a PEFT adapter folder loadable by ``PeftModel.from_pretrained``."""
    comps = {split_component(n)[0] for n in record.modules}
    if comps - {"unet"}:
        raise UnsupportedVariantError(
            f"this LoRA adapts pipeline components {sorted(comps)}; a PEFT folder adapts one "
            "model: export it as diffusers or kohya instead",
            file=path,
            key="format",
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = peft_config_for(record)
    rec = LoraRecord(record.modules, cfg, record.lora_id)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (out / WEIGHTS_NAME).write_bytes(rec.to_safetensors_bytes())
    log.info("wrote PEFT adapter %s (%d modules)", out, len(record))
    return out


register_format(
    AdapterFormat(
        NAME, sniff, read, write, key_order=30, folder_marker=CONFIG_NAME, folder_order=10
    )
)
