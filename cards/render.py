"""Render a zoo's dataset card (README.md) from a Jinja2 template in this package.

Why: the card is what people read before trusting a zoo, and its YAML header is what the Hub
and ``datasets.load_dataset`` read to find the data. So the header is built as a Python dict
and dumped with ``yaml.safe_dump`` (never templated text, which breaks on a stray colon), and
it keeps exactly the ``configs:`` that ``zoo.card_min.configs_header`` produces from the manifest
(``verify`` checks the two agree). Everything in the body is derived from the manifest and
the Parquet columns (recipe, provenance, label statistics), so re-rendering is deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lora_zoo.cards.backdoor import backdoor_table
from lora_zoo.cards.lol_results import ci_text, read_bench, run_label
from lora_zoo.errors import ZooFormatError
from lora_zoo.record import cell_modules
from lora_zoo.zoo.card_min import configs_header
from lora_zoo.zoo.schema import README_NAME

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "zoo_card.md.j2"
CORE_DESCRIPTIONS = {
    "lora_id": "unique id of the LoRA",
    "weights": "safetensors bytes of a PEFT adapter_model.safetensors (factors in stored dtype)",
    "adapter_config": "PEFT LoraConfig as JSON",
    "base_model": "base model the LoRA adapts",
    "collection": "sub-collection the LoRA came in with",
    "rank": "max LoRA rank over modules",
    "num_modules": "number of adapted modules",
}
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


def size_category(n: int) -> str:
    for bound, name in _SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1M" if n < 10_000_000 else "10M<n<100M"


def features_yaml(zoo: Any) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` list (datasets' YAML form) of the shards' Arrow schema."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([f for f in zoo.schema])  # drop footer metadata
    return datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def card_header(zoo: Any) -> dict[str, Any]:
    """The Hub YAML header: license, tags, task categories, size, configs, features."""
    info = zoo.info
    card = info.get("card") or {}
    base = sorted(
        {b for s in zoo.splits for b in zoo[s].table(["base_model"]).column(0).to_pylist() if b}
    )
    tags = ["lora-zoo", "lora", "weight-space-learning", "peft", "safetensors"]
    tags += [t for t in card.get("tags", []) if t not in tags]
    header: dict[str, Any] = {
        "license": card.get("license") or info.get("license") or "other",
        "tags": tags,
        "task_categories": card.get("task_categories") or ["other"],
        "size_categories": [size_category(len(zoo))],
        "pretty_name": card.get("pretty_name") or _title(zoo),
    }
    hub_base = [b for b in base if "/" in b]
    if hub_base:
        header["base_model"] = hub_base
    header.update(configs_header(zoo.manifest))
    header["dataset_info"] = {
        "features": features_yaml(zoo),
        "splits": [
            {"name": s, "num_bytes": int(sp["num_bytes"]), "num_examples": int(sp["num_rows"])}
            for s, sp in zoo.manifest["splits"].items()
        ],
    }
    return header


def builder_of(info: dict[str, Any]) -> dict[str, Any]:
    """``info.builder`` as a dict (runner builds store a dict, other writers may store a name)."""
    b = info.get("builder")
    if isinstance(b, dict):
        return b
    return {"name": str(b)} if b else {}


def describe_column(col: dict[str, Any], info: dict[str, Any]) -> str:
    """One line per column: fixed text for core columns, the column's origin otherwise."""
    name, role = col["name"], col["role"]
    if name in CORE_DESCRIPTIONS:
        return CORE_DESCRIPTIONS[name]
    if name.startswith("hp."):
        return "training hyperparameter (varied by the recipe's `vary:` or the builder's resolved default)"
    if name.startswith("seed."):
        return f"seed of the `{name[5:]}` random stream (derived from the recipe seed)"
    known = {
        "train_example_ids": "ids of the training examples this LoRA saw",
        "groups_included": "data groups trained on",
        "groups_excluded": "data groups held out of training",
        "subset_size": "number of training examples drawn",
        "job_index": "index of the job in the recipe's plan",
        "final_loss": "training loss at the last step",
    }
    if name in known:
        return known[name]
    if role == "label":
        head, _, group = name.partition(".")
        return f"label: `{head}` on group `{group}`" if group else "label (what the LoRA scores)"
    return "metadata (how the LoRA was made)"


