"""diffusers LoRA files: one safetensors with ``unet.`` / ``text_encoder.`` prefixed keys.

Layouts read:
- current (``save_lora_weights``): ``unet.<path>.lora_A.weight`` / ``lora_B.weight``, with the
  per-component LoraConfig in the header's ``lora_adapter_metadata`` (``unet.r``,
  ``unet.lora_alpha``, ...);
- older: ``unet.<path>.lora.down/up.weight`` (+ ``<path>.alpha``), text-encoder
  ``lora_linear_layer.down/up``, and attention-processor keys
  ``unet...attn1.processor.to_q_lora.down.weight`` (also without the ``unet.`` prefix).
Without metadata or ``.alpha`` keys diffusers uses alpha = rank (scale 1); we do the same, and
always write the metadata so alpha survives the trip.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from lora_zoo._io import natural_key
from lora_zoo.contrib.formats.common import (
    config_reproduces,
    module_from_factors,
    peft_config_for,
    refuse_dora,
    refuse_variant,
)
from lora_zoo.contrib.formats.files import read_tensor_file
from lora_zoo.contrib.formats.naming import UNET, canonical, old_diffusers_path, split_component
from lora_zoo.contrib.formats.registry import AdapterFormat, register_format
from lora_zoo.errors import (
    CorruptFileError,
    MissingPairError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedVariantError,
)
from lora_zoo.record import LoraModule, LoraRecord, peft_rank_alpha_scale

log = logging.getLogger(__name__)

NAME = "diffusers"
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS = ("unet", "text_encoder_2", "text_encoder")
_META_FIELDS = (
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora",
    "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights",
)  # fmt: skip
_KEY = re.compile(
    r"^(?:(unet|text_encoder_2|text_encoder)\.)?(.+)\.(lora_A|lora_B|down|up)\.weight$"
)
_ALPHA = re.compile(r"^(?:(unet|text_encoder_2|text_encoder)\.)?(.+)\.alpha$")


def sniff(keys: Iterable[str], path: str | os.PathLike[str] | None = None) -> bool:
    ks = list(keys)
    if not ks:
        return False
    prefixed = all(k.startswith(_COMPONENTS) for k in ks)
    lora = all("lora" in k or k.endswith(".alpha") for k in ks)
    old_procs = all("processor." in k and "_lora." in k for k in ks)
    return (prefixed and lora) or old_procs


def _module_path(comp: str, body: str, kind: str, *, file: str, key: str) -> str:
    if kind in ("lora_A", "lora_B"):
        return body
    for suffix in (".lora", ".lora_linear_layer"):
        if body.endswith(suffix):
            return body[: -len(suffix)]
    if body.endswith("_lora"):
        return old_diffusers_path(body, comp)
    raise UnknownLayoutError("not a diffusers LoRA key", file=file, key=key)


def _component_configs(meta: dict[str, str], file: str) -> dict[str, dict[str, Any]]:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"metadata is not JSON ({e})", file=file, key=METADATA_KEY) from e
    out: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        for comp in _COMPONENTS:
            if k.startswith(comp + "."):
                out.setdefault(comp, {})[k[len(comp) + 1 :]] = v
                break
    return out


def from_state_dict(
    state: dict[str, torch.Tensor], meta: dict[str, str] | None = None, *, file: str = ""
) -> LoraRecord:
    meta = meta or {}
    factors: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, t in state.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedVariantError(
                "DoRA in a diffusers pipeline file: lora-zoo reads DoRA from PEFT adapter "
                "folders (one model, adapter_config.json with use_dora: true); save the adapted "
                "model's adapter with PEFT's save_pretrained and ingest that folder",
                file=file,
                key=key,
            )
        refuse_variant(key, file=file)
        m = _ALPHA.match(key)
        if m:
            comp = m.group(1) or UNET
            path = (
                old_diffusers_path(m.group(2), comp) if m.group(2).endswith("_lora") else m.group(2)
            )
            path = re.sub(r"\.(lora|lora_linear_layer)$", "", path)
            alphas[(comp, path)] = float(t.float().item())
            continue
        m = _KEY.match(key)
        if m is None:
            raise UnknownLayoutError(
                "tensor name is not a diffusers LoRA key ('<component>.<module>.lora_A.weight' "
                "or '.lora.down.weight')",
                file=file,
                key=key,
            )
        comp = m.group(1) or UNET
        path = _module_path(comp, m.group(2), m.group(3), file=file, key=key)
        which = "A" if m.group(3) in ("lora_A", "down") else "B"
        factors.setdefault((comp, path), {})[which] = (key, t)
    configs = _component_configs(meta, file)
    modules: dict[str, LoraModule] = {}
    for comp, path in sorted(factors, key=lambda cp: (cp[0] != UNET, natural_key(cp[1]))):
        pair = factors[(comp, path)]
        if "A" not in pair or "B" not in pair:
            have = pair.get("A") or pair.get("B")
            assert have is not None
            raise MissingPairError(
                f"{'down/lora_A' if 'A' in pair else 'up/lora_B'} factor has no partner",
                file=file,
                key=have[0],
            )
        A, B = pair["A"][1], pair["B"][1]
        r = int(A.shape[0])
        name = canonical(comp, path)
        if comp in configs:
            cr, alpha, scale = peft_rank_alpha_scale(configs[comp], path)
            if cr != r:
                raise ShapeMismatchError(
                    f"factors have rank {r} but {METADATA_KEY} gives r={cr}",
                    file=file,
                    key=pair["A"][0],
                )
            modules[name] = LoraModule(A, B, alpha, scale)
        else:
            modules[name] = module_from_factors(A, B, alphas.get((comp, path), float(r)))
    unused = set(alphas) - set(factors)
    if unused:
        comp, path = sorted(unused)[0]
        raise MissingPairError("alpha without LoRA factors", file=file, key=f"{comp}.{path}.alpha")
    rec = LoraRecord(modules, {})
    unet_cfg = configs.get(UNET)
    if unet_cfg and all(split_component(n)[0] == UNET for n in modules):
        cfg = {"peft_type": "LORA", **unet_cfg}
        if config_reproduces(cfg, rec):
            rec.config = cfg
    if not rec.config:
        rec.config = peft_config_for(rec)
    rec.validate(file=file)
    return rec


def read(
    path: str | os.PathLike[str],
    *,
    allow_pickle_conversion: bool = False,
    max_bytes: int | None = None,
) -> LoraRecord:
    p = Path(path)
    if p.is_dir():
        p = p / DEFAULT_WEIGHT_NAME
    state, meta = read_tensor_file(
        p, allow_pickle_conversion=allow_pickle_conversion, max_bytes=max_bytes
    )
    return from_state_dict(state, meta, file=str(p))


def to_state_dict(record: LoraRecord) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    refuse_dora(record, "diffusers", file=record.lora_id)
    by_comp: dict[str, dict[str, LoraModule]] = {}
    for name, m in record.modules.items():
        comp, path = split_component(name)
        by_comp.setdefault(comp, {})[path] = m
    state: dict[str, torch.Tensor] = {}
    flat_meta: dict[str, Any] = {}
    for comp, mods in by_comp.items():
        if comp == UNET:
            cfg = peft_config_for(LoraRecord(mods, dict(record.config)))
        else:  # diffusers drops CLIP's "text_model." for flattened models: suffix patterns
            short = [p.removeprefix("text_model.") for p in mods]
            cfg_in = {"use_rslora": bool(record.config.get("use_rslora", False))}
            cfg = peft_config_for(LoraRecord(mods, cfg_in), names=short, anchor=False)
        for k in _META_FIELDS:
            if k in cfg:
                v = cfg[k]
                flat_meta[f"{comp}.{k}"] = sorted(v) if isinstance(v, set | tuple) else v
        for path, m in mods.items():
            state[f"{comp}.{path}.lora_A.weight"] = m.A.contiguous()
            state[f"{comp}.{path}.lora_B.weight"] = m.B.contiguous()
    meta = {"format": "pt", METADATA_KEY: json.dumps(flat_meta, sort_keys=True)}
    return state, meta


def write(record: LoraRecord, path: str | os.PathLike[str]) -> Path:
    """Write a file ``pipe.load_lora_weights`` loads; a folder path gets the default name."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / DEFAULT_WEIGHT_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    state, meta = to_state_dict(record)
    p.write_bytes(st_save(state, metadata=meta))
    log.info("wrote diffusers LoRA %s (%d modules)", p, len(record))
    return p


register_format(
    AdapterFormat(
        NAME, sniff, read, write, key_order=20, folder_marker=DEFAULT_WEIGHT_NAME, folder_order=20
    )
)
