"""GL-net presets: the LoL papers' model sizes, one per task family, chosen by ``lora-zoo bench``.

Why presets: GL-net's quality depends on its size far more than on anything else the bench
varies. The class default (width 8, two gated layers, a two-layer head of 128) is a CPU-cheap
net that trails the dense-ΔW MLP and O-Align; the papers' GL-net (arXiv 2410.04207 and its
expanded version) is an equivariant width of d = 64 with a single equivariant layer for
membership, read out by a small head. A reader comparing models must get that size without
knowing it, so the bench picks a preset from the task (``preset_for_task``); ``--preset NAME``
overrides it, ``--preset small`` restores the old class default, and ``--hparams`` still wins
over any preset key.

Each preset states the paper setting it mirrors and how its numbers were chosen: only on the
*validation* slice the bench carves from the train split (never on test), on the quickstart
zoos (README, "GL-net at the papers' size": the controlled comparison, one change at a
time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_zoo.errors import SelectionError


@dataclass(frozen=True)
class Preset:
    """A named GL-net size: constructor hyperparameters, training overrides, the setting."""

    name: str
    model: Mapping[str, Any]  # GLNet constructor keywords (width, layers, hidden, depth)
    train: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig field overrides
    mirrors: str = ""  # the paper setting it stands for


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "membership",
            {"width": 64, "layers": 1, "hidden": 64, "depth": 1},
            {},
            "LoL paper, source-membership prediction (which data subsets a LoRA was trained "
            "on; ARC on Qwen2, CelebA/ImageNette on SD): equivariant width d = 64, one GL "
            "layer, a one-hidden-layer head",
        ),
        Preset(
            "attributes",
            {"width": 64, "layers": 1, "hidden": 64, "depth": 1},
            {},
            "LoL paper, attribute classification of SD-1.4 LoRAs (CelebA attributes of the "
            "identity a LoRA was trained on): the membership size, one GL layer at d = 64",
        ),
        Preset(
            "clip_score",
            {"width": 64, "layers": 1, "hidden": 128, "depth": 2},
            {},
            "LoL paper, CLIP-score regression of SD LoRAs (how well a LoRA's images match its "
            "prompts): d = 64, one GL layer, a two-hidden-layer head for the continuous target",
        ),
        Preset(
            "llm_accuracy",
            {"width": 64, "layers": 1, "hidden": 128, "depth": 2},
            {},
            "LoL paper, downstream-accuracy regression of LLM LoRAs (ARC accuracy of the "
            "fine-tuned Qwen2): d = 64, one GL layer, a two-hidden-layer head",
        ),
        Preset(
            "small",
            {"width": 8, "layers": 2, "hidden": 128, "depth": 2},
            {},
            "none: lora-zoo's original CPU-cheap GL-net (width 8, two gated layers); kept for "
            "comparison, it trails the papers' size",
        ),
    )
}


def preset_for_task(kind: str, columns: Sequence[str]) -> str:
    """The preset the bench runs for a task: membership for ``in_group.*`` / ``member*`` binary
    labels, attributes for other classification, CLIP-score regression for a ``clip*``
    column, LLM-accuracy regression for every other continuous target."""
    low = [c.lower() for c in columns]
    if kind == "binary" and all(c.startswith(("in_group", "member")) for c in low):
        return "membership"
    if kind in ("binary", "multiclass"):
        return "attributes"
    if any("clip" in c for c in low):
        return "clip_score"
    return "llm_accuracy"


def get_preset(name: str) -> Preset:
    """The preset, or a SelectionError listing the names."""
    if name not in PRESETS:
        raise SelectionError(
            f"unknown GL-net preset {name!r}; available: {sorted(PRESETS)}", key="preset"
        )
    return PRESETS[name]


__all__ = ["PRESETS", "Preset", "get_preset", "preset_for_task"]