def _title(zoo: Any) -> str:
    info = zoo.info
    name = (info.get("recipe_resolved") or {}).get("name") or (info.get("card") or {}).get("name")
    return f"LoRA zoo: {name}" if name else "LoRA zoo"


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def label_stats(zoo: Any) -> list[dict[str, Any]]:
    import pyarrow as pa

    if not zoo.splits:
        return []
    out = []
    for name in zoo[zoo.splits[0]].label_columns:
        cols = [zoo[s].table([name]).column(0) for s in zoo.splits]
        t = cols[0].type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            continue
        vals = np.array([np.nan if v is None else float(v) for c in cols for v in c.to_pylist()])
        fin = vals[np.isfinite(vals)]
        if fin.size == 0:
            out.append(
                {
                    "name": name,
                    "count": 0,
                    **dict.fromkeys(("mean", "std", "min", "median", "max"), "-"),
                }
            )
            continue
        out.append(
            {
                "name": name,
                "count": int(fin.size),
                "mean": _fmt(fin.mean()),
                "std": _fmt(fin.std()),
                "min": _fmt(fin.min()),
                "median": _fmt(float(np.median(fin))),
                "max": _fmt(fin.max()),
            }
        )
    return out


def provenance_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """Flat (what, value) rows: base model + revision, versions, git, hardware, hours."""
    prov = info.get("provenance") or {}
    if not prov:
        return []
    env = prov.get("environment") or {}
    rows: list[tuple[str, str]] = []
    base = (info.get("recipe_resolved") or {}).get("base_model")
    if isinstance(base, dict):
        bid = base.get("id") or base.get("architecture") or base.get("kind")
        rev = base.get("revision")
        rows.append(("base model", f"`{bid}`" + (f" @ `{rev}`" if rev else "")))
    elif base:
        rows.append(("base model", f"`{base}`"))
    b = prov.get("builder") or builder_of(info)
    if b:
        rows.append(
            (
                "builder",
                f"`{b.get('name')}` VERSION {b.get('VERSION')} "
                f"({b.get('dist') or 'not a package'} {b.get('dist_version') or ''}".rstrip()
                + f"; source sha256 `{str(b.get('source_sha256', ''))[:12]}`)",
            )
        )
    libs = env.get("libraries") or {}
    if libs:
        rows.append(("lora-zoo", f"{libs.get('lora-zoo')}"))
        rows.append(
            ("libraries", ", ".join(f"{k} {v}" for k, v in libs.items() if v and k != "lora-zoo"))
        )
    git = env.get("lora_zoo_git")
    if git:
        rows.append(
            (
                "lora-zoo git commit",
                f"`{git.get('commit')}`" + (" (dirty tree)" if git.get("dirty") else ""),
            )
        )
    hw = [env.get("cpu"), f"{env.get('cpu_count')} CPU cores" if env.get("cpu_count") else None]
    gpus = env.get("gpus") or []
    if gpus:
        hw.append(", ".join(f"{n} x {g}" for g, n in Counter(gpus).items()))
    rows.append(("hardware", "; ".join(h for h in hw if h) or "unknown"))
    if env.get("python") or env.get("platform"):
        rows.append(("python / platform", f"{env.get('python')} / {env.get('platform')}"))
    tm = prov.get("timing") or {}
    if tm:
        walls = list((tm.get("wall_time_s") or {}).values())
        n = max(1, len(walls))
        kind = "GPU" if tm.get("gpu_hours") else "CPU"
        hours = tm.get("gpu_hours") or tm.get("cpu_hours") or 0.0
        rows.append(
            (
                f"total {kind} hours",
                f"{hours:.4g} ({tm.get('total_wall_s')} s wall, device {tm.get('device')})",
            )
        )
        rows.append(
            (
                f"{kind} hours per LoRA",
                f"{hours / n:.3g} (mean over {len(walls)}; "
                f"min {min(walls, default=0):.3g} s, max {max(walls, default=0):.3g} s)",
            )
        )
    build = info.get("build") or {}
    if build:
        rows.append(
            (
                "jobs",
                f"{build.get('num_done')} of {build.get('num_jobs')} done, "
                f"{len(build.get('failed') or [])} failed (diverged; listed in the manifest)",
            )
        )
    return rows


def split_method(info: dict[str, Any]) -> str:
    out = ((info.get("recipe_resolved") or {}).get("output") or {}).get("split")
    if not out:
        return "How the splits were made is not recorded (set by whoever wrote the zoo)."
    kind = out.get("kind", "none")
    fr = ", ".join(f"{k} {v}" for k, v in (out.get("fractions") or {}).items())
    if kind == "group":
        return (
            f"Group split on metadata column `{out.get('key')}` (fractions {fr}, seed "
            f"{out.get('seed')}): LoRAs sharing a group value never straddle two splits."
        )
    if kind == "random":
        return f"Seeded random split (fractions {fr}, seed {out.get('seed')})."
    return "No split: every LoRA is in `train`."


