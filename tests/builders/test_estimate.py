"""``lora-zoo plan --estimate``: FLOP counts against torch's counter, every shipped recipe
estimated offline, and ``build`` refusing a K that cannot fit.

The causal-LM count is a formula (builders/causal_lm/estimate.py); torch's ``FlopCounterMode``
runs the real model: on real CPU tensors for the tiny Llama (the whole training step of the
engine: forward, loss, backward) and on the fake device for Qwen2-0.5B (same code, shapes
only). Both count integers, so they must agree exactly. The SD UNet's estimate is itself a
count on the fake device; it is checked against the counter around a real step of the tiny
pipeline on CPU tensors, which must also agree exactly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lora_zoo.build.estimate import check_fits, estimate_recipe, format_estimate, largest_k
from lora_zoo.build.recipe import load_recipe
from lora_zoo.builders.causal_lm.config import CausalLMConfig
from lora_zoo.builders.causal_lm.estimate import HUB_ARCHITECTURES, build_shape_model, row_flops
from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import LoraSpec, MultiLoraModel
from lora_zoo.engine.cost import count_flops, fake_device
from lora_zoo.errors import BuildError

# the paper-size ones run the real architecture on the fake device: ~30 s each on 2 cores
_BIG = pytest.mark.slow
RECIPES = [
    "quickstart",
    "t2i-smoke",
    "t2i-quickstart",
    pytest.param("smollm2-quickstart", marks=_BIG),
    pytest.param("arc-qwen2-r4", marks=_BIG),
    pytest.param("celeba-sd14-r4", marks=_BIG),
    pytest.param("imagenette-sd14-r32", marks=_BIG),
    pytest.param("imagenette-sd15-r32", marks=_BIG),
]


def _lm_config(base: dict, targets: list[str], r: int) -> CausalLMConfig:
    return CausalLMConfig.model_validate(
        {
            "base_model": base,
            "lora": {"r": r, "target_modules": targets},
            "data": {"kind": "generator", "n_examples": 20},
        }
    )


def test_causal_lm_formula_equals_counter_on_a_real_training_step():
    cfg = _lm_config(
        {
            "kind": "config",
            "architecture": "llama",
            "config": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
        },
        ["q_proj", "v_proj", "down_proj"],
        4,
    )
    model = build_shape_model(cfg)  # real CPU tensors here (not inside fake_device)
    k, b, t = 2, 3, 24
    fwd, train = row_flops(model, cfg.lora.target_modules, 4, t)  # before the LoRA wrappers
    MultiLoraModel(model, cfg.lora.target_modules, [LoraSpec(r=4, init_seed=i) for i in range(k)])
    ids = torch.randint(0, 100, (k * b, t), generator=torch.Generator().manual_seed(0))
    counted = count_flops(
        lambda: causal_lm_losses(model(input_ids=ids).logits, ids, k).sum().backward()
    )
    with torch.no_grad():
        fwd_counted = count_flops(lambda: model(input_ids=ids))
    assert fwd_counted == k * b * fwd
    assert counted == k * b * train


@pytest.mark.slow
def test_causal_lm_formula_equals_counter_at_qwen2_0_5b_size():
    arch, kw = HUB_ARCHITECTURES["Qwen/Qwen2-0.5B"]
    cfg = _lm_config(
        {"kind": "hub", "id": "Qwen/Qwen2-0.5B", "revision": "x"}, ["q_proj", "v_proj"], 4
    )
    t = 64
    with fake_device():
        model = build_shape_model(cfg, torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2-0.5B's count
        fwd, train = row_flops(model, ["q_proj", "v_proj"], 4, t)
        MultiLoraModel(model, ["q_proj", "v_proj"], [LoraSpec(r=4)])
        ids = torch.zeros((1, t), dtype=torch.long)
        counted = count_flops(lambda: model(input_ids=ids).logits.float().sum().backward())
    assert counted == train
    assert fwd < train < 3 * fwd  # frozen base: no weight gradients


def test_unet_estimate_equals_counter_on_a_real_tiny_step(tmp_path):
    from lora_zoo.builders.text_to_image.pipeline import TinyPipeline, build_tiny_pipeline

    r = load_recipe("t2i-smoke")
    cost = r.builder_cls.cost_model(r.config)
    pipe = build_tiny_pipeline(TinyPipeline(**r.config.base_model.model_dump()), tmp_path)
    unet = pipe.unet.requires_grad_(False)
    MultiLoraModel(
        unet, r.config.lora.targets, [LoraSpec(r=r.config.lora.r, init_seed=i) for i in range(2)]
    )
    res = r.config.data.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    lat = torch.randn((2, 4, res, res), generator=g)  # (K*1, C, h, w)
    emb = torch.randn(
        (2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim), generator=g
    )
    t = torch.tensor([10, 500])

    def step():
        pred = unet(lat, t, encoder_hidden_states=emb).sample
        ((pred - lat) ** 2).mean(dim=(1, 2, 3)).sum().backward()

    assert count_flops(step) == 2 * cost.train_flops_per_sample
    ev = r.config.eval
    assert (
        ev.guidance > 1
        and cost.eval_flops_per_lora
        > len(ev.prompts) * ev.steps * 2 * cost.forward_flops_per_sample
    )


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_is_estimated_offline(name):
    est = estimate_recipe(load_recipe(name))
    assert est.train_flops > 0 and est.total_flops >= est.num_loras * est.train_flops
    text = format_estimate(est)
    assert "GPU-hours" in text and "an assumption" in text and "largest K that fits" in text
    m = est.mem_at(1)
    assert m.base > 0 and m.per_row > 0
    assert largest_k(m, int(m.at(3).total)) == 3


def test_plan_estimate_cli_prints_the_table():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_zoo",
            "plan",
            "t2i-smoke",
            "--estimate",
            "--accelerator",
            "A100",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "time on one A100" in out and "FLOPs per LoRA" in out


def test_build_refuses_a_k_that_cannot_fit(monkeypatch, tmp_path):
    import lora_zoo.build.estimate as est_mod

    r = load_recipe("t2i-smoke")
    est = estimate_recipe(r)
    cap = int(est.mem_at(3).total) + 1  # room for K=3, not 4
    monkeypatch.setattr(est_mod, "device_capacity", lambda device: cap)
    check_fits(r, 3, "cpu")
    with pytest.raises(BuildError, match="largest k that fits is 3"):
        check_fits(r, 4, "cpu")
    from lora_zoo.build.runner import build

    with pytest.raises(BuildError, match="largest k that fits is 3"):
        build("t2i-smoke", tmp_path / "zoo", k=4, progress=False)
    assert not list(tmp_path.rglob("jobs.jsonl"))  # refused before the plan: nothing built
