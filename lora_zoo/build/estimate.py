"""Compute and memory of a whole zoo, before it is built (``lora-zoo plan RECIPE --estimate``).

Why: a paper-size zoo is thousands of LoRAs on a 0.5-1B base; the user must choose the
accelerator, K and a budget of GPU-hours before downloading anything. The builder's
``cost_model`` (``build.api.CostModel``) gives FLOPs per training sample and per LoRA's
evaluation and the memory of one pass, from the architecture on a shape-only device; this
module samples the recipe's ``vary:`` distributions exactly as ``plan`` does (same seeds) to
average the per-LoRA cost, and turns it into a zoo total, hours on a named accelerator at a
stated utilisation (an assumption, printed beside the figure, until a measured one replaces
it) and the largest K that fits a card. ``build`` refuses a K that cannot fit (``check_fits``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_zoo.build.recipe import Recipe
from lora_zoo.build.space import sample
from lora_zoo.errors import BuildError
from lora_zoo.seeding import rng

log = logging.getLogger(__name__)

# Dense bf16 peak of one accelerator (vendor datasheets, SXM parts, no sparsity), FLOP/s.
ACCELERATORS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
# Model FLOPs utilisation assumed until a measured one replaces it (small LoRA batches on a
# frozen base: below the 40-50 % of large pretraining runs).
DEFAULT_UTILISATION = 0.3
CARDS_GIB = (24, 40, 80)
_SAMPLE = 512  # jobs drawn to average the per-LoRA cost (all of them when fewer)


@dataclass(frozen=True)
class ZooEstimate:
    recipe: str
    num_loras: int
    k: int
    cost: Any  # build.api.CostModel
    train_flops: float  # per LoRA, mean over the plan
    eval_flops: float  # per LoRA
    rows_per_pass: int  # per LoRA, the largest over the plan
    accelerator: str
    utilisation: float

    @property
    def total_flops(self) -> float:
        return self.num_loras * (self.train_flops + self.eval_flops)

    @property
    def hours(self) -> float:
        return self.total_flops / (ACCELERATORS[self.accelerator] * self.utilisation) / 3600

    def mem_at(self, k: int) -> Any:
        """``engine.memory.MemoryEstimate`` of one batched pass of ``k`` LoRAs."""
        return _with_rows(self.cost.memory, k, self.rows_per_pass)


def _with_rows(m: Any, k: int, rows: int) -> Any:
    return type(m)(k, rows, m.base, m.lora_state, m.per_row, m.transient)


def largest_k(mem: Any, capacity: int) -> int:
    """The largest K whose pass fits ``capacity`` bytes (0: not even one LoRA)."""
    per_k = mem.at(1).total - mem.base
    free = capacity - mem.base
    return max(0, int(free // per_k)) if per_k > 0 else 1 << 20


def _jobs_hparams(recipe: Recipe) -> tuple[list[dict[str, Any]], float | None]:
    """The resolved ``vary:`` values of the first ``_SAMPLE`` jobs (plan's own draws) and the
    mean subset ``count``."""
    n = min(recipe.model.num_loras, _SAMPLE)
    hps = [
        {
            name: sample(d, rng(recipe.seed, i, f"hparams/{name}"), i)
            for name, d in recipe.vary.items()
        }
        for i in range(n)
    ]
    count = None
    if recipe.subset_count is not None:
        draws = [
            sample(recipe.subset_count, rng(recipe.seed, i, "subset/count"), i) for i in range(n)
        ]
        count = sum(float(c) for c in draws) / n
    return hps, count


def estimate_recipe(
    recipe: Recipe,
    *,
    seq_len: int | None = None,
    examples: int | None = None,
    accelerator: str = "H100",
    utilisation: float = DEFAULT_UTILISATION,
    k: int | None = None,
) -> ZooEstimate:
    """The zoo's estimate (module docstring); no download, no weights."""
    if accelerator not in ACCELERATORS:
        raise BuildError(
            f"unknown accelerator {accelerator!r}; choose one of {sorted(ACCELERATORS)}",
            key="accelerator",
        )
    if not 0 < utilisation <= 1:
        raise BuildError(f"utilisation must be in (0, 1], got {utilisation}", key="utilisation")
    hps, count = _jobs_hparams(recipe)
    sub = recipe.model.subset
    subset = {"mode": sub.mode, "count": count} if sub is not None else None
    cost = cost_model(recipe, seq_len=seq_len, examples=examples, subset=subset)
    train = sum(cost.samples_per_lora(h) for h in hps) / len(hps) * cost.train_flops_per_sample
    rows = max(int(cost.rows_per_pass(h)) for h in hps)
    return ZooEstimate(
        recipe=recipe.name,
        num_loras=recipe.model.num_loras,
        k=int(k or recipe.k),
        cost=cost,
        train_flops=train,
        eval_flops=cost.eval_flops_per_lora,
        rows_per_pass=rows,
        accelerator=accelerator,
        utilisation=utilisation,
    )


def cost_model(recipe: Recipe, **kw: Any) -> Any:
    """The builder's ``cost_model`` for this recipe's config (BuildError if it has none)."""
    fn = getattr(recipe.builder_cls, "cost_model", None)
    if fn is None:
        raise BuildError(
            f"builder {recipe.builder!r} has no cost_model: no estimate for it", key="builder"
        )
    return fn(recipe.config, **kw)


def _fmt(x: float) -> str:
    for unit, f in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if x >= f:
            return f"{x / f:.3g} {unit}FLOP"
    return f"{x:.3g} FLOP"


def format_estimate(est: ZooEstimate, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> str:
    """The table ``plan --estimate`` prints (and the recipes' header comments quote)."""
    c = est.cost
    lines = [
        f"# {est.recipe}: {est.num_loras} LoRAs, k={est.k}; {c.architecture}",
        f"FLOPs per LoRA: training {_fmt(est.train_flops)}, evaluation {_fmt(est.eval_flops)}",
        f"FLOPs for the zoo: {_fmt(est.total_flops)}",
        f"time on one {est.accelerator} ({ACCELERATORS[est.accelerator] / 1e12:.0f} TFLOP/s bf16"
        f" peak) at {est.utilisation:.0%} utilisation (an assumption, not measured): "
        f"{est.hours:.3g} GPU-hours",
        f"memory per batched pass ({est.rows_per_pass} rows per LoRA):",
    ]
    m0 = est.mem_at(est.k)
    for k in sorted(set(ks) | {est.k}):
        m = m0.at(k)
        lines.append(
            f"  K={k:<3} {m.total / 2**30:8.2f} GiB" + ("  <- recipe" if k == est.k else "")
        )
    fits = ", ".join(f"{g} GiB: K<={largest_k(m0, g << 30)}" for g in CARDS_GIB)
    lines.append(f"largest K that fits: {fits}")
    lines += [f"assumed: {a}" for a in c.assumptions]
    return "\n".join(lines)


def device_capacity(device: str) -> int:
    """Bytes of memory of ``device``: the GPU's total, or the machine's physical memory."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_fits(recipe: Recipe, k: int, device: str) -> None:
    """Refuse (BuildError naming the largest K that fits) a K whose estimated pass exceeds the
    device's memory; a builder without a cost model, or an architecture the estimate does not
    know offline, is let through with a log line."""
    hps, _ = _jobs_hparams(recipe)
    try:
        cost = cost_model(recipe)
    except BuildError as e:
        log.info("no memory check before the build: %s", e)
        return
    rows = max(int(cost.rows_per_pass(h)) for h in hps)
    mem = _with_rows(cost.memory, k, rows)
    cap = device_capacity(device)
    need = mem.total
    if need > cap:
        best = largest_k(mem, cap)
        raise BuildError(
            f"k={k} needs about {need / 2**30:.1f} GiB per batched pass ({rows} "
            f"rows per LoRA), over the {cap / 2**30:.1f} GiB of {device}; the largest k that "
            f"fits is {best}" + ("" if best else " (not even one: fewer rows per pass)"),
            key="train.k",
        )
    log.info("k=%d: about %.1f GiB of %.1f GiB on %s", k, need / 2**30, cap / 2**30, device)
