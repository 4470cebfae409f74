"""Batched generation across LoRAs and CLIP scoring, with the base pipeline resident.

The paper's zoos score each LoRA by generating images for a fixed prompt list and measuring CLIP
image-text similarity. Doing that one LoRA at a time (reloading a pipeline per LoRA) dominates
build time, so here K LoRAs generate in ONE denoising loop: the UNet's stacked multi-LoRA
wrappers see the batch grouped by LoRA, ``(K * 2P, ...)`` with each LoRA's block ordered
``[uncond x P, cond x P]`` (classifier-free guidance kept inside the LoRA's group, because the
stock pipeline's ``[all uncond, all cond]`` order would mix LoRAs). Every LoRA starts from the
SAME initial latents (drawn from ``seed``), so scores do not depend on K or on batch company.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from lora_zoo.build.api import cache_root
from lora_zoo.errors import BuildError

log = logging.getLogger(__name__)


class HubClip(BaseModel):
    """A transformers CLIP checkpoint (the paper uses openai/clip-vit-base-patch16)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hub"] = "hub"
    id: str = "openai/clip-vit-base-patch16"
    revision: str | None = None


class TinyClip(BaseModel):
    """A tiny random CLIPModel from configs (tests and the smoke recipe)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["config"] = "config"
    seed: int = 0
    hidden: int = 32
    image_size: int = 32
    patch_size: int = 8
    projection_dim: int = 16


ClipSpec = Annotated[HubClip | TinyClip, Field(discriminator="kind")]


def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """(P, T, D) text-encoder hidden states, padded to the tokenizer's max length (as SD does)."""
    tok = pipe.tokenizer
    ids = tok(
        list(prompts),
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@torch.no_grad()
def generate_grouped(
    pipe,
    prompts: Sequence[Sequence[str]],
    *,
    sampler,
    steps: int,
    guidance: float,
    seed: int,
    resolution: int,
    unet_forward: Callable[..., torch.Tensor] | None = None,
    decode_chunk: int = 8,
) -> torch.Tensor:
    """Images ``(K, P, 3, H, W)`` in [0, 1] for K LoRAs x P prompts in one denoising loop.

    ``prompts[k]`` is LoRA k's prompt list (same length P for all; they differ only where the
    instance prompt is substituted). ``unet_forward(latents, t, text)`` defaults to the pipeline's
    UNet; whatever multi-LoRA wrappers it holds must read the batch as K groups.
    """
    k_loras, p = len(prompts), len(prompts[0])
    dev = pipe.unet.device
    dtype = pipe.unet.dtype
    text = encode_prompts(pipe, [s for lst in prompts for s in lst]).view(
        k_loras, p, -1, pipe.text_encoder.config.hidden_size
    )
    uncond = encode_prompts(pipe, [""])  # (1, T, D)
    use_cfg = guidance > 1.0
    if use_cfg:
        # (K, 2P, T, D): per LoRA [uncond x P, cond x P]
        text = torch.cat([uncond.expand(k_loras, p, *uncond.shape[1:]), text], dim=1)
    text = text.flatten(0, 1).to(dtype)
    f = pipe.vae_scale_factor
    c = pipe.unet.config.in_channels
    gen = torch.Generator("cpu").manual_seed(seed)
    base = torch.randn((p, c, resolution // f, resolution // f), generator=gen)  # (P, C, h, w)
    sampler.set_timesteps(steps, device=dev)
    lat = base.to(dev).repeat(k_loras, 1, 1, 1) * sampler.init_noise_sigma  # (K*P, C, h, w)
    fwd = unet_forward or (lambda x, t, e: pipe.unet(x, t, encoder_hidden_states=e).sample)
    for t in sampler.timesteps:
        x = sampler.scale_model_input(lat, t).view(k_loras, p, *lat.shape[1:])
        if use_cfg:
            x = torch.cat([x, x], dim=1)  # (K, 2P, C, h, w)
        eps = fwd(x.flatten(0, 1).to(dtype), t, text).float()
        if use_cfg:
            e = eps.view(k_loras, 2, p, *eps.shape[1:])
            eps = (e[:, 0] + guidance * (e[:, 1] - e[:, 0])).flatten(0, 1)  # (K*P, C, h, w)
        lat = sampler.step(eps, t, lat).prev_sample
    imgs = []
    vae = pipe.vae
    for chunk in lat.split(decode_chunk):
        out = vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor).sample
        imgs.append(((out.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(imgs).view(k_loras, p, 3, resolution, resolution)


class ClipScorer:
    """CLIP score as torchmetrics defines it (the LoL paper's scorer).

    torchmetrics' ``clip_score`` over a set of (image, caption) pairs is
    ``max(mean_i 100 * cos(E_I_i, E_C_i), 0)``: the clamp comes AFTER the mean, so a LoRA's score
    is :meth:`set_score` of its pairs, not the mean of per-pair clamped scores (the two differ as
    soon as one pair has a negative cosine). ``tests/builders/test_text_to_image.py`` checks both
    numbers against torchmetrics itself on the same images, captions and model.

    Images go through the model's own processor (resize, center crop, normalise) after being
    quantised to uint8, i.e. exactly what scoring saved PNGs would see.
    """

    def __init__(
        self, spec: HubClip | TinyClip, *, device: str = "cpu", cache_dir: str | None = None
    ):
        from transformers import CLIPModel, CLIPProcessor

        self.spec = spec
        self.device = device
        if isinstance(spec, HubClip):
            try:
                # use_safetensors: a repo holding only pytorch_model.bin would be unpickled
                self.model = CLIPModel.from_pretrained(
                    spec.id, revision=spec.revision, use_safetensors=True
                )
                self.processor = CLIPProcessor.from_pretrained(spec.id, revision=spec.revision)
            except Exception as e:
                raise BuildError(f"cannot load CLIP model {spec.id!r}: {e}", key="eval.clip") from e
        else:
            self.model, self.processor = tiny_clip(spec, cache_dir)
        self.model.to(device).eval().requires_grad_(False)

    @property
    def model_id(self) -> str:
        s = self.spec
        return s.id if isinstance(s, HubClip) else f"tiny-clip-config-seed{s.seed}"

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N,) per-pair scores ``max(100 cos, 0)``: torchmetrics' ``clip_score`` of each pair alone."""
        return self.similarity(images, texts).clamp(min=0)

    @staticmethod
    def set_score(similarity: torch.Tensor) -> torch.Tensor:
        """torchmetrics' ``clip_score`` of a set of pairs from their :meth:`similarity` values
        (last dim): the mean first, then the clamp at 0."""
        return similarity.mean(dim=-1).clamp(min=0)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1], texts N strings -> (N,) ``100 * cos``, unclamped."""
        arrs = [np.asarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8)) for im in images]
        inputs = self.processor(
            text=list(texts), images=arrs, return_tensors="pt", padding=True, truncation=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        img, txt = _as_tensor(img), _as_tensor(txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100 * cos).cpu()


def _as_tensor(out: Any) -> torch.Tensor:
    """transformers 5 may return a model output instead of a bare tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, name, None)
        if isinstance(v, torch.Tensor):
            return v
    raise BuildError(f"unexpected CLIP feature output {type(out).__name__}", key="eval.clip")


def tiny_clip(spec: TinyClip, cache_dir: str | None = None):
    """(CLIPModel, CLIPProcessor) built from configs with the deterministic tiny tokenizer."""

    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProc  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProc

    from .pipeline import seeded_init, tiny_tokenizer

    base = cache_root(cache_dir)
    tok = tiny_tokenizer(base / "tiny_clip_tokenizer", max_length=16)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=spec.hidden,
            intermediate_size=2 * spec.hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=spec.hidden,
            intermediate_size=2 * spec.hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        projection_dim=spec.projection_dim,
    )
    with seeded_init(spec.seed):  # transformers' init takes no generator
        model = CLIPModel(cfg)
    proc = ImageProc(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return model, CLIPProcessor(image_processor=proc, tokenizer=tok)
