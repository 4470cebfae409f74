"""Recipe -> list[JobSpec]: every per-LoRA value resolved, deterministically.

Why plan up front: the plan (``jobs.jsonl``) is the build's contract. The runner, shards,
resume and ``rebuild`` of a single LoRA all work from it, and it depends only on the recipe:
job ``i``'s seeds, hparams and data selection come from ``seeding.derive_seed(seed, i, ...)``,
never from the job's neighbours, so ``--limit``, ``--shard`` and ``only_ids`` select jobs
without changing them.

Subset rules (``subset:`` in the recipe; G = the group list, explicit or ``from_data`` via
``builder_cls.list_groups(config)``, in that order):

- ``mode: all``: every group (``groups_included = G``, or null when the recipe has no groups).
- ``mode: include``: ``count`` groups are chosen and trained on; the rest are excluded.
- ``mode: leave_out``: ``count`` groups are chosen and left out; the rest are included.
- ``assign: random``: the chosen groups are the first ``count`` of a seeded permutation
  (stream ``subset``); ``assign: cycle``: job i takes groups ``(i*count + j) % len(G)``,
  so each group is chosen equally often.
- ``size``: ``subset_size`` (examples the builder draws from the included groups with
  ``seeds["data"]``); null = all of them.

``JobSpec.data = {groups_included, groups_excluded, subset_size}`` (included/excluded in G's
order). Every ``vary:`` entry lands in ``JobSpec.hparams`` (stream ``hparams/<name>``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from lora_zoo.build.api import JobSpec
from lora_zoo.build.recipe import Recipe
from lora_zoo.build.space import sample
from lora_zoo.errors import RecipeError
from lora_zoo.seeding import job_seeds, rng

log = logging.getLogger(__name__)


def resolve_groups(recipe: Recipe) -> list[str] | None:
    """The recipe's group list (asking the builder's data source for ``from_data``)."""
    sub = recipe.model.subset
    if sub is None or sub.groups is None:
        return None
    if sub.groups == "from_data":
        groups = [str(g) for g in recipe.builder_cls.list_groups(recipe.config)]
        if not groups and sub.mode != "all":
            raise RecipeError(
                [
                    f"{recipe.file}: subset.groups - from_data, but the builder's "
                    "data source has no groups"
                ],
                file=recipe.file,
            )
        return groups
    return list(sub.groups)


def _permutation(n: int, g: Any) -> list[int]:
    """Fisher-Yates driven by ``g.random()`` only (see space.py for why)."""
    idx = list(range(n))
    for i in range(n - 1, 0, -1):
        j = min(int(float(g.random()) * (i + 1)), i)
        idx[i], idx[j] = idx[j], idx[i]
    return idx


def _as_int(value: Any, where: str, recipe: Recipe, lo: int, hi: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise RecipeError(
            [f"{recipe.file}: {where} - must be an integer, got {value!r}"], file=recipe.file
        )
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng_txt = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RecipeError([f"{recipe.file}: {where} - {v} is outside {rng_txt}"], file=recipe.file)
    return v


def _data(recipe: Recipe, index: int, groups: list[str] | None) -> dict[str, Any]:
    sub = recipe.model.subset
    size = None
    if recipe.subset_size is not None:
        raw = sample(recipe.subset_size, rng(recipe.seed, index, "subset/size"), index)
        if raw is not None:
            size = _as_int(raw, "subset.size", recipe, 1, None)
    if sub is None or groups is None:
        return {"groups_included": None, "groups_excluded": [], "subset_size": size}
    if sub.mode == "all":
        return {"groups_included": list(groups), "groups_excluded": [], "subset_size": size}
    assert recipe.subset_count is not None
    n = len(groups)
    raw = sample(recipe.subset_count, rng(recipe.seed, index, "subset/count"), index)
    lo, hi = (1, n) if sub.mode == "include" else (0, n - 1)
    count = _as_int(raw, "subset.count", recipe, lo, hi)
    if sub.assign == "cycle":
        chosen = {(index * count + j) % n for j in range(count)}
    else:
        chosen = set(_permutation(n, rng(recipe.seed, index, "subset"))[:count])
    picked = [g for i, g in enumerate(groups) if i in chosen]
    rest = [g for i, g in enumerate(groups) if i not in chosen]
    inc, exc = (picked, rest) if sub.mode == "include" else (rest, picked)
    return {"groups_included": inc, "groups_excluded": exc, "subset_size": size}


def lora_id(recipe: Recipe, index: int) -> str:
    return recipe.model.lora_id_format.format(name=recipe.name, index=index)


def plan(
    recipe: Recipe,
    *,
    limit: int | None = None,
    only_ids: Iterable[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[JobSpec]:
    """All jobs of ``recipe`` (index order), optionally filtered by ``only_ids`` (unknown ids
    are an error), ``shard=(i, n)`` (index % n == i) and ``limit`` (first N after filtering)."""
    n = recipe.model.num_loras
    ids = [lora_id(recipe, i) for i in range(n)]
    if len(set(ids)) != n:
        dup = next(x for x in ids if ids.count(x) > 1)
        raise RecipeError(
            [f"{recipe.file}: lora_id_format - gives {dup!r} twice"], file=recipe.file
        )
    indices = list(range(n))
    if only_ids is not None:
        want = list(only_ids)
        pos = {x: i for i, x in enumerate(ids)}
        missing = [x for x in want if x not in pos]
        if missing:
            raise RecipeError(
                [
                    f"{recipe.file}: only_ids - {missing[0]!r} is not a lora_id of "
                    f"this recipe ({len(missing)} unknown)"
                ],
                file=recipe.file,
            )
        keep = {pos[x] for x in want}
        indices = [i for i in indices if i in keep]
    if shard is not None:
        si, sn = shard
        if not (sn >= 1 and 0 <= si < sn):
            raise RecipeError(
                [f"{recipe.file}: shard - need 0 <= I < N, got {si}/{sn}"], file=recipe.file
            )
        indices = [i for i in indices if i % sn == si]
    if limit is not None:
        indices = indices[: max(0, limit)]
    groups = resolve_groups(recipe) if indices else None
    jobs = []
    for i in indices:
        hp = {
            name: sample(d, rng(recipe.seed, i, f"hparams/{name}"), i)
            for name, d in recipe.vary.items()
        }
        jobs.append(
            JobSpec(
                index=i,
                lora_id=ids[i],
                seeds=job_seeds(recipe.seed, i),
                hparams=hp,
                data=_data(recipe, i, groups),
            )
        )
    return jobs


def jobs_to_jsonl(jobs: Sequence[JobSpec]) -> str:
    return "".join(json.dumps(j.to_dict(), sort_keys=True) + "\n" for j in jobs)


def jobs_from_jsonl(text: str) -> list[JobSpec]:
    return [JobSpec.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(jobs: Sequence[JobSpec]) -> str:
    """Human-readable job table: index, lora_id, hparams, groups (and subset size)."""
    rows = [("index", "lora_id", "hparams", "groups")]
    for j in jobs:
        hp = " ".join(f"{k}={_short(v)}" for k, v in j.hparams.items()) or "-"
        inc = j.data.get("groups_included")
        exc = j.data.get("groups_excluded") or []
        grp = "all" if inc is None else ",".join(inc) or "-"
        if exc:
            grp += f" (-{','.join(exc)})"
        if j.data.get("subset_size") is not None:
            grp += f" n={j.data['subset_size']}"
        rows.append((str(j.index), j.lora_id, hp, grp))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join(
        "  ".join(
            [r[0].rjust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]), r[3]]
        ).rstrip()
        for r in rows
    )
