"""The minimal dataset card the writer puts beside every zoo: a YAML header whose ``configs``
list the manifest's shards, so the Hub viewer and ``datasets.load_dataset`` read exactly those
files. ``lora_zoo.cards`` replaces it with the full card (plots, provenance) when it is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lora_zoo._io import atomic_write_bytes, stage_bytes
from lora_zoo.zoo.schema import MANIFEST_NAME, README_NAME


def configs_header(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML ``configs:`` entry listing each split's shard files explicitly (not a glob), so
    the Hub and ``datasets.load_dataset`` read exactly the manifest's shards and nothing else."""
    files = [
        {"split": s, "path": [sh["path"] for sh in sp["shards"]]}
        for s, sp in manifest["splits"].items()
        if sp["shards"]
    ]
    return {"configs": [{"config_name": "default", "data_files": files}]}


def render_minimal_card(manifest: Mapping[str, Any]) -> str:
    """A minimal dataset card: YAML header + one-paragraph body. ``cards.py`` renders the full
    card later; this one only has to make the folder loadable by the Hub and ``datasets``."""
    header = yaml.safe_dump(
        {"tags": ["lora-zoo", "lora"], **configs_header(manifest)},
        sort_keys=False,
        default_flow_style=False,
    )
    rows = ", ".join(f"{s}: {sp['num_rows']}" for s, sp in manifest["splits"].items())
    return (
        f"---\n{header}---\n\n# LoRA zoo\n\nA dataset of LoRA adapters (one row per adapter; "
        f"the `weights` column holds PEFT safetensors bytes). Rows per split: {rows}.\n"
        f"Load it with `lora_zoo.load_zoo(...)` or `datasets.load_dataset(...)`; the format is "
        f"lora-zoo format version {manifest['format_version']} (see `{MANIFEST_NAME}`).\n"
    )


def write_minimal_card(root: Any, manifest: Mapping[str, Any]) -> None:
    """Write README.md atomically (replaceable by the card renderer)."""
    atomic_write_bytes(Path(root) / README_NAME, render_minimal_card(manifest).encode(), root=root)


def stage_minimal_card(root: Any, manifest: Mapping[str, Any]) -> Path:
    """Stage README.md for a manifest not yet committed (``ZooWriter.close``); returns the
    staged file, to be renamed over README.md once the manifest has landed."""
    return stage_bytes(Path(root) / README_NAME, render_minimal_card(manifest).encode(), root=root)


__all__ = ["configs_header", "render_minimal_card", "stage_minimal_card", "write_minimal_card"]
