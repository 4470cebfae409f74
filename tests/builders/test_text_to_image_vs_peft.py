"""Batched SD LoRA training (engine, K per step) == separate PEFT runs on the UNet, one at a time.

Each PEFT reference gets a fresh copy of the same tiny UNet (built again from its config, so it
shares no module with the builder), ``get_peft_model`` on the recipe's targets, the engine's
init (``peft_init_like``), ``torch.optim.AdamW``, ``clip_grad_norm_`` and REAL micro-batch
gradient accumulation; inputs come from the LoRA's own seeded stream (same images, latent
samples, noise and timesteps). LoRAs differ in lr, steps, grad_accum, batch size and rank.
"""

from __future__ import annotations

import pytest
import torch

from lora_zoo.builders.text_to_image import Config, TextToImageBuilder, _encode
from lora_zoo.builders.text_to_image.data import materialize_sample_images
from lora_zoo.builders.text_to_image.pipeline import TinyPipeline, load_pipeline, training_scheduler
from lora_zoo.builders.text_to_image.train import LoraStream
from lora_zoo.engine import LoraSpec
from tests.fixtures.t2i import SMOKE_GROUPS, TINY_PIPE, job, peft_reference, t2i_config
from tests.reference.tolerance import tol

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.slow
def test_batched_training_matches_separate_peft_runs(tmp_path):
    root = materialize_sample_images(tmp_path / "img", SMOKE_GROUPS)
    cfg = Config.model_validate(
        t2i_config(
            root, eval={"enabled": False}, train={"weight_decay": 0.05, "max_grad_norm": 0.5}
        )
    )
    b = TextToImageBuilder(cfg, cache_dir=str(tmp_path))
    jobs = [
        job(0, ["animal"], lr=1e-3, steps=4),
        job(1, ["object", "scene"], lr=3e-3, steps=2, grad_accum=2),
        job(2, ["people"], lr=5e-4, steps=3, batch_size=2, r=2, prompt="skd"),
    ]
    res = b.train(jobs)
    assert [r.status for r in res] == ["done"] * 3

    ref_pipe = load_pipeline(TinyPipeline(**TINY_PIPE), cache_dir=str(tmp_path))
    sched = training_scheduler(ref_pipe)
    for j, r in zip(jobs, res):
        hp = b._hp(j)
        items = [b.index.by_id[i] for i in r.metadata["train_example_ids"]]
        stats = b.latents.get(b.pipe, b.index, items, 16, True)
        stream = LoraStream(
            stats,
            seeds=dict(j.seeds),
            scaling_factor=ref_pipe.vae.config.scaling_factor,
            num_train_timesteps=sched.config.num_train_timesteps,
        )
        text = _encode(ref_pipe, [hp["prompt"]])
        spec = LoraSpec(r=hp["r"], alpha=hp["alpha"], init_seed=j.seeds["init"])
        ref = peft_reference(ref_pipe.unet, spec, hp, stream, text, sched, TARGETS)
        ours = r.record.delta_weights()
        assert set(ours) == set(ref) and len(ours) == 32
        num = sum(float((ours[n] - ref[n]).norm() ** 2) for n in ref) ** 0.5
        den = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
        assert den > 0
        # float32 training, relative: per step (x grad_accum micro-batches) the tiny UNet's
        # GEMMs / convs (inner dims <= 3 x 3 x 64 channels = 576) add ~eps n to the update,
        # relative to ΔW: 10 eps32 * (steps * grad_accum * 576)
        steps = hp["steps"] * hp["grad_accum"]
        assert num / den < tol(torch.float32, n=steps * 576), (j.lora_id, num / den)
        # a sanity contrast: a different LoRA of the chunk is far from this reference
        other = res[(j.index + 1) % 3].record.delta_weights()
        far = sum(
            float((other[n] - ref[n]).norm() ** 2) for n in ref if other[n].shape == ref[n].shape
        )
        assert far**0.5 / den > 1e-2
