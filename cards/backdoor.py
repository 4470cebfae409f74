"""The backdoor section of a zoo's card: attack success rate by poison rate (a table and a plot).

Why in the card: a backdoor zoo's labels are measured, not assumed, and a poisoned LoRA whose
trigger does not fire is still labelled poisoned. A reader (or a detector's author) must see at
once how often the backdoor really took at each poison rate, and how often clean LoRAs fire on
a trigger anyway (their ASR is the false-trigger rate), before trusting ``poisoned`` as a label.
Shown for any zoo with ``poison_rate`` and ``asr`` label columns (``builders/causal_lm/poison.py``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("poison_rate", "asr", "clean_acc", "trigger_kind")


def _rows(zoo: Any) -> list[dict[str, Any]] | None:
    """poison_rate, asr, clean_acc, trigger_kind of every LoRA (all splits), or None when the zoo
    is not a backdoor zoo."""
    if not zoo.splits:
        return None
    have = set(zoo[zoo.splits[0]].label_columns)
    if not {"poison_rate", "asr"} <= have:
        return None
    cols = [c for c in COLUMNS if c in have]
    out: list[dict[str, Any]] = []
    for s in zoo.splits:
        for r in zoo[s].table(columns=cols).to_pylist():
            # a zoo is untrusted: rows whose rate / ASR are not finite numbers are left out
            if _num(r.get("poison_rate")) is None or _num(r.get("asr")) is None:
                continue
            r["clean_acc"] = _num(r.get("clean_acc"))
            r["trigger_kind"] = None if r.get("trigger_kind") is None else str(r["trigger_kind"])
            out.append(r)
    return out or None


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None (bools, strings, NaN and inf are not rates)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        return None
    return float(v)


def _fmt(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.3f}"


def backdoor_table(zoo: Any) -> dict[str, Any] | None:
    """{"rows": one per poison rate (n, ASR mean / median / min / max, clean acc mean),
    "kinds": poisoned LoRAs' mean ASR per trigger kind, "clean_asr", "poisoned_asr"}."""
    rows = _rows(zoo)
    if not rows:
        return None
    by_rate: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("poison_rate") is not None and r.get("asr") is not None:
            by_rate[float(r["poison_rate"])].append(r)
    table = []
    for rate in sorted(by_rate):
        asr = np.array([float(r["asr"]) for r in by_rate[rate]])
        acc = np.array(
            [np.nan if r.get("clean_acc") is None else float(r["clean_acc"]) for r in by_rate[rate]]
        )
        table.append(
            {
                "rate": f"{rate:g}",
                "n": len(asr),
                "mean": _fmt(asr.mean()),
                "median": _fmt(float(np.median(asr))),
                "min": _fmt(asr.min()),
                "max": _fmt(asr.max()),
                "fired": _fmt(float((asr >= 0.5).mean())),
                "clean_acc": _fmt(float(np.nanmean(acc))) if np.isfinite(acc).any() else "-",
            }
        )
    kinds: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("poison_rate") and r.get("trigger_kind") is not None:
            kinds[str(r["trigger_kind"])].append(float(r["asr"]))
    clean = [float(r["asr"]) for r in rows if not r.get("poison_rate")]
    pois = [float(r["asr"]) for r in rows if r.get("poison_rate")]
    return {
        "rows": table,
        "kinds": [
            {"kind": k, "n": len(v), "mean": _fmt(float(np.mean(v)))}
            for k, v in sorted(kinds.items())
        ],
        "clean_asr": _fmt(float(np.mean(clean))) if clean else "-",
        "poisoned_asr": _fmt(float(np.mean(pois))) if pois else "-",
    }


def plot_backdoor(zoo: Any, path: Path) -> Path | None:
    """ASR of every LoRA against its poison rate (one dot each, jittered, coloured by trigger
    kind), with the mean per rate."""
    rows = _rows(zoo)
    if not rows:
        return None
    from matplotlib.figure import Figure

    rates = sorted({float(r["poison_rate"]) for r in rows if r.get("poison_rate") is not None})
    pos = {x: i for i, x in enumerate(rates)}
    fig = Figure(figsize=(max(5.0, 0.8 * len(rates) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    g = np.random.default_rng(0)  # jitter only (drawing), never data
    kinds = sorted({str(r.get("trigger_kind")) for r in rows})
    for k, color in zip(kinds, ("#3b7dd8", "#d8553b", "#3bb273", "#a05bd8", "#888888")):
        pts = [r for r in rows if str(r.get("trigger_kind")) == k and r.get("asr") is not None]
        xs = np.array([pos[float(r["poison_rate"])] for r in pts]) + g.uniform(
            -0.25, 0.25, len(pts)
        )
        ax.scatter(xs, [float(r["asr"]) for r in pts], s=10, alpha=0.6, color=color, label=k)
    means = [
        np.mean([float(r["asr"]) for r in rows if float(r["poison_rate"]) == x]) for x in rates
    ]
    ax.plot(range(len(rates)), means, "k-o", ms=4, lw=1, label="mean")
    ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates], fontsize=8)
    ax.set_xlabel("poison rate (fraction of the LoRA's training examples)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(
        f"ASR by poison rate ({len(rows)} LoRAs; rate 0 = clean: false-trigger rate)", fontsize=10
    )
    import io

    from lora_zoo._io import atomic_write_bytes

    buf = io.BytesIO()  # as plots._save (not imported: plots imports this module)
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue(), root=path.parent)
    return path
