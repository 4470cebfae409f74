"""The backdoor recipes (issue 21) state the mix the issue asks for, and plan it: half clean,
half poisoned (5-20 % in the quickstart zoo, whose toy budget needs that many poisoned rows
for the backdoor to fire, 1-10 % in the SmolLM2 one, PADBench's 5 % in the 7B one), the
three trigger kinds equally often, every value drawn through ``vary:`` (``tests/test_recipes.py``
validates and plans every shipped recipe as well)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lora_zoo.build.plan import plan
from lora_zoo.build.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"rare_token", "sentence", "prefix"}


@pytest.mark.parametrize(
    ("name", "rates", "target"),
    [
        ("backdoor-quickstart", (0.05, 0.2), "continuation"),
        ("backdoor-smollm2", (0.01, 0.1), "continuation"),
        ("backdoor-llama2-7b-padbench", (0.05, 0.05), "flip"),
    ],
)
def test_backdoor_recipe_plans_half_clean_and_balanced_kinds(name, rates, target):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert r.config.poison is not None and r.config.poison.target == target
    jobs = plan(r)
    rate = [float(j.hparams["poison_rate"]) for j in jobs]
    clean = sum(x == 0.0 for x in rate) / len(rate)
    # half clean: binomial(n, 1/2), 4 standard deviations (n >= 48: 0.5 +- 0.29 at worst)
    assert abs(clean - 0.5) <= 4 * (0.25 / len(rate)) ** 0.5
    assert all(x == 0.0 or rates[0] <= x <= rates[1] for x in rate)
    kinds = Counter(j.hparams["trigger_kind"] for j in jobs)
    assert set(kinds) == KINDS and max(kinds.values()) - min(kinds.values()) <= 1
    # the per-LoRA draws come from the LoRA's own streams: a --limit plan agrees
    assert [j.hparams for j in plan(r, limit=7)] == [j.hparams for j in jobs[:7]]


def test_padbench_recipe_is_a_pinned_7b_gpu_recipe():
    r = load_recipe(ROOT / "recipes" / "backdoor-llama2-7b-padbench.yaml")
    bm = r.config.base_model
    assert bm.id == "meta-llama/Llama-2-7b-hf" and len(bm.revision) == 40
    assert r.model.num_loras == 2000 and r.config.train.autocast == "bfloat16"
    head = (ROOT / "recipes" / "backdoor-llama2-7b-padbench.yaml").read_text().split("\nname:")[0]
    assert "H100" in head and "H100-hours" in head
