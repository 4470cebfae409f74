"""Shared pieces of the format readers/writers: exact configs, per-module alphas, shapes.

Non-PEFT formats carry an alpha per module (kohya ``.alpha``) or none at all (diffusers without
metadata: alpha = rank). A ``LoraRecord`` keeps each module's alpha and exact scale; whenever a
record leaves as a PEFT config (PEFT folder, diffusers metadata) we must emit a config under which
PEFT recomputes exactly those scales, so ``peft_config_for`` builds ``rank_pattern`` /
``alpha_pattern`` entries anchored to full module names where the record's own config does not
already reproduce them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from lora_zoo.errors import ShapeMismatchError, UnsupportedVariantError
from lora_zoo.record import LoraModule, LoraRecord, pattern_key, peft_rank_alpha_scale

_REL = 1e-6


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL, abs_tol=1e-12)


def module_from_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    alpha: float,
    *,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
) -> LoraModule:
    r = int(A.shape[0])
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    return LoraModule(A, B, float(alpha), float(scale), fan_in_fan_out)


def _targets_cover(targets: Any, names: list[str]) -> bool:
    """PEFT's target_modules rule: list = exact or '.'-suffix match; str = full regex match."""
    if not targets:
        return False
    if isinstance(targets, str):
        return all(re.fullmatch(targets, n) for n in names)
    ts = list(targets)
    return all(any(n == t or n.endswith("." + t) for t in ts) for n in names)


def config_reproduces(config: Mapping[str, Any], record: LoraRecord) -> bool:
    """True when PEFT, given ``config``, computes each module's rank, alpha and scale."""
    if not config or "r" not in config:
        return False
    for name, m in record.modules.items():
        r, alpha, scale = peft_rank_alpha_scale(config, name)
        if r != m.rank or not _close(scale, m.scale) or not _close(alpha, m.alpha):
            return False
    return True


def anchored(name: str) -> str:
    """A rank/alpha pattern key matching exactly this module path (PEFT honours ``^``)."""
    return "^" + re.escape(name)


def peft_config_for(
    record: LoraRecord, *, names: list[str] | None = None, anchor: bool = True
) -> dict[str, Any]:
    """A PEFT LoraConfig dict under which PEFT rebuilds every module's exact scale.

    ``names`` (default: the record's module names) are the names as the target model sees them
    (e.g. with a pipeline component prefix stripped); they must align with ``record.modules``.
    ``anchor=False`` writes pattern keys that match the name as a dotted suffix (needed where the
    loader may drop a leading wrapper such as CLIP's ``text_model.``).
    """
    key = anchored if anchor else re.escape
    names = list(record.modules) if names is None else names
    cfg: dict[str, Any] = {"peft_type": "LORA", "bias": "none", "lora_dropout": 0.0}
    cfg.update({k: v for k, v in record.config.items() if not k.startswith("lora_zoo.")})
    renamed = LoraRecord(dict(zip(names, record.modules.values())), cfg)
    if not config_reproduces(cfg, renamed):
        rslora = bool(cfg.get("use_rslora", False))
        per: dict[str, tuple[int, float]] = {}
        for name, m in renamed.modules.items():
            r = m.rank
            alpha = m.alpha
            expect = alpha / math.sqrt(r) if rslora else alpha / r
            if not _close(expect, m.scale):  # alpha not recoverable: keep the math exact
                alpha = m.scale * (math.sqrt(r) if rslora else r)
            per[name] = (r, float(alpha))
        r0 = Counter(r for r, _ in per.values()).most_common(1)[0][0]
        a0 = Counter(a for _, a in per.values()).most_common(1)[0][0]
        cfg.update(
            r=int(r0),
            lora_alpha=a0,
            use_rslora=rslora,
            rank_pattern={key(n): r for n, (r, _) in per.items() if r != r0},
            alpha_pattern={key(n): a for n, (_, a) in per.items() if a != a0},
        )
    for pat in ("rank_pattern", "alpha_pattern"):  # keys for modules not in this file: drop
        if cfg.get(pat):
            cfg[pat] = {
                k: v for k, v in cfg[pat].items() if any(pattern_key({k: v}, n) for n in names)
            }
    if not _targets_cover(cfg.get("target_modules"), names):
        cfg["target_modules"] = sorted(names)
    cfg["fan_in_fan_out"] = any(m.fan_in_fan_out for m in record.modules.values())
    if record.is_dora or "use_dora" in cfg:  # the magnitudes decide, not a stale config flag
        cfg["use_dora"] = record.is_dora
    return cfg


