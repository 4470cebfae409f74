"""kohya-ss / A1111 LoRA files: ``lora_unet_<path_with_underscores>.lora_down.weight``,
``.lora_up.weight`` and a scalar ``.alpha`` per module (``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` for text encoders).

The scale is alpha / rank; a module without ``.alpha`` is refused (MissingAlphaError) unless the
caller opts into kohya's old default alpha = rank, because guessing changes the weights by a
factor. Our own exports also store the dotted names and the PEFT config in the header metadata,
so they round-trip exactly even when the ``_`` flattening is ambiguous.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

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
from lora_zoo.contrib.formats.naming import kohya_name, kohya_to_canonical, split_component
from lora_zoo.contrib.formats.registry import AdapterFormat, register_format
from lora_zoo.errors import (
    MissingAlphaError,
    MissingPairError,
    NonFiniteError,
    UnknownLayoutError,
)
from lora_zoo.record import LoraModule, LoraRecord, peft_rank_alpha_scale

log = logging.getLogger(__name__)

NAME = "kohya"
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_SUFFIX = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}
NAMES_KEY = "lora_zoo.names"
CONFIG_KEY = "lora_zoo.config"


def sniff(keys: Iterable[str], path: str | os.PathLike[str] | None = None) -> bool:
    ks = list(keys)
    return bool(ks) and all(k.startswith(_PREFIXES) for k in ks)


def _group_keys(
    state: dict[str, torch.Tensor], file: str
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """kohya name -> {"A" | "B" | "alpha": (key, tensor)}; any other key is refused by name."""
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in state.items():
        refuse_variant(key, file=file)  # LoHa, LoKr, Tucker, OFT, diff, kohya DoRA: by name
        lora_name, which = None, None
        for suffix, w in _SUFFIX.items():
            if key.endswith(suffix):
                lora_name, which = key[: -len(suffix)], w
                break
        if lora_name is None or not key.startswith(_PREFIXES):
            raise UnknownLayoutError(
                "tensor name is not a kohya LoRA key ('lora_unet_<module>.lora_down.weight', "
                "'.lora_up.weight' or '.alpha')",
                file=file,
                key=key,
            )
        parts.setdefault(lora_name, {})[which] = (key, t)
    return parts


def _alpha(
    lora_name: str, p: dict[str, tuple[str, torch.Tensor]], r: int, file: str, assume: bool
) -> float:
    """The module's alpha: its ``.alpha`` scalar, or r when the user accepts kohya's old default."""
    if "alpha" in p:
        at = p["alpha"][1]
        if at.numel() != 1:
            raise UnknownLayoutError(
                f"alpha must be a scalar, got shape {tuple(at.shape)}", file=file, key=p["alpha"][0]
            )
        alpha = float(at.float().item())
        if not math.isfinite(alpha):
            raise NonFiniteError("alpha is not finite", file=file, key=p["alpha"][0])
        return alpha
    if assume:
        return float(r)
    raise MissingAlphaError(
        "kohya module has no .alpha (its scale is unknown; kohya's old default is "
        "alpha = rank: pass --assume-alpha-equals-rank to accept that)",
        file=file,
        key=f"{lora_name}.alpha",
    )


def _restored(modules: dict[str, LoraModule], meta: dict[str, str]) -> LoraRecord:
    """Our own export carries the original config: restore it (and alphas, e.g. rsLoRA's) when
    it reproduces every rank and scale; otherwise the record gets a config derived from it."""
    rec = LoraRecord(modules, {})
    if CONFIG_KEY in meta:
        cfg = json.loads(meta[CONFIG_KEY])
        fifo = bool(cfg.get("fan_in_fan_out", False))
        restored = {
            n: LoraModule(m.A, m.B, *peft_rank_alpha_scale(cfg, n)[1:], fifo)
            for n, m in modules.items()
        }
        if config_reproduces(cfg, LoraRecord(restored, cfg)):
            rec = LoraRecord(restored, cfg)
    if not rec.config:
        rec.config = peft_config_for(rec)
    return rec


def from_state_dict(
    state: dict[str, torch.Tensor],
    meta: dict[str, str] | None = None,
    *,
    file: str = "",
    known_modules: Iterable[str] | None = None,
    assume_alpha_equals_rank: bool = False,
) -> LoraRecord:
    meta = meta or {}
    names: dict[str, str] = json.loads(meta[NAMES_KEY]) if NAMES_KEY in meta else {}
    known = list(known_modules) if known_modules is not None else None
    modules: dict[str, LoraModule] = {}
    for lora_name, p in _group_keys(state, file).items():
        if "A" not in p or "B" not in p:
            have = (p.get("A") or p.get("B") or p["alpha"])[0]
            missing = "lora_up" if "A" in p else "lora_down"
            raise MissingPairError(f"no matching {missing} weight", file=file, key=have)
        A, B = p["A"][1], p["B"][1]
        alpha = _alpha(lora_name, p, int(A.shape[0]), file, assume_alpha_equals_rank)
        name = names.get(lora_name) or kohya_to_canonical(lora_name, known, file=file)
        if name in modules:
            raise UnknownLayoutError(
                f"two kohya names map to module {name!r}", file=file, key=lora_name
            )
        modules[name] = module_from_factors(A, B, alpha)
    modules = {
        k: modules[k]
        for k in sorted(modules, key=lambda n: (split_component(n)[0] != "unet", natural_key(n)))
    }
    rec = _restored(modules, meta)
    rec.validate(file=file)
    return rec


def read(
    path: str | os.PathLike[str],
    *,
    known_modules: Iterable[str] | None = None,
    assume_alpha_equals_rank: bool = False,
    allow_pickle_conversion: bool = False,
    max_bytes: int | None = None,
) -> LoraRecord:
    state, meta = read_tensor_file(
        path, allow_pickle_conversion=allow_pickle_conversion, max_bytes=max_bytes
    )
    return from_state_dict(
        state,
        meta,
        file=str(path),
        known_modules=known_modules,
        assume_alpha_equals_rank=assume_alpha_equals_rank,
    )


def to_state_dict(record: LoraRecord) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya has no rsLoRA: the stored alpha is scale * rank, which equals the original alpha
    for plain LoRA and keeps the weights exact otherwise."""
    refuse_dora(record, "kohya", file=record.lora_id)
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for name, m in record.modules.items():
        kn = kohya_name(name)
        if kn in names:
            raise UnknownLayoutError(
                f"modules {names[kn]!r} and {name!r} flatten to the same kohya name", key=kn
            )
        names[kn] = name
        state[f"{kn}.lora_down.weight"] = m.A.contiguous()
        state[f"{kn}.lora_up.weight"] = m.B.contiguous()
        state[f"{kn}.alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
    ranks = sorted({m.rank for m in record.modules.values()})
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0),
        NAMES_KEY: json.dumps(names, sort_keys=True),
        CONFIG_KEY: json.dumps(peft_config_for(record), sort_keys=True),
    }
    return state, meta


def write(record: LoraRecord, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / "lora.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    state, meta = to_state_dict(record)
    p.write_bytes(st_save(state, metadata=meta))
    log.info("wrote kohya LoRA %s (%d modules)", p, len(record))
    return p


register_format(
    AdapterFormat(
        NAME,
        sniff,
        read,
        write,
        key_order=10,
        read_options=("known_modules", "assume_alpha_equals_rank"),
    )
)
