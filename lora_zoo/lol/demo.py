"""The quick start, end to end: build the packaged quickstart zoo, load it back, and show that
its weights carry what each LoRA was trained on.

Why this is the README's main job: it touches every layer a LoL user needs (recipe -> batched
builder -> zoo on disk -> ``load_zoo`` -> ``LoraDataset`` view -> a probe) in a few minutes on a
laptop CPU, offline, and ends with numbers that can fail: the LoL benchmark (``lol.bench``, a
small default model set: baseline, raw-factor MLP, svals MLP, GL-net, module transformer) must
predict "group g was in this LoRA's training data" (``in_group.*``) on the zoo's test split
better than the majority class. If the zoo's labels or the loaders were broken, every model
would sit at chance. (``svals_features`` + the logistic probe in ``lol.probe`` stay as the
simplest check.)
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_zoo.lol.probe import ProbeResult, format_table, membership_probe

logger = logging.getLogger(__name__)

RECIPE = "quickstart.yaml"


def quickstart_recipe_path() -> Path:
    """The packaged recipe (``lora_zoo.recipes`` <- ``recipes/`` in the source tree)."""
    ref = importlib.resources.files("lora_zoo.recipes").joinpath(RECIPE)
    return Path(str(ref))


DEMO_MODELS = ("baseline", "mlp", "glnet", "transformer")
DEMO_VIEWS = ("factors", "svals")
DEMO_REPEATS = 2


@dataclass
class DemoResult:
    zoo: Path
    num_loras: int
    results: list[ProbeResult]
    built: bool  # False when an existing finished zoo was reused
    bench: dict | None = None  # lol.bench.run_bench output (``bench/results.json``)

    def bench_table(self) -> str:
        from lora_zoo.lol.bench import format_table

        return format_table(self.bench) if self.bench else ""

    def auroc(self, model: str, view: str) -> float:
        """Mean test AUROC of one bench run (NaN when it did not run); never the
        permuted-labels control of the same model and view."""
        for r in (self.bench or {}).get("runs", []):
            if (r["model"], r["view"]) == (model, view) and not r.get("control"):
                return float(r["summary"]["auroc"]["mean"])
        return float("nan")

    @property
    def mean_accuracy(self) -> float:
        return sum(r.accuracy for r in self.results) / max(1, len(self.results))

    @property
    def mean_baseline(self) -> float:
        return sum(r.baseline for r in self.results) / max(1, len(self.results))

    def table(self) -> str:
        return format_table(self.results, "svals")


def zoo_is_complete(out: Path) -> bool:
    """A packed zoo exists (the manifest is written last, atomically)."""
    return (out / "lora_zoo.json").is_file()


def svals_features(
    zoo_path: str | os.PathLike[str],
) -> tuple[torch.Tensor, list[list[str]], list[str]]:
    """(features (n, d), groups included per LoRA, all groups) over every split of the zoo.

    Features: each module's singular values of ΔW (the ``svals`` view, GL(r)-invariant), in a
    fixed module order, zero-padded to the largest rank. Group membership is read from the
    ``in_group.<g>`` label columns, the way a LoL user would read them.
    """
    from lora_zoo import load_zoo
    from lora_zoo.load.datasets import LoraDataset

    zoo = load_zoo(str(zoo_path))
    feats: list[torch.Tensor] = []
    members: list[list[str]] = []
    groups: list[str] = []
    for split in zoo.splits:
        sp = zoo[split]
        cols = [c for c in sp.label_columns if c.startswith("in_group.")]
        groups = sorted({c.removeprefix("in_group.") for c in cols} | set(groups))
        ds = LoraDataset(sp, view="svals", labels=tuple(cols))
        for i in range(len(ds)):
            item = ds[i]
            mods = item["modules"]
            r_max = max(int(m["S"].shape[-1]) for m in mods.values())
            vec = []
            for name in sorted(mods):
                s = mods[name]["S"].to(torch.float64).flatten()
                vec.append(torch.nn.functional.pad(s, (0, r_max - s.shape[0])))
            feats.append(torch.cat(vec))
            lab = item["labels"]
            members.append([c.removeprefix("in_group.") for c in cols if bool(lab[c])])
    if not feats:
        raise ValueError(f"zoo {zoo_path} has no LoRAs")
    return torch.stack(feats), members, groups


def run_demo(
    out: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    recipe: str | os.PathLike[str] | None = None,
    progress: bool = True,
    folds: int = 5,
    probe: bool = False,
    repeats: int = DEMO_REPEATS,
) -> DemoResult:
    """Build (or reuse) the quickstart zoo in ``out``, then probe it. Re-running resumes an
    interrupted build and reuses a finished one (the runner's work dir makes this exact)."""
    from lora_zoo.build.runner import build

    out_path = Path(out)
    built = False
    if not zoo_is_complete(out_path) or overrides:
        logger.info("building the quickstart zoo into %s", out_path)
        res = build(
            str(recipe or quickstart_recipe_path()),
            out_path,
            overrides=list(overrides),
            progress=progress,
        )
        if res.zoo is None:
            raise RuntimeError(f"quickstart build did not finish: {res.counts}")
        built = True
    else:
        logger.info("reusing the finished zoo in %s", out_path)
    from lora_zoo.lol.bench import run_bench

    results: list[ProbeResult] = []
    if probe:
        x, members, groups = svals_features(out_path)
        results = membership_probe(x, members, groups, folds=folds, seed=0)
    bench = run_bench(
        out_path,
        "in_group.*",
        models=DEMO_MODELS,
        views=DEMO_VIEWS,
        repeats=repeats,
        progress=progress,
    )
    n = bench["n"]["fit"] + bench["n"]["valid"] + bench["n"]["test"]
    return DemoResult(out_path, n, results, built, bench)
