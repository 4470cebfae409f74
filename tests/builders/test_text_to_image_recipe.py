"""The shipped t2i smoke recipe through the real plan -> runner -> pack path, offline."""

from __future__ import annotations

import pytest

from lora_zoo.builders.text_to_image import TextToImageBuilder


@pytest.mark.slow
def test_t2i_smoke_recipe_builds_a_zoo_with_group_split(tmp_path):
    from lora_zoo.build.runner import build
    from lora_zoo.load.source import load_zoo

    # smaller than the shipped recipe (which is sized for a ~1-2 min CLI run)
    overrides = [
        "num_loras=6",
        "vary.steps=3",
        "eval.steps=2",
        "base_model.resolution=16",
        "data.resolution=16",
        f"data.root={tmp_path / 'img'}",
        "eval.clip.image_size=16",
        "eval.clip.patch_size=4",
        "train.k=3",
    ]
    res = build("recipes/t2i-smoke.yaml", tmp_path / "zoo", overrides=overrides, progress=False)
    assert res.counts == {"done": 6, "failed": 0, "pending": 0}
    zoo = load_zoo(tmp_path / "zoo")
    rows = {s: [zoo[s].row(i) for i in range(len(zoo[s]))] for s in zoo.splits}
    assert sum(map(len, rows.values())) == 6
    groups = {s: {g for r in rs for g in r["groups_included"]} for s, rs in rows.items()}
    assert set(zoo.splits) == {"train", "test"}
    assert not (groups["train"] & groups["test"])  # no class in both splits
    r = rows["train"][0]
    assert len(r["groups_included"]) == 1 and sum(r["membership"]) == 1
    assert r["prompt"] in ("sks", "skd") and r["hp.steps"] == 3
    assert len(r["train_example_sha256"]) == len(r["train_example_ids"]) == 6
    assert len(r["clip_score_per_prompt"]) == 2
    rec = zoo["train"].record(0)
    assert rec.config["r"] == 4
    assert set(rec.config["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0" in rec.modules


def test_list_groups_reads_the_folder(tmp_path):
    from lora_zoo.builders.text_to_image import Config
    from tests.fixtures.t2i import t2i_config

    cfg = Config.model_validate(t2i_config(tmp_path / "img"))
    assert TextToImageBuilder.list_groups(cfg) == ["animal", "object", "people", "scene"]