def variant_rows(zoo: Any) -> list[dict[str, Any]]:
    """How many LoRAs of each variant the zoo holds, from each row's adapter_config (rsLoRA,
    DoRA) and, for built zoos, the recorded init (``hp.init``; PiSSA / OLoRA are stored
    converted, so the config alone no longer says so)."""
    from collections import Counter

    counts: Counter[tuple[str, str, str]] = Counter()
    for s in zoo.splits:
        sp = zoo[s]
        cols = ["adapter_config"] + (["hp.init"] if "hp.init" in sp.metadata_columns else [])
        t = sp.table(cols)
        inits = t.column("hp.init").to_pylist() if "hp.init" in cols else [None] * t.num_rows
        for cfg, init in zip(t.column("adapter_config").to_pylist(), inits):
            try:  # an untrusted cell: anything but a JSON object counts as plain LoRA
                c = json.loads(cfg)
            except (TypeError, ValueError):
                c = {}
            c = c if isinstance(c, dict) else {}
            counts[
                (
                    "DoRA" if c.get("use_dora") else "LoRA",
                    "yes" if c.get("use_rslora") else "no",
                    str(init or "(not recorded)"),
                )
            ] += 1
    return [
        {"kind": k, "rslora": r, "init": i, "count": n} for (k, r, i), n in sorted(counts.items())
    ]


def _modules_and_dtypes(zoo: Any) -> tuple[dict[str, Any], list[str]]:
    first = next((s for s in zoo.splits if len(zoo[s])), None)
    if first is None:
        return {"count": 0, "first": None}, []
    lid, data, _ = zoo[first].cell(0)
    mods, dtypes = cell_modules(data, file=f"{zoo.source}:{lid}")
    return {"count": len(mods), "first": mods[0] if mods else None}, dtypes


def _curve_points(points: Any) -> str:
    """``n: score`` pairs of one learning curve; results.json travels with a zoo, so anything
    that is not a list of {n_fit: int, mean: number} is left out, never formatted blindly."""
    out = []
    for p in points if isinstance(points, list) else []:
        n, m = (p.get("n_fit"), p.get("mean")) if isinstance(p, dict) else (None, None)
        if isinstance(n, int) and isinstance(m, (int, float)) and math.isfinite(m):
            out.append(f"{n}: {m:.3f}")
    return ", ".join(out)


def bench_rows(zoo: Any) -> dict[str, Any] | None:
    """The results table of the card: model, view, symmetry, metrics mean ± std, vs baseline."""
    res = read_bench(zoo)
    if not res or not res.get("runs"):
        return None
    prim = res.get("primary_metric")
    metrics = [m for m in ("accuracy", "auroc", "r2", "kendall_tau", "spearman")
               if m in res["runs"][0].get("summary", {})]  # fmt: skip
    base = next((r for r in res["runs"] if r.get("model") == "baseline"), None)
    b = base["summary"][prim]["mean"] if base and prim else math.nan
    rows = []
    for r in res["runs"]:
        cells = [f"{r['summary'][m]['mean']:.3f} ± {r['summary'][m]['std']:.3f}" for m in metrics]
        d = r["summary"][prim]["mean"] - b if prim else math.nan
        rows.append({"model": run_label(r), "view": r.get("view"), "symmetry": r.get("invariance", "-"),
                     "cells": cells, "ci": ci_text(r["summary"], prim) if prim else "-",
                     "delta": f"{d:+.3f}"})  # fmt: skip
    n = res.get("n") or {}
    return {
        "target": res.get("target"),
        "task": res.get("task"),
        "metrics": metrics,
        "primary": prim,
        "rows": rows,
        "repeats": res.get("repeats"),
        "split": f"{n.get('fit')}/{n.get('valid')}/{n.get('test')}",
        "test_zoo": res.get("test_zoo"),
        "preset": (res.get("glnet_preset") or {}).get("name"),
        "curves": [
            {
                "name": f"{c.get('model')}/{c.get('view')}",
                "points": _curve_points(c.get("points")),
            }
            for c in res.get("curves") or []
        ],
    }


#: characters a zoo's strings may not bring into a card as themselves: HTML (tags, attributes,
#: entities), Markdown structure (code spans, table cells, links and images), line breaks
_MD_ESCAPES = {
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;", "`": "&#96;",
    "|": "&#124;", "[": "&#91;", "]": "&#93;", "\\": "&#92;", "*": "&#42;",
}  # fmt: skip
_MD_SPECIAL = re.compile(r"[&<>\"'`|\[\]\\*]|[\x00-\x1f\x7f\u2028\u2029]")


