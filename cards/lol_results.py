"""Reading ``bench/results.json`` (written by ``lora-zoo bench``) for the card and its plots, and
the row labels the card and ``lora-zoo bench``'s printed table share (one wording for both)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_bench(zoo: Any) -> dict[str, Any] | None:
    """``bench/results.json`` of a local zoo, if there is one (else None)."""
    path = Path(str(zoo.root)) / "bench" / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_label(r: dict[str, Any]) -> str:
    """A results entry's model name as tables show it: the baseline as the label-mean /
    majority model it is, the matched-noise control (labels permuted within the train split)
    marked, so a reader sees which rows are chance."""
    if r.get("model") == "baseline":
        return "baseline (label mean/majority)"
    return f"{r.get('model')} (permuted labels)" if r.get("control") else str(r.get("model"))


def ci_text(summary: dict[str, Any], metric: str) -> str:
    """``[lo, hi]``: the 95 % bootstrap interval over test LoRAs, or "-" when not measured."""
    lohi = summary.get(metric, {}).get("ci95")
    return f"[{lohi[0]:.2f}, {lohi[1]:.2f}]" if lohi else "-"


__all__ = ["ci_text", "read_bench", "run_label"]
