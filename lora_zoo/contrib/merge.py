"""Combine zoos (collections) into one, with a ``collection`` column saying where each LoRA
came from.

LoRAs for different base models do not belong in one table (their modules and shapes differ and
a loader would stack incompatible tensors), so a merge refuses them unless asked to keep each
base model as its own config: ``OUT/configs/<base>/`` zoos plus a top-level README whose YAML
``configs:`` lets ``datasets.load_dataset(OUT, "<base>")`` pick one.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from lora_zoo._io import atomic_write_bytes
from lora_zoo.errors import IncompatibleBaseModelError
from lora_zoo.load.source import load_zoo
from lora_zoo.progress import track
from lora_zoo.zoo.reader import Zoo
from lora_zoo.zoo.schema import CORE_COLUMNS
from lora_zoo.zoo.writer import ZooWriter

log = logging.getLogger(__name__)


def _name_of(zoo_path: str | os.PathLike[str]) -> str:
    return Path(os.fspath(zoo_path).rstrip("/")).name or "zoo"


def _base_models(zoo: Zoo) -> set[str]:
    out: set[str] = set()
    for s in zoo.splits:
        out.update(zoo[s].table(["base_model"]).column(0).to_pylist())
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unknown"


def _copy(
    zoo: Zoo, name: str, w: ZooWriter, only_base: str | None, renamed: list[dict[str, str]]
) -> int:
    n = 0
    label_cols = set(zoo.columns_with_role("label"))
    for split in zoo.splits:
        sp = zoo[split]
        for i in track(
            range(len(sp)), desc=f"merge {name}/{split}", unit="lora", enabled=len(sp) >= 100
        ):
            row = sp.row(i)
            if only_base is not None and row["base_model"] != only_base:
                continue
            rec = sp.record(i)
            coll = row.get("collection") or "default"
            if coll == "default":
                coll = name
            lid = row["lora_id"]
            if lid in w:
                new = f"{coll}/{lid}"
                renamed.append({"zoo": name, "from": lid, "to": new})
                lid = new
            extra = {k: v for k, v in row.items() if k not in CORE_COLUMNS and v is not None}
            w.add(
                rec,
                lora_id=lid,
                split=split,
                metadata={k: v for k, v in extra.items() if k not in label_cols},
                labels={k: v for k, v in extra.items() if k in label_cols},
                base_model=row["base_model"] or "",
                collection=coll,
            )
            n += 1
    return n


def merge_zoos(
    zoos: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    names: list[str] | None = None,
    separate_configs: bool = False,
) -> dict[str, Any]:
    """Merge ``zoos`` into ``out``; rows whose collection is unset/'default' get the zoo's name
    (or ``names[i]``). Colliding lora_ids are prefixed with their collection and reported."""
    opened = [load_zoo(z) for z in zoos]
    names = names or [_name_of(z) for z in zoos]
    if len(names) != len(zoos) or len(set(names)) != len(names):
        raise IncompatibleBaseModelError(
            f"need one distinct collection name per zoo, got {names}", file=out, key="names"
        )
    bases = {n: _base_models(z) for n, z in zip(names, opened)}
    all_bases = set().union(*bases.values())
    renamed: list[dict[str, str]] = []
    report: dict[str, Any] = {
        "out": str(out),
        "zoos": [str(z) for z in zoos],
        "base_models": sorted(all_bases),
    }
    if len(all_bases) > 1 and not separate_configs:
        detail = "; ".join(f"{n}: {sorted(b)}" for n, b in bases.items())
        raise IncompatibleBaseModelError(
            f"zoos adapt different base models ({detail}); pass --separate-configs to keep each "
            "base model as its own config",
            file=out,
            key="base_model",
        )
    if len(all_bases) <= 1:
        with ZooWriter(out, mode="create") as w:
            counts = {n: _copy(z, n, w, None, renamed) for n, z in zip(names, opened)}
            w.set_info(merge={"zoos": report["zoos"], "collections": names, "counts": counts})
        report.update(rows=counts, renamed=renamed)
        return report
    configs: dict[str, str] = {}
    counts_by: dict[str, dict[str, int]] = {}
    for base in sorted(all_bases):
        cname = _safe(base)
        sub = Path(out) / "configs" / cname
        with ZooWriter(sub, mode="create") as w:
            counts_by[cname] = {n: _copy(z, n, w, base, renamed) for n, z in zip(names, opened)}
            w.set_info(merge={"zoos": report["zoos"], "collections": names, "base_model": base})
        configs[cname] = base
    _write_configs_card(Path(out), configs)
    report.update(configs=configs, rows=counts_by, renamed=renamed)
    return report


def _write_configs_card(out: Path, configs: dict[str, str]) -> None:
    """Top-level README: one datasets config per base model, each pointing at its sub-zoo."""
    lines = ["---", "configs:"]
    for cname in configs:
        splits = sorted(
            {p.name.rsplit("-", 1)[0] for p in (out / "configs" / cname / "data").glob("*.parquet")}
        )
        lines.append(f"- config_name: {cname}")
        lines.append("  data_files:")
        for s in splits:
            lines.append(f"  - split: {s}")
            lines.append(f"    path: configs/{cname}/data/{s}-*.parquet")
    lines += ["---", "", "# Merged LoRA zoo (one config per base model)", ""]
    lines += [
        f"- `{c}`: base model `{b}` (a full zoo in `configs/{c}/`)" for c, b in configs.items()
    ]
    atomic_write_bytes(out / "README.md", ("\n".join(lines) + "\n").encode(), root=out)