def md(text: Any) -> str:
    """A string from a zoo, inert in Markdown and HTML wherever the template puts it (a table
    cell, a code span, a heading, a Python snippet): no tag, attribute, link, image, autolink,
    code-span end, cell break or new line can come out of it. Plain names are unchanged."""
    s = _MD_SPECIAL.sub(lambda m: _MD_ESCAPES.get(m.group(), " "), str(text))
    return s.replace("://", ":&#47;&#47;").replace("www.", "www&#46;")


def code(text: Any) -> str:
    """A zoo string the template always puts inside a code span (a column type such as
    ``list<element: int64>``): HTML is inert there, so only what could end the span, the table
    cell or the line is replaced."""
    return re.sub(r"[`|\x00-\x1f\x7f\u2028\u2029]", lambda m: _MD_ESCAPES.get(m.group(), " "),
                  str(text))  # fmt: skip


def md_tree(x: Any) -> Any:
    """``md`` on every string (keys included) of a JSON-like tree; numbers stay numbers."""
    if isinstance(x, str):
        return md(x)
    if isinstance(x, dict):
        return {md(k): md_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(md_tree(v) for v in x)
    return x


def fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``, so the text cannot close it."""
    longest = max((len(r) for r in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


#: plot key -> (alt text, caption) for the card's figures (cards/plots.py writes the files)
PLOT_CAPTIONS: dict[str, tuple[str, str]] = {
    "labels": ("label distributions", "Distribution of every numeric label over all LoRAs."),
    "spectra": (
        "singular value spectra",
        "Singular values of each module's ΔW (median and "
        "10-90% band over sampled LoRAs and layers), per module family; computed "
        "from the r x r core, GL(r)-invariant.",
    ),
    "spectral": (
        "spectral columns by hyperparameter",
        "Per-LoRA spectral statistics (`lora-zoo analyze`: mean over modules of ΔW's top "
        "singular value, stable rank, effective rank, 90 % energy rank), as box plots over "
        "the values of the hyperparameters the recipe varies.",
    ),
    "hparams": (
        "hyperparameter histograms",
        "Ranks, alphas and the training hyperparameters that vary across the zoo.",
    ),
    "backdoor": (
        "attack success rate by poison rate",
        "ASR of every LoRA (greedy decoding gives the target on held-out inputs with the "
        "LoRA's trigger) against its poison rate, coloured by trigger kind; rate 0 = clean "
        "LoRAs, whose ASR is the false-trigger rate.",
    ),
    "bench": (
        "what LoL models learn from this zoo",
        "Test-split score of each `lora-zoo bench` model (mean and std over seeds), against "
        "the baseline (dashed).",
    ),
    "curves": (
        "learning curves",
        "How many LoRAs does this task need: test score of each `lora-zoo bench` model "
        "against the number of training LoRAs (`--train-sizes`; band: std over seeds).",
    ),
}


def _ranks_and_bases(zoo: Any) -> tuple[Counter[int], set[str]]:
    """How many LoRAs of each rank, and every base model named, over all splits."""
    ranks: Counter[int] = Counter()
    base: set[str] = set()
    for s in zoo.splits:
        t = zoo[s].table(["rank", "base_model"])
        ranks.update(t.column("rank").to_pylist())
        base.update(b for b in t.column("base_model").to_pylist() if b)
    return ranks, base


def _recipe_text(raw_info: Mapping[str, Any]) -> str:
    """The recipe as stored (raw text; the template fences it), else its resolved form."""
    return (raw_info.get("recipe") or "").strip("\n") or (
        yaml.safe_dump(raw_info["recipe_resolved"], sort_keys=False).strip("\n")
        if raw_info.get("recipe_resolved")
        else ""
    )


def card_context(
    zoo: Any, plots: dict[str, str] | None = None, repo_id: str | None = None
) -> dict[str, Any]:
    raw_info, m = zoo.info, zoo.manifest
    info = md_tree(raw_info)  # every zoo string escaped once, before any helper formats it
    header = card_header(zoo)
    ranks, base = _ranks_and_bases(zoo)
    modules, dtypes = _modules_and_dtypes(zoo)
    nbytes = sum(sp["num_bytes"] for sp in m["splits"].values())
    b = builder_of(info)
    first_split = zoo.splits[0] if zoo.splits else "train"
    labels = md_tree(zoo[first_split].label_columns if zoo.splits else [])
    recipe = _recipe_text(raw_info)
    return {
        "header_yaml": yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100),
        "title": md(_title(zoo)),
        "summary": (
            f"{len(zoo)} LoRA adapters"
            + (f" of `{md(', '.join(sorted(base)))}`" if base else "")
            + (f", built by the `{b.get('name')}` builder" if b.get("name") else "")
            + "."
        ),
        "num_rows": len(zoo),
        "splits": [
            {"name": md(s), "num_rows": sp["num_rows"], "shards": len(sp["shards"])}
            for s, sp in m["splits"].items()
        ],
        "base_models": md_tree(sorted(base)),
        "ranks": ", ".join(f"r={r}: {n}" for r, n in sorted(ranks.items())) or "-",
        "modules": md_tree(modules),
        "dtypes": md_tree(dtypes or ["-"]),
        "builder": (
            f"`{b.get('name')}`" + (f" VERSION {b['VERSION']}" if "VERSION" in b else "")
            if b
            else "(none recorded)"
        ),
        "size": f"{nbytes / 2**20:.2f} MiB in {sum(len(sp['shards']) for sp in m['splits'].values())} shard(s)",
        "format_version": m["format_version"],
        "repo_id": md(repo_id)
        if repo_id
        else (info.get("card") or {}).get("repo_id") or "&lt;namespace&gt;/&lt;zoo&gt;",
        "first_split": md(first_split),
        "label_columns": labels,
        "recipe": recipe,  # raw, inside a fence it cannot close (fenced code is inert)
        "recipe_fence": fence_for(recipe),
        "columns": [
            {**c, "type": code(raw["type"]), "description": describe_column(c, info)}
            for c, raw in zip(md_tree(m["columns"]), m["columns"])
        ],
        "label_stats": md_tree(label_stats(zoo)),
        "variants": md_tree(variant_rows(zoo)),
        "plots": [
            {"file": f, "alt": PLOT_CAPTIONS[k][0], "caption": PLOT_CAPTIONS[k][1]}
            for k, f in (plots or {}).items()
            if k in PLOT_CAPTIONS
        ],
        "provenance": provenance_rows(info),
        "bench": md_tree(bench_rows(zoo)),
        "backdoor": md_tree(backdoor_table(zoo)),
        "split_method": split_method(info),
        "named_splits": [
            {
                "name": n,
                "desc": ", ".join(f"{k}={v}" for k, v in ns.items() if k not in ("path", "sha256")),
            }
            for n, ns in md_tree(zoo.named_splits or {}).items()
            if isinstance(ns, dict)
        ],
    }


def _template(template: str | os.PathLike[str] | None):
    import jinja2

    env = jinja2.Environment(
        autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    if template is None:
        text = resources.files("lora_zoo.cards").joinpath(DEFAULT_TEMPLATE).read_text("utf-8")
    else:
        path = Path(template)
        if not path.exists():
            raise ZooFormatError("card template not found", file=path)
        text = path.read_text("utf-8")
    return env.from_string(text)


def render_card(
    root_or_zoo: Any,
    *,
    plots: dict[str, str] | None = None,
    template: str | os.PathLike[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """The card's text for a zoo (a Zoo object or anything ``load_zoo`` opens)."""
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.reader import Zoo

    zoo = root_or_zoo if isinstance(root_or_zoo, Zoo) else load_zoo(root_or_zoo)
    if plots is None and zoo.is_local:  # link plots already drawn next to the card
        pdir = Path(zoo.root) / "plots"
        plots = {
            k: f"{k}.png"
            for k in ("labels", "spectra", "spectral", "hparams", "backdoor", "bench", "curves")
            if (pdir / f"{k}.png").exists()
        }
    return _template(template).render(**card_context(zoo, plots, repo_id))


def write_card(
    root: str | os.PathLike[str],
    *,
    plots: bool = True,
    template: str | os.PathLike[str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Draw the plots into ``root/plots`` and write ``root/README.md`` atomically."""
    from lora_zoo._io import atomic_write_bytes
    from lora_zoo.load.source import load_zoo

    root = Path(root)
    from lora_zoo._io import safe_mkdirs

    safe_mkdirs(root)  # the card and its plots are written into a real folder, not via a link
    zoo = load_zoo(root)
    made: dict[str, str] = {}
    if plots:
        from lora_zoo.cards.plots import make_plots

        made = make_plots(zoo, root / "plots")
    text = render_card(zoo, plots=made, template=template, repo_id=repo_id)
    atomic_write_bytes(root / README_NAME, text.encode("utf-8"), root=root)
    log.info("wrote %s (%d plots)", root / README_NAME, len(made))
    return root / README_NAME


__all__ = ["card_header", "label_stats", "provenance_rows", "render_card", "write_card"]
