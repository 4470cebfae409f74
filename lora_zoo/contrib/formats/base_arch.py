"""Module shapes of a base architecture, from its config alone (no weights, meta device).

Ingest uses them to check that a LoRA fits the model it claims to adapt (every module exists,
every ΔW has the layer's weight shape) and to map kohya's flattened names back exactly. Configs
are JSON; models are instantiated on the meta device from config only, never with
``trust_remote_code``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lora_zoo.contrib.formats.naming import UNET, canonical
from lora_zoo.errors import IngestError

log = logging.getLogger(__name__)
_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def _weight_shapes(model: torch.nn.Module, component: str = UNET) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) or not name:
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and w.dim() in (2, 4):
            out[canonical(component, name)] = tuple(int(s) for s in w.shape)
    return out


def _model_from_config(cfg_path: Path) -> torch.nn.Module:
    cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        if "_class_name" in cfg:  # a diffusers model config
            import diffusers

            cls = getattr(diffusers, str(cfg["_class_name"]), None)
            if cls is None or not hasattr(cls, "from_config"):
                raise IngestError(f"unknown diffusers class {cfg['_class_name']!r}", file=cfg_path)
            return cls.from_config(cfg)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        tcfg = AutoConfig.from_pretrained(str(cfg_path.parent))  # local JSON only
        try:
            return AutoModelForCausalLM.from_config(tcfg)
        except ValueError:
            return AutoModel.from_config(tcfg)


def module_shapes(base: str | os.PathLike[str]) -> dict[str, tuple[int, ...]] | None:
    """{canonical module name: weight shape} for a local config.json, a model folder or a
    diffusers pipeline folder (model_index.json); None for anything else (e.g. a Hub id
    while offline), in which case shape checks against the base are skipped."""
    p = Path(base)
    try:
        if p.is_file():
            return _weight_shapes(_model_from_config(p))
        if (p / "model_index.json").is_file():
            shapes: dict[str, tuple[int, ...]] = {}
            if (p / "unet" / "config.json").is_file():
                shapes.update(_weight_shapes(_model_from_config(p / "unet" / "config.json")))
            for comp in _TEXT_COMPONENTS:
                if (p / comp / "config.json").is_file():
                    m = _model_from_config(p / comp / "config.json")
                    shapes.update(_weight_shapes(m, comp))
            return shapes
        if (p / "config.json").is_file():
            return _weight_shapes(_model_from_config(p / "config.json"))
    except IngestError:
        raise
    except Exception as e:  # a config transformers / diffusers cannot build
        raise IngestError(
            f"cannot build the base architecture from its config ({e})", file=p
        ) from e
    log.warning("%s: not a local config; LoRAs are not checked against the base model", base)
    return None