# tensor-name markers of the variants kohya / LyCORIS / diffusers files carry, and what each is
_EXTRACT = (
    "lora-zoo stores plain LoRA (and PEFT DoRA) factors only (docs/FORMAT.md, 'LyCORIS and "
    "other variants'); merge it into its base model and extract a plain LoRA of the rank you "
    "choose from the weight difference (e.g. kohya sd-scripts' networks/extract_lora_from_"
    "models.py), then ingest that"
)
VARIANT_MARKERS: dict[str, tuple[str, str]] = {
    "hada_": ("LyCORIS LoHa (ΔW = (B1 A1) ⊙ (B2 A2), Hadamard product)", _EXTRACT),
    "lokr_": ("LyCORIS LoKr (ΔW = W1 ⊗ (B2 A2), Kronecker product)", _EXTRACT),
    "lora_mid": ("LyCORIS LoCon with Tucker decomposition (lora_mid)", _EXTRACT),
    "oft_": ("OFT / BOFT (orthogonal finetuning)", _EXTRACT),
    ".diff": ("LyCORIS full-weight difference (.diff)", _EXTRACT),
    "dora_scale": (
        "DoRA in kohya / LyCORIS layout (dora_scale)",
        "its magnitude axis (per input or per output feature) depends on the trainer's "
        "settings, which the file does not record; re-save it in PEFT's layout "
        "(lora_magnitude_vector per output feature, use_dora: true) and ingest that folder",
    ),
}


def refuse_variant(key: str, *, file: Any = None) -> None:
    """Raise ``UnsupportedVariantError`` naming the variant a tensor name belongs to and what a
    user can do, if it belongs to one; return otherwise."""
    for marker, (what, todo) in VARIANT_MARKERS.items():
        if marker in key:
            raise UnsupportedVariantError(f"{what} is not stored: {todo}", file=file, key=key)


def refuse_dora(record: LoraRecord, fmt: str, *, file: Any = None) -> None:
    """Formats without a DoRA layout PEFT reads back exactly must not drop the magnitudes
    silently (the adapter would load as a different plain LoRA)."""
    dora = [n for n, m in record.modules.items() if m.is_dora]
    if dora:
        raise UnsupportedVariantError(
            f"DoRA adapter ({len(dora)} module(s) carry a magnitude vector): the {fmt} writer has "
            "no DoRA layout PEFT loads back exactly; export it with --format peft",
            file=file,
            key=dora[0],
        )


def delta_shape(m: LoraModule) -> tuple[int, ...]:
    """Shape of the base weight this module's ΔW adds to (the layer's own layout)."""
    if m.is_conv:
        return (int(m.B.shape[0]), *(int(s) for s in m.A.shape[1:]))
    out, inp = int(m.B.shape[0]), int(m.A.shape[1])
    return (inp, out) if m.fan_in_fan_out else (out, inp)


def check_against_shapes(
    record: LoraRecord, shapes: Mapping[str, tuple[int, ...]], *, file: str | None, what: str
) -> None:
    """Every module must exist in ``shapes`` (name -> base weight shape) with the same shape."""
    for name, m in record.modules.items():
        if name not in shapes:
            raise ShapeMismatchError(f"no such module in {what}", file=file, key=name)
        got, want = delta_shape(m), tuple(shapes[name])
        if got != want:
            raise ShapeMismatchError(
                f"LoRA changes a weight of shape {got} but {what} has {want}",
                file=file,
                key=name,
            )
