"""Reading ``bench/results.json`` (written by ``lora-zoo bench``) for the card and its plot."""

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


__all__ = ["read_bench"]
