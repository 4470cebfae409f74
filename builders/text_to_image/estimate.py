"""What a text-to-image zoo costs, from the recipe alone (``lora-zoo plan RECIPE --estimate``).

The pipeline's parts (UNet, VAE, text encoder) are built from their configs on the fake device
(``lora_zoo.engine.cost``: shapes only, CPU kernel choice, no memory, no download; a Hub SD-1.x
id maps to SD-1.4's architecture, which SD-1.5 shares) and the real diffusers code runs on
them under torch's FLOP counter. The UNet's graph (resnets, up/down samplers, attention at four
resolutions, GEGLU feed-forwards) is too irregular for a hand formula worth trusting; counting
the real code at the real shapes is exact by construction. Per LoRA:

    training   = samples x (UNet forward + backward of one latent, LoRA on the targets)
    evaluation = prompts x (sampler steps x (2 with CFG) x UNet forward + VAE decode)

Not counted: VAE encoding of training images (once per image per worker, cached and shared by
every LoRA that uses the image), the text encoder (77 tokens, under 0.1 %), CLIP scoring
(a ViT-B/16 forward per image, under 0.1 % of the 20-step sampling).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from lora_zoo.build.api import CostModel
from lora_zoo.engine import LoraSpec, MultiLoraModel, memory
from lora_zoo.engine.cost import count_flops, fake_device

from .pipeline import _DTYPES, TinyPipeline, build_tiny_pipeline

# Hub ids whose architecture is SD-1.4's (SD-1.5 shares it): estimated without a download.
SD1_IDS = {
    "CompVis/stable-diffusion-v1-4",
    "runwayml/stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


def shape_spec(cfg: Any) -> tuple[TinyPipeline, torch.dtype, str]:
    """(the config spec of the base's architecture, its dtype, a name for it)."""
    b = cfg.base_model
    if b.kind == "config":
        return b, torch.float32, f"config:{b.preset}"
    if b.id not in SD1_IDS:
        from lora_zoo.errors import BuildError

        raise BuildError(
            f"no offline architecture for {b.id!r}; known: {sorted(SD1_IDS)}",
            key="base_model.id",
        )
    return TinyPipeline(preset="sd14"), _DTYPES[b.dtype], b.id


def cost_model(cfg: Any, **_: Any) -> CostModel:
    """The builder's ``cost_model`` (``TextToImageBuilder.cost_model``)."""
    spec, dtype, name = shape_spec(cfg)
    res = cfg.data.resolution
    ev = cfg.eval
    old = torch.get_default_dtype()
    with tempfile.TemporaryDirectory() as tmp, fake_device():
        torch.set_default_dtype(dtype)
        try:
            pipe = build_tiny_pipeline(spec, tmp)
        finally:
            torch.set_default_dtype(old)
        unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
        for part in (unet, vae, text):
            part.requires_grad_(False)
        n_params = sum(p.numel() for p in unet.parameters())  # the base's, before the LoRAs
        mm = MultiLoraModel(unet, cfg.lora.targets, [LoraSpec(r=cfg.lora.r, alpha=cfg.lora.alpha)])
        f = pipe.vae_scale_factor
        lat = torch.zeros((1, unet.config.in_channels, res // f, res // f), dtype=dtype)
        t = torch.zeros((1,), dtype=torch.long)
        n_tok = pipe.tokenizer.model_max_length
        emb = torch.zeros((1, n_tok, text.config.hidden_size), dtype=dtype)  # (1, T, D)

        def one_row() -> torch.Tensor:
            pred = unet(lat, t, encoder_hidden_states=emb).sample
            return ((pred.float() - lat.float()) ** 2).mean()

        train = count_flops(lambda: one_row().backward())
        with torch.no_grad():
            fwd = count_flops(lambda: unet(lat, t, encoder_hidden_states=emb).sample)
            e_res = ev.resolution or res
            z = torch.zeros((1, lat.shape[1], e_res // f, e_res // f), dtype=dtype)
            dec = count_flops(lambda: vae.decode(z).sample)
        rows = cfg.train.grad_accum * cfg.train.batch_size
        mem = memory.estimate(
            unet, list(mm.wrappers.values()), k=1, rows=rows, r=cfg.lora.r, run_one_row=one_row
        )
        resident = memory.model_bytes(vae) + memory.model_bytes(text)
    mem = memory.MemoryEstimate(
        mem.k, mem.rows, mem.base + resident, mem.lora_state, mem.per_row, mem.transient
    )
    cfg_mult = 2 if ev.guidance > 1.0 else 1
    eval_flops = len(ev.prompts) * (ev.steps * cfg_mult * fwd + dec) if ev.enabled else 0

    def samples(hp: Mapping[str, Any]) -> float:
        t_ = cfg.train
        return (
            float(hp.get("steps", t_.steps))
            * float(hp.get("grad_accum", t_.grad_accum))
            * float(hp.get("batch_size", t_.batch_size))
        )

    def rows(hp: Mapping[str, Any]) -> int:
        t_ = cfg.train
        return int(hp.get("grad_accum", t_.grad_accum)) * int(hp.get("batch_size", t_.batch_size))

    notes = (
        f"latents {res // f}x{res // f} ({res} px), text {n_tok} tokens",
        f"eval: {len(ev.prompts)} prompts x {ev.steps} steps x {cfg_mult} (CFG) + VAE decode"
        if ev.enabled
        else "eval disabled",
        "not counted: VAE encoding (cached per image), text encoder, CLIP scoring",
    )
    if cfg.base_model.kind == "config" and cfg.base_model.pretrain_steps > 0:
        b = cfg.base_model  # once per build (then cached), not per LoRA
        notes += (
            f"not counted: the base's {b.pretrain_steps} full-UNet pretraining steps x "
            f"{b.pretrain_batch_size} images (once per build, cached)",
        )
    return CostModel(
        architecture=f"{name} UNet ({n_params / 1e6:.0f}M params, {str(dtype)[6:]}), "
        f"LoRA r={cfg.lora.r} on {','.join(cfg.lora.targets)}",
        train_flops_per_sample=float(train),
        forward_flops_per_sample=float(fwd),
        eval_flops_per_lora=float(eval_flops),
        samples_per_lora=samples,
        rows_per_pass=rows,
        memory=mem,
        assumptions=notes,
    )
