"""plan.py: deterministic expansion; every value depends only on (recipe seed, index)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lora_zoo.build.plan import format_table, jobs_from_jsonl, jobs_to_jsonl, lora_id, plan
from lora_zoo.build.recipe import load_recipe_text
from lora_zoo.build.space import sample
from lora_zoo.errors import RecipeError
from lora_zoo.seeding import derive_seed, job_seeds, rng
from tests.fixtures.toy_builder import TOY_RECIPE, register, toy_recipe


@pytest.fixture(autouse=True)
def _toy():
    register()


def _r(**changes):
    return load_recipe_text(toy_recipe(**changes) if changes else TOY_RECIPE, file="t.yaml")


def test_same_recipe_same_jobs_and_slow_path():
    a, b = plan(_r()), plan(_r())
    assert [j.to_dict() for j in a] == [j.to_dict() for j in b]
    assert jobs_to_jsonl(a) == jobs_to_jsonl(b)
    r = _r()
    for j in a:
        assert j.lora_id == f"toy-{j.index:03d}"
        assert dict(j.seeds) == job_seeds(7, j.index)
        # hparams: each from its own stream hparams/<name>, recomputed the obvious way
        for name, d in r.vary.items():
            assert j.hparams[name] == sample(d, rng(7, j.index, f"hparams/{name}"), j.index)
        assert 0.01 <= j.hparams["lr"] <= 0.1 and j.hparams["steps"] in (10, 20)
        # leave_out 1, cycle: job i leaves out group i % 4
        assert j.data["groups_excluded"] == [["a", "b", "c", "d"][j.index % 4]]
        assert sorted(j.data["groups_included"] + j.data["groups_excluded"]) == list("abcd")
        assert j.data["subset_size"] == 20
    assert len({j.hparams["lr"] for j in a}) == len(a)


def test_seed_changes_everything_random():
    a, b = plan(_r()), plan(_r(seed=8))
    assert all(x.seeds != y.seeds for x, y in zip(a, b))
    assert [x.hparams["lr"] for x in a] != [y.hparams["lr"] for y in b]


def test_jobs_independent_of_neighbours():
    full = plan(_r(num_loras=12))
    by_idx = {j.index: j.to_dict() for j in full}
    # more LoRAs, a shard, a limit or only_ids never change a job
    for sub in (
        plan(_r(num_loras=5)),
        plan(_r(num_loras=12), shard=(1, 3)),
        plan(_r(num_loras=12), limit=4),
        plan(_r(num_loras=12), only_ids=["toy-010", "toy-002"]),
    ):
        for j in sub:
            assert j.to_dict() == by_idx[j.index]
    # adding a varied hparam does not change the draws of the others
    more = plan(
        _r(
            num_loras=12,
            vary={
                "lr": {"kind": "loguniform", "low": 0.01, "high": 0.1},
                "steps": {"kind": "choice", "values": [10, 20]},
                "alpha": {"kind": "uniform", "low": 1, "high": 8},
            },
        )
    )
    assert [j.hparams["lr"] for j in more] == [j.hparams["lr"] for j in full]


def test_shard_limit_only_ids():
    r = _r(num_loras=10)
    shards = [plan(r, shard=(i, 3)) for i in range(3)]
    assert [j.index for j in shards[1]] == [1, 4, 7]
    assert sorted(j.index for s in shards for j in s) == list(range(10))
    assert [j.index for j in plan(r, limit=3)] == [0, 1, 2]
    assert [j.index for j in plan(r, shard=(0, 2), limit=2)] == [0, 2]
    assert plan(r, limit=0) == []
    assert [j.index for j in plan(r, only_ids=["toy-007", "toy-001"])] == [1, 7]
    with pytest.raises(RecipeError, match="'toy-099' is not a lora_id"):
        plan(r, only_ids=["toy-099"])
    for bad in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(RecipeError, match="shard - need 0 <= I < N"):
            plan(r, shard=bad)


def test_subset_modes():
    groups = ["g0", "g1", "g2", "g3", "g4"]
    # include, random: count groups from a seeded permutation
    r = _r(
        num_loras=40,
        data={"groups": groups},
        subset={"groups": "from_data", "mode": "include", "count": 2},
    )
    jobs = plan(r)
    for j in jobs:
        assert len(j.data["groups_included"]) == 2 and len(j.data["groups_excluded"]) == 3
        # included/excluded stay in G's order
        assert j.data["groups_included"] == sorted(j.data["groups_included"])
        assert j.data["subset_size"] is None
    # random assignment covers different pairs
    assert len({tuple(j.data["groups_included"]) for j in jobs}) > 4
    # cycle: every group chosen equally often
    r = _r(
        num_loras=10,
        data={"groups": groups},
        subset={"groups": "from_data", "mode": "include", "count": 2, "assign": "cycle"},
    )
    c = Counter(g for j in plan(r) for g in j.data["groups_included"])
    assert set(c.values()) == {4}
    # explicit groups + count as a distribution + size as a distribution
    r = _r(
        num_loras=30,
        subset={
            "groups": ["a", "b", "c"],
            "mode": "leave_out",
            "count": {"kind": "randint", "low": 0, "high": 2},
            "size": {"kind": "choice", "values": [5, 10]},
        },
    )
    jobs = plan(r)
    assert {len(j.data["groups_excluded"]) for j in jobs} == {0, 1, 2}
    assert {j.data["subset_size"] for j in jobs} == {5, 10}
    # all
    r = _r(subset={"groups": ["a", "b"], "mode": "all"})
    assert all(
        j.data == {"groups_included": ["a", "b"], "groups_excluded": [], "subset_size": None}
        for j in plan(r)
    )
    # no subset section
    raw = toy_recipe()
    r = load_recipe_text(
        "\n".join(
            line
            for line in raw.splitlines()
            if not line.startswith(
                ("subset", "  groups: from", "  mode", "  count", "  assign", "  size")
            )
        )
    )
    assert r.model.subset is None
    assert plan(r)[0].data == {"groups_included": None, "groups_excluded": [], "subset_size": None}


@pytest.mark.parametrize(
    "subset,needle",
    [
        (
            {"groups": ["a", "b"], "mode": "leave_out", "count": 2},
            "subset.count - 2 is outside [0, 1]",
        ),
        (
            {"groups": ["a", "b"], "mode": "include", "count": 0},
            "subset.count - 0 is outside [1, 2]",
        ),
        (
            {"groups": ["a", "b"], "mode": "include", "count": 1.5},
            "subset.count - must be an integer",
        ),
        ({"groups": ["a", "b"], "mode": "all", "size": 0}, "subset.size - 0 is outside"),
        ({"groups": ["a", "b"], "mode": "all", "size": "x"}, "subset.size - must be an integer"),
    ],
)
def test_subset_errors_at_plan_time(subset, needle):
    with pytest.raises(RecipeError, match=needle.replace("[", r"\[").replace("]", r"\]")) as ei:
        plan(_r(subset=subset))
    assert ei.value.problems[0].startswith("t.yaml: ")


def test_from_data_without_groups():
    r = _r(data={"groups": []}, subset={"groups": "from_data", "mode": "include", "count": 1})
    with pytest.raises(RecipeError, match="has no groups"):
        plan(r)


def test_id_collisions():
    r = _r(lora_id_format="x{index}")
    assert lora_id(r, 3) == "x3"
    # passes the 0-vs-1 check at validation, collides at index 10: plan refuses
    r = _r(num_loras=12, lora_id_format="x{index!s:.1}")
    with pytest.raises(RecipeError, match="lora_id_format - gives 'x1' twice"):
        plan(r)


def test_jsonl_roundtrip_and_table():
    jobs = plan(_r())
    text = jobs_to_jsonl(jobs)
    assert [json.loads(line)["lora_id"] for line in text.splitlines()] == [j.lora_id for j in jobs]
    assert jobs_from_jsonl(text) == jobs
    table = format_table(jobs)
    lines = table.splitlines()
    assert lines[0].split() == ["index", "lora_id", "hparams", "groups"]
    assert len(lines) == 1 + len(jobs)
    assert "toy-002" in lines[3] and "(-c)" in lines[3] and "n=20" in lines[3]
    assert f"lr={jobs[2].hparams['lr']:.4g}" in lines[3]
    assert derive_seed(7, 2, "init") == jobs[2].seeds["init"]


def test_no_global_randomness_used():
    import random

    import numpy as np
    import torch

    ref = jobs_to_jsonl(plan(_r(num_loras=8)))
    for s in (1, 2):
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        state = (
            random.getstate(),
            np.random.get_state()[1].tobytes(),
            torch.random.get_rng_state(),
        )
        assert jobs_to_jsonl(plan(_r(num_loras=8))) == ref
        after = (
            random.getstate(),
            np.random.get_state()[1].tobytes(),
            torch.random.get_rng_state(),
        )
        assert state[0] == after[0] and state[1] == after[1] and torch.equal(state[2], after[2])
