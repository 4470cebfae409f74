"""lora-zoo: build, publish and load datasets of LoRA adapters for learning on LoRAs.

The public API is resolved lazily so ``import lora_zoo`` stays cheap (no torch-heavy builder
imports until they are used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoraRecord": "lora_zoo.record",
    "LoraModule": "lora_zoo.record",
    "ZooWriter": "lora_zoo.zoo.writer",
    "load_zoo": "lora_zoo.load.source",
    "Zoo": "lora_zoo.zoo.reader",
    "ZooSplit": "lora_zoo.zoo.reader",
    "LoraDataset": "lora_zoo.load.datasets",
    "LoraIterableDataset": "lora_zoo.load.datasets",
    "collate_loras": "lora_zoo.load.collate",
    "get_view": "lora_zoo.load.views",
    "register_view": "lora_zoo.load.views",
    "get_builder": "lora_zoo.build.registry",
    "load_recipe": "lora_zoo.build.recipe",
    "JobSpec": "lora_zoo.build.api",
    "TrainedLora": "lora_zoo.build.api",
    "read_adapter": "lora_zoo.contrib.formats",
    "write_adapter": "lora_zoo.contrib.formats",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_zoo' has no attribute {name!r}")
