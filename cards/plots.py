"""PNG plots for a zoo's dataset card: label distributions, singular-value spectra per module
family, and rank / alpha / hyperparameter histograms.

Why these three: a reader deciding whether a zoo suits a weight-space-learning task needs to
see (1) whether the labels vary enough to learn, (2) what the weights look like in a
representation that does not depend on the arbitrary GL(r) factorisation (singular values of
ΔW, computed from the r x r core in ``lora_zoo.load.symmetry.svals``; never a dense SVD), and (3) how
the training hyperparameters were spread. Figures are drawn with matplotlib's object API
(``Figure``, no pyplot state), so plotting is safe inside a library call and needs no display.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
_DPI = 110


def module_family(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (layer indices dropped, the
    last two meaningful parts kept): one spectrum per kind of projection, across layers."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return ".".join(parts[-2:]) if len(parts) > 1 else (parts[0] if parts else name)


def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    width = max(panel[0] * ncols, 7.0)  # room for the suptitle when there is one panel
    fig = Figure(figsize=(width, panel[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _numeric_columns(zoo: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """{column: float values over all splits} for scalar numeric / bool columns."""
    import pyarrow as pa

    out: dict[str, np.ndarray] = {}
    for name in names:
        vals: list[Any] = []
        typ = None
        for s in zoo.splits:
            col = zoo[s].table([name]).column(0)
            typ = col.type
            vals += col.to_pylist()
        if typ is None or not (
            pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
        ):
            continue
        arr = np.array([np.nan if v is None else float(v) for v in vals], dtype=float)
        if np.isfinite(arr).any():
            out[name] = arr
    return out


def _hist(ax: Any, values: np.ndarray, title: str, color: str) -> None:
    """Bars for a few distinct values (so each value is labelled), a histogram otherwise; a
    log axis when positive values span more than two decades (learning rates)."""
    from matplotlib.ticker import MaxNLocator

    v = values[np.isfinite(values)]
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("LoRAs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if v.size == 0:
        ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
        return
    distinct = np.unique(v)
    integral = bool(np.all(distinct == np.round(distinct)))
    if distinct.size <= 12 and (integral or distinct.size <= v.size / 2):
        counts = [int((v == d).sum()) for d in distinct]
        labels = [f"{d:.3g}" for d in distinct]
        ax.bar(range(len(distinct)), counts, color=color)
        ax.set_xticks(
            range(len(distinct)), labels, rotation=45 if len(distinct) > 6 else 0, fontsize=8
        )
        return
    if v.min() > 0 and v.max() / v.min() > 100:
        bins = np.logspace(np.log10(v.min()), np.log10(v.max()), 30)
        ax.set_xscale("log")
    else:
        bins = min(30, max(5, v.size // 4))
    ax.hist(v, bins=bins, color=color, edgecolor="white", linewidth=0.4)
    ax.tick_params(labelsize=8)


def _save(fig: Any, path: Path) -> None:
    """PNG bytes in memory, then one atomic write that never follows a link (``_io``)."""
    import io

    from lora_zoo._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    atomic_write_bytes(path, buf.getvalue(), root=path.parent)


def plot_labels(zoo: Any, path: Path, max_panels: int = 12) -> Path | None:
    labels = zoo[zoo.splits[0]].label_columns if zoo.splits else []
    labels = [c for c in labels if not c.startswith(SPECTRAL)]  # their own plot (spectral.png)
    cols = _numeric_columns(zoo, labels) if zoo.splits else {}
    if not cols:
        return None
    items = list(cols.items())[:max_panels]
    fig, axes = _figure(len(items))
    for ax, (name, vals) in zip(axes, items):
        fin = vals[np.isfinite(vals)]
        extra = f"  (mean {fin.mean():.3g})" if fin.size else ""
        _hist(ax, vals, f"{name}{extra}", "#3b7dd8")
    fig.suptitle(f"Label distributions ({len(next(iter(cols.values())))} LoRAs)")
    _save(fig, path)
    return path


def plot_hparams(zoo: Any, path: Path, max_panels: int = 9) -> Path | None:
    if not zoo.splits:
        return None
    ranks: list[float] = []
    alphas: list[float] = []
    for s in zoo.splits:
        t = zoo[s].table(["rank", "adapter_config"])
        ranks += [float(r) for r in t.column("rank").to_pylist()]
        for cfg in t.column("adapter_config").to_pylist():
            a = json.loads(cfg).get("lora_alpha")
            alphas.append(np.nan if a is None else float(a))
    panels: list[tuple[str, np.ndarray]] = [
        ("rank (max over modules)", np.array(ranks)),
        ("lora_alpha", np.array(alphas)),
    ]
    meta = zoo[zoo.splits[0]].metadata_columns
    varied = [c for c in meta if c.startswith("hp.")]  # constant ones are dropped below
    others = [c for c in meta if not c.startswith(("hp.", "seed.", "job_index"))]
    for name, vals in {**_numeric_columns(zoo, varied), **_numeric_columns(zoo, others)}.items():
        if np.unique(vals[np.isfinite(vals)]).size > 1 and len(panels) < max_panels:
            panels.append((name, vals))
    fig, axes = _figure(len(panels))
    for ax, (name, vals) in zip(axes, panels):
        _hist(ax, vals, name, "#d8703b")
    fig.suptitle("Ranks, alphas and training hyperparameters")
    _save(fig, path)
    return path


SPECTRAL = "spectral."


def _column_values(zoo: Any, name: str) -> list[Any]:
    return [v for s in zoo.splits for v in zoo[s].table([name]).column(0).to_pylist()]


def plot_spectral(zoo: Any, path: Path, max_groups: int = 2) -> Path | None:
    """Box plots of each ``spectral.<stat>.mean`` column over the values of the (at most
    ``max_groups``) varied hyperparameters with few distinct values (variant, rank, init...);
    one histogram per statistic when nothing varies."""
    if not zoo.splits:
        return None
    sp = zoo[zoo.splits[0]]
    stats = [c for c in sp.label_columns if c.startswith(SPECTRAL) and c.endswith(".mean")]
    if not stats:
        return None
    by: list[tuple[str, list[Any]]] = []
    for c in (c for c in sp.metadata_columns if c.startswith("hp.")):
        vals = _column_values(zoo, c)
        distinct = {json.dumps(v, sort_keys=True) for v in vals}
        if 1 < len(distinct) <= 12 and len(by) < max_groups:
            by.append((c, vals))
    cols = {name: np.array(_column_values(zoo, name), dtype=float) for name in stats}
    fig, axes = _figure(len(stats) * max(1, len(by)), ncols=len(stats))
    ax_iter = iter(axes)
    for key, keys in by or [("", [])]:
        for name, vals in cols.items():
            ax = next(ax_iter)
            title = name.removeprefix(SPECTRAL).removesuffix(".mean")
            if not key:
                _hist(ax, vals, title, "#6a3bd8")
                continue
            levels = sorted({str(k) for k in keys}, key=lambda x: (len(x), x))
            data = [vals[[str(k) == lv for k in keys]] for lv in levels]
            ax.boxplot([d[np.isfinite(d)] for d in data], tick_labels=levels)
            ax.set_title(f"{title} by {key}", fontsize=10)
            ax.tick_params(labelsize=8)
    fig.suptitle("Spectral columns (mean over modules) by varied hyperparameter")
    _save(fig, path)
    return path


def family_spectra(zoo: Any, max_loras: int = 64) -> dict[str, np.ndarray]:
    """{module family: (n_modules_sampled, r_max) singular values of ΔW (NaN past a module's
    rank)} over up to ``max_loras`` LoRAs spread across the zoo."""
    from lora_zoo.load.symmetry import svals

    per: dict[str, list[np.ndarray]] = defaultdict(list)
    for s in zoo.splits:
        split = zoo[s]
        k = max(1, round(max_loras * len(split) / max(1, len(zoo))))
        # the first k rows, not k rows spread over the split: a record is read with its whole
        # row group (up to 64 MiB), so spread samples would read (and map) most of a large zoo
        for i in range(min(k, len(split))):
            rec = split.record(i)
            for name, mod in rec.modules.items():
                u, v = mod.factors(fold_scale=True)  # (out, r), (in*, r)
                per[module_family(name)].append(svals(u.float(), v.float()).numpy())
    out = {}
    for fam, rows in per.items():
        r = max(len(x) for x in rows)
        arr = np.full((len(rows), r), np.nan)
        for j, x in enumerate(rows):
            arr[j, : len(x)] = x
        out[fam] = arr
    return out


def plot_spectra(zoo: Any, path: Path, max_loras: int = 64, max_panels: int = 12) -> Path | None:
    spectra = family_spectra(zoo, max_loras)
    if not spectra:
        return None
    items = sorted(spectra.items())[:max_panels]
    fig, axes = _figure(len(items))
    for ax, (fam, arr) in zip(axes, items):
        arr = np.where(arr > 0, arr, np.nan)
        idx = np.arange(1, arr.shape[1] + 1)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(arr, axis=0)
                lo, hi = np.nanpercentile(arr, 10, axis=0), np.nanpercentile(arr, 90, axis=0)
        ax.fill_between(idx, lo, hi, color="#2a9d8f", alpha=0.25, label="10-90%")
        ax.plot(idx, med, "o-", color="#1d6f65", ms=3, label="median")
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        plain = FuncFormatter(lambda y, _pos: f"{y:.3g}")
        ax.yaxis.set_major_formatter(plain)
        fin = arr[np.isfinite(arr)]
        decades = np.log10(fin.max() / fin.min()) if fin.size else 0.0
        # label minor ticks only when the axis spans too little for major ones to read
        ax.yaxis.set_minor_formatter(plain if decades < 1.5 else NullFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σ of ΔW")
        ax.set_title(f"{fam}  ({arr.shape[0]} modules)", fontsize=10)
        ax.set_xticks(idx if idx.size <= 16 else idx[:: max(1, idx.size // 8)])
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Singular-value spectra of ΔW = (α/r)·B·A per module family")
    _save(fig, path)
    return path


def plot_bench(zoo: Any, path: Path) -> Path | None:
    """Primary test metric per bench model (mean ± std over seeds) against the baseline."""
    from lora_zoo.cards.lol_results import read_bench, run_label

    res = read_bench(zoo)
    if not res or not res.get("runs") or not res.get("primary_metric"):
        return None
    prim = res["primary_metric"]
    runs = [r for r in res["runs"] if r.get("model") != "baseline"]
    base = next((r for r in res["runs"] if r.get("model") == "baseline"), None)
    names = [f"{run_label(r)}\n{r['view']}".replace(" (", "\n(") for r in runs]
    mean = np.array([r["summary"][prim]["mean"] for r in runs])
    std = np.array([r["summary"][prim]["std"] for r in runs])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(runs)), 3.6), layout="constrained")
    ax = fig.subplots()
    colors = ["#9a9a9a" if r.get("control") else "#3b7dd8" for r in runs]  # grey: chance rows
    ax.bar(np.arange(len(runs)), mean, yerr=std, color=colors, capsize=3)
    if base is not None:
        ax.axhline(base["summary"][prim]["mean"], color="k", ls="--", lw=1, label="baseline")
        ax.legend(fontsize=8)
    ax.set_xticks(np.arange(len(runs)), names, fontsize=7)
    ax.set_ylabel(f"test {prim}")
    ax.set_title(f"lora-zoo bench: {res.get('target')} ({res.get('repeats')} seeds)", fontsize=10)
    _save(fig, path)
    return path


def plot_curves(zoo: Any, path: Path) -> Path | None:
    """Learning curves (``lora-zoo bench --train-sizes``): the primary test metric against the
    number of training LoRAs, one line per model with its seed std as a band and the baseline
    dashed: "how many LoRAs does this task need"."""
    from lora_zoo.cards.lol_results import read_bench

    res = read_bench(zoo)
    curves = (res or {}).get("curves") or []
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    for c in curves:
        n = np.array([p["n_fit"] for p in c["points"]], dtype=float)
        m = np.array([p["mean"] for p in c["points"]], dtype=float)
        sd = np.array([p["std"] for p in c["points"]], dtype=float)
        if c["model"] == "baseline":
            ax.plot(n, m, color="k", ls="--", lw=1, label="baseline")
            continue
        (line,) = ax.plot(n, m, marker="o", ms=3, label=f"{c['model']}/{c['view']}")
        ax.fill_between(n, m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("training LoRAs")
    ax.set_ylabel(f"test {curves[0]['metric']}")
    ax.set_title(f"how many LoRAs does {res.get('target')} need?", fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    _save(fig, path)
    return path


def make_plots(zoo: Any, out_dir: str | Path, max_loras: int = 64) -> dict[str, str]:
    """Draw every plot that has data into ``out_dir``; {kind: file name}."""
    from lora_zoo._io import safe_mkdirs

    out_dir = Path(out_dir)
    safe_mkdirs(out_dir.parent, out_dir.name)  # a symlinked plots/ must not redirect the PNGs
    made: dict[str, str] = {}
    from lora_zoo.cards.backdoor import plot_backdoor

    kinds = (("labels", plot_labels), ("spectra", plot_spectra), ("spectral", plot_spectral),
             ("hparams", plot_hparams), ("backdoor", plot_backdoor),
             ("bench", plot_bench), ("curves", plot_curves))  # fmt: skip
    for kind, fn in kinds:
        path = out_dir / f"{kind}.png"
        try:
            res = fn(zoo, path) if kind != "spectra" else fn(zoo, path, max_loras)
        except Exception as e:  # a plot must never block a card: log and go on
            log.warning("plot %s failed: %s: %s", kind, type(e).__name__, e)
            continue
        if res is not None:
            made[kind] = path.name
    return made


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


__all__ = [
    "family_spectra",
    "make_plots",
    "module_family",
    "plot_hparams",
    "plot_labels",
    "plot_spectra",
]
