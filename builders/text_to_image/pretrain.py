"""Training a config-built base UNet further before its LoRAs (``base_model.pretrain_steps``).

Why: the LoL papers' transfer experiment trains on SD-1.4 LoRAs and tests on SD-1.5 LoRAs, and
SD-1.5 is SD-1.4 trained further, not another network. A twin zoo whose base is another zoo's
seeded base after a few hundred more full-UNet denoising steps mirrors that on CPU (a twin on
another random seed shares no weights with the first, so nothing can transfer).

The design mirrors causal_lm's pretrained base and shares its cache code
(``lora_zoo.build.api.cached_trained_base``): the result is cached by a hash of everything that
determines it, so every shard and every rebuild uses the identical base. The training stream
reuses ``train.LoraStream`` (one seeded image order, VAE sample, noise and timestep stream,
from ``sub_seed`` of the pretraining seed) on the images of every class of the builder's own
data, each captioned by ``pretrain_prompt``. Only the UNet is trained (SD-1.5 kept SD-1.4's VAE
and text encoder). The latents are encoded into a cache of their own, so the LoRAs' latents do
not depend on whether this worker pretrained or loaded the base.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from lora_zoo.build.api import base_key_digest, cached_trained_base, pretrain_lr_lambda
from lora_zoo.progress import track
from lora_zoo.seeding import sub_seed

from .eval import encode_prompts
from .pipeline import TinyPipeline, training_scheduler
from .train import LatentCache, LoraStream, diffusion_target

log = logging.getLogger(__name__)

# 1: full-UNet AdamW on LoraStream samples of every image, warmup + linear decay
CACHE_FORMAT = 1


def pretrain_key(spec: TinyPipeline, data_key: str) -> dict[str, Any]:
    """Everything the trained UNet depends on (the base spec includes the VAE settings, which
    shape the latents it trains on)."""
    import diffusers

    return {
        "builder": "text_to_image",
        "base_model": spec.model_dump(mode="json"),
        "data": data_key,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "cache_format": CACHE_FORMAT,
    }


def pretrain_base(
    pipe: Any, spec: TinyPipeline, index: Any, data: Any, *, cache_dir: str | None
) -> dict[str, Any]:
    """Train ``pipe.unet`` further in place (or load it from the cache); returns the facts each
    LoRA records about its base: ``base_model_hash``, the pretraining settings, the loss at
    the start and end, and ``pretrain_rel_change`` = ||W1 - W0|| / ||W0|| over the UNet."""
    import hashlib

    items = list(index.items)
    data_key = hashlib.sha256(
        "|".join(
            [data.model_dump_json(), *(f"{it.image_id}:{index.sha256(it)}" for it in items)]
        ).encode()
    ).hexdigest()
    key = pretrain_key(spec, data_key)
    stats = cached_trained_base(
        pipe.unet,
        key,
        name="tiny-sd-unet",
        cache_dir=cache_dir,
        train=lambda: train_unet(pipe, spec, index, items, data),
    )
    return {
        "base_model_hash": base_key_digest(key),
        "pretrain_steps": spec.pretrain_steps,
        "pretrain_lr": spec.pretrain_lr,
        **stats,
    }


def train_unet(pipe: Any, spec: TinyPipeline, index: Any, items: list, data: Any) -> dict:
    """Plain full-parameter AdamW denoising training of the UNet (DreamBooth's loss, no LoRA)."""
    seed = spec.pretrain_seed if spec.pretrain_seed is not None else sub_seed(spec.seed, "pretrain")
    sched = training_scheduler(pipe)
    stats = LatentCache(len(items)).get(pipe, index, items, data.resolution, data.center_crop)
    stream = LoraStream(
        stats,
        seeds={s: sub_seed(seed, s) for s in ("data", "noise", "timestep")},
        scaling_factor=pipe.vae.config.scaling_factor,
        num_train_timesteps=sched.config.num_train_timesteps,
    )
    groups = sorted({it.group for it in items})
    text = encode_prompts(pipe, [spec.pretrain_prompt.replace("{group}", g) for g in groups])
    row_of = {g: i for i, g in enumerate(groups)}
    unet = pipe.unet
    w0 = [p.detach().clone() for p in unet.parameters()]
    unet.requires_grad_(True)
    unet.train()
    try:
        with torch.random.fork_rng(devices=[]):  # nothing global drawn, nothing leaked
            torch.manual_seed(seed)
            losses = _loop(unet, stream, sched, text, [row_of[it.group] for it in items], spec)
    finally:
        unet.requires_grad_(False)
        unet.eval()
    with torch.no_grad():
        num = sum(
            float(((p.float() - q.float()) ** 2).sum()) for p, q in zip(unet.parameters(), w0)
        )
        den = sum(float((q.float() ** 2).sum()) for q in w0)
    n = max(1, len(losses) // 10)  # one step's loss is one noise draw: average a tenth
    out = {
        "pretrain_loss_first": sum(losses[:n]) / n,
        "pretrain_loss_last": sum(losses[-n:]) / n,
        "pretrain_rel_change": math.sqrt(num / den),
    }
    log.info(
        "pretrained base UNet %d steps: loss %.4f -> %.4f, ||W1-W0||/||W0|| = %.4f",
        spec.pretrain_steps,
        out["pretrain_loss_first"],
        out["pretrain_loss_last"],
        out["pretrain_rel_change"],
    )
    return out


def _loop(unet, stream, sched, text, text_row, spec: TinyPipeline) -> list[float]:
    """``spec.pretrain_steps`` optimizer steps of ``pretrain_batch_size`` samples each."""
    dev = unet.device
    opt = torch.optim.AdamW(unet.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, pretrain_lr_lambda(spec.pretrain_steps))
    b = spec.pretrain_batch_size
    losses: list[float] = []
    for _ in track(range(spec.pretrain_steps), desc="pretrain base", unit="step", nested=True):
        latents, noise, t = stream.next(b)  # (b, C, h, w), (b, C, h, w), (b,)
        emb = text[[text_row[i] for i in stream.seen[-b:]]]  # (b, T, D)
        latents, noise, t = latents.to(dev), noise.to(dev), t.to(dev)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=emb.to(dev)).sample
        loss = torch.nn.functional.mse_loss(
            pred.float(), diffusion_target(sched, latents, noise, t).float()
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        losses.append(float(loss.detach()))
    return losses
