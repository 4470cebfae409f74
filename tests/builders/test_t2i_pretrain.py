"""``base_model.pretrain_steps`` of the text-to-image builder: the config-built UNet trained
further before the LoRAs (the SD-1.4 -> SD-1.5 twin, recipes/t2i-quickstart-sd15-twin.yaml).

What must hold: steps > 0 moves the UNet (and only the UNet), the same spec gives bitwise the
same weights in a fresh cache, a second builder loads them from the cache without training and
records the same base facts, and steps = 0 leaves today's seeded weights untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lora_zoo.build.plan import plan
from lora_zoo.build.recipe import load_recipe
from lora_zoo.builders.text_to_image import Config, TextToImageBuilder
from lora_zoo.builders.text_to_image import pretrain as pretrain_mod
from lora_zoo.builders.text_to_image.data import materialize_sample_images
from tests.fixtures.t2i import SMOKE_GROUPS, t2i_config

STEPS = 4


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return materialize_sample_images(tmp_path_factory.mktemp("samples"), SMOKE_GROUPS)


def _builder(root, cache, **base) -> TextToImageBuilder:
    cfg = Config.model_validate(t2i_config(root, base_model=base))
    return TextToImageBuilder(cfg, cache_dir=str(cache))


def _weights(b: TextToImageBuilder, part: str = "unet") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in getattr(b.pipe, part).state_dict().items()}


def test_pretrain_moves_the_unet_deterministically_and_is_cached(
    sample_root, tmp_path, monkeypatch
):
    plain = _builder(sample_root, tmp_path / "c0")
    w0, vae0 = _weights(plain), _weights(plain, "vae")
    assert plain.base_info == {}

    rng = torch.get_rng_state()
    b1 = _builder(sample_root, tmp_path / "c1", pretrain_steps=STEPS, pretrain_batch_size=2)
    w1 = _weights(b1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    info = b1.base_info
    assert info["pretrain_steps"] == STEPS and len(info["base_model_hash"]) == 16
    assert math.isfinite(info["pretrain_loss_first"]) and math.isfinite(info["pretrain_loss_last"])
    # the recorded relative change is the one the weights show (float64 sums of float32 squares:
    # 1e-6 relative is far above their rounding, far below any real disagreement)
    num = sum(float(((w1[k].double() - w0[k].double()) ** 2).sum()) for k in w0)
    den = sum(float((w0[k].double() ** 2).sum()) for k in w0)
    assert info["pretrain_rel_change"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    # 4 AdamW steps at lr 1e-4 move each weight by about 4e-4 at most: a real but small change
    assert 1e-5 < info["pretrain_rel_change"] < 0.1
    assert sum(not torch.equal(w0[k], w1[k]) for k in w0) > len(w0) // 2
    assert all(torch.equal(vae0[k], v) for k, v in _weights(b1, "vae").items())  # UNet only
    assert all(not p.requires_grad for p in b1.pipe.unet.parameters())  # frozen again
    assert not b1.pipe.unet.training

    b2 = _builder(sample_root, tmp_path / "c2", pretrain_steps=STEPS, pretrain_batch_size=2)
    w2 = _weights(b2)  # a fresh cache: trained again, bitwise the same
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert b2.base_info == info

    def refuse(*a, **k):
        raise AssertionError("trained although the cache holds this base")

    monkeypatch.setattr(pretrain_mod, "train_unet", refuse)
    b3 = _builder(sample_root, tmp_path / "c1", pretrain_steps=STEPS, pretrain_batch_size=2)
    w3 = _weights(b3)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    assert b3.base_info == info  # the stats travel in the cached file
    files = list((tmp_path / "c1" / "base_models").glob("tiny-sd-unet-*.safetensors"))
    assert [f.name for f in files] == [f"tiny-sd-unet-{info['base_model_hash']}.safetensors"]

    # another pretraining seed is another base: another key, so it is not a cache hit
    b4 = _builder(
        sample_root, tmp_path / "c1", pretrain_steps=STEPS, pretrain_batch_size=2, pretrain_seed=7
    )
    with pytest.raises(AssertionError, match="trained although"):
        _ = b4.pipe


def test_zero_steps_is_the_seeded_base_exactly(sample_root, tmp_path):
    plain = _builder(sample_root, tmp_path / "a")
    zero = _builder(sample_root, tmp_path / "b", pretrain_steps=0, pretrain_lr=1.0)
    w0, wz = _weights(plain), _weights(zero)
    assert all(torch.equal(w0[k], wz[k]) for k in w0)
    assert zero.base_info == {}
    assert not (tmp_path / "b" / "base_models").exists()


def test_sd15_twin_recipe_is_t2i_quickstart_with_its_base_trained_further():
    """The twin's LoRAs differ from t2i-quickstart's by their base only: the same jobs (groups,
    seeds, hyperparameters) and sections, the base's seeded config unchanged, pretraining on."""
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    a = load_recipe(recipes / "t2i-quickstart.yaml")
    b = load_recipe(recipes / "t2i-quickstart-sd15-twin.yaml")
    ra, rb = a.resolved, b.resolved
    assert {k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)} == {
        "name",
        "lora_id_format",
        "base_model",
    }
    base_b = {k: v for k, v in rb["base_model"].items() if not k.startswith("pretrain_")}
    assert base_b == ra["base_model"] and b.config.base_model.pretrain_steps > 0
    ja, jb = plan(a), plan(b)
    assert len(ja) == len(jb)
    for x, y in zip(ja, jb):
        assert (x.seeds, x.hparams, x.data) == (y.seeds, y.hparams, y.data)
    # `plan --estimate` says the base's pretraining is outside its per-LoRA figures
    notes = TextToImageBuilder.cost_model(
        b.config
    ).assumptions  # (t2i-quickstart's has no such note: steps 0)
    assert [n for n in notes if "pretraining" in n] == [
        "not counted: the base's 200 full-UNet pretraining steps x 8 images (once per build, cached)"
    ]
