"""The shipped t2i-quickstart recipe: ~100 class-subset LoRAs on the tiny pipeline, planned (no
build: the README's bench table comes from a full CLI build), plus the two builder knobs it
relies on (a deterministic, unit-scale latent VAE; ``in_group.<g>`` bool labels)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from lora_zoo.build.plan import plan, resolve_groups
from lora_zoo.build.recipe import load_recipe
from lora_zoo.builders.text_to_image import Config, TextToImageBuilder
from lora_zoo.builders.text_to_image.data import SAMPLE_GROUPS
from lora_zoo.builders.text_to_image.pipeline import TinyPipeline, load_pipeline
from lora_zoo.zoo.splits import group_split
from tests.fixtures.t2i import TINY_PIPE, job, t2i_config

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "t2i-quickstart.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


def test_header_names_the_commands_and_the_measured_runtime():
    head = [ln for ln in RECIPE.read_text().splitlines() if ln.startswith("#")]
    text = "\n".join(head)
    assert "lora-zoo build recipes/t2i-quickstart.yaml" in text
    assert "lora-zoo bench" in text and "in_group.*" in text
    assert "2026-12-01" in text and "2 CPU cores" in text


def test_plan_is_about_a_hundred_class_subset_loras(recipe):
    cfg = recipe.config
    assert isinstance(cfg, Config) and recipe.builder_cls is TextToImageBuilder
    assert cfg.base_model.kind == "config" and cfg.data.kind == "sample_images"
    assert cfg.builder_args.in_group_columns  # -> in_group.<class> bool labels for bench
    groups = resolve_groups(recipe)
    assert groups == sorted(SAMPLE_GROUPS)
    jobs = plan(recipe)
    assert 90 <= len(jobs) == recipe.model.num_loras <= 128
    sizes = collections.Counter(len(j.data["groups_included"]) for j in jobs)
    assert set(sizes) == {2, 3} and min(sizes.values()) >= len(jobs) // 4
    per_class = collections.Counter(g for j in jobs for g in j.data["groups_included"])
    assert set(per_class) == set(groups)
    for n in per_class.values():  # every class is in roughly 2.5/6 of the LoRAs
        assert 0.25 * len(jobs) <= n <= 0.6 * len(jobs)
    assert len({frozenset(j.data["groups_included"]) for j in jobs}) >= 25  # many combinations


def test_group_split_keeps_every_class_on_both_sides(recipe):
    """The split groups LoRAs by their exact class SET: a test LoRA's combination was never
    trained on, yet every class is a positive (and a negative) in both splits, so each
    in_group.<class> label is learnable from train and measurable on test."""
    spec = recipe.model.output.split
    assert (spec.kind, spec.key, spec.lists) == ("group", "groups_included", "set")
    jobs = plan(recipe)
    ids = [j.lora_id for j in jobs]
    inc = {j.lora_id: frozenset(j.data["groups_included"]) for j in jobs}
    parts = group_split(ids, [sorted(inc[i]) for i in ids], spec.fractions, spec.seed)
    assert abs(len(parts["test"]) - spec.fractions["test"] * len(ids)) <= 4
    assert not {inc[i] for i in parts["train"]} & {inc[i] for i in parts["test"]}
    for g in resolve_groups(recipe):
        for split in ("train", "test"):
            pos = sum(g in inc[i] for i in parts[split])
            assert 3 <= pos <= len(parts[split]) - 3, (g, split, pos)


def test_vae_knobs_default_to_the_random_vae_and_fix_its_posterior(tmp_path):
    import torch

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    default = load_pipeline(TinyPipeline(**TINY_PIPE), cache_dir=str(tmp_path))
    assert default.vae.config.scaling_factor == pytest.approx(0.18215)
    d0 = default.vae.encode(x).latent_dist
    assert float(d0.std.mean()) > 0.5  # the random VAE's own posterior: std ~1
    spec = TinyPipeline(**TINY_PIPE, vae_posterior_std=0, vae_scaling_factor=3.0)
    fixed = load_pipeline(spec, cache_dir=str(tmp_path))
    assert fixed.vae.config.scaling_factor == 3.0
    d1 = fixed.vae.encode(x).latent_dist
    assert float(d1.std.max()) < 1e-6
    torch.testing.assert_close(d1.mean, d0.mean)  # only the log-variance half changed
    torch.testing.assert_close(
        fixed.unet.state_dict()["conv_in.weight"], default.unet.state_dict()["conv_in.weight"]
    )
    half = TinyPipeline(**TINY_PIPE, vae_posterior_std=0.5)
    d2 = load_pipeline(half, cache_dir=str(tmp_path)).vae.encode(x).latent_dist
    torch.testing.assert_close(d2.std, torch.full_like(d2.std, 0.5))


def test_in_group_columns_label_every_group(tmp_path):
    from lora_zoo.builders.text_to_image.data import materialize_sample_images

    root = materialize_sample_images(tmp_path / "img", ["animal", "object", "people"])
    base = t2i_config(root, eval={"enabled": False}, train={"steps": 1, "k": 2})
    base["data"]["groups"] = ["animal", "object", "people"]
    jobs = [job(0, ["animal", "people"]), job(1, ["object"])]
    res = TextToImageBuilder(
        Config.model_validate({**base, "builder_args": {"in_group_columns": True}}),
        cache_dir=str(tmp_path),
    ).train(jobs)
    assert [r.scores["in_group"] for r in res] == [
        {"animal": True, "object": False, "people": True},
        {"animal": False, "object": True, "people": False},
    ]
    assert res[0].scores["membership"] == [1, 0, 1]
    off = TextToImageBuilder(Config.model_validate(base), cache_dir=str(tmp_path)).train(jobs[:1])
    assert "in_group" not in off[0].scores  # off by default (CelebA: ~10k identities)
