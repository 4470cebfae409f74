"""Stable Diffusion base pipelines for the text-to-image builder: from the Hub, or tiny from configs.

The builder loads the base pipeline ONCE per worker and keeps it resident: every LoRA of every
batch is trained and evaluated against the same frozen modules (that is the whole speed story of
a zoo build). Two sources:

* ``{kind: hub, id, revision}``: the real ``StableDiffusionPipeline.from_pretrained`` path used by
  the paper's zoos (SD-1.4 / SD-1.5). Nothing is executed from the repo (no custom pipelines, no
  ``trust_remote_code``) and the safety checker is never loaded (it would only blank images).
* ``{kind: config}``: a tiny pipeline built from configs with seeded random weights and a
  deterministic byte-level CLIP tokenizer written to disk (vocab.json + merges.txt), so tests,
  the smoke recipe and the CPU benchmark run offline in seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from lora_zoo.build.api import cache_root
from lora_zoo.errors import BuildError
from lora_zoo.seeding import sub_seed

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Every sampler name a recipe may use -> diffusers scheduler class name.
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


class HubPipeline(BaseModel):
    """A diffusers Stable Diffusion repo on the Hub, pinned by revision for reproducibility."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hub"] = "hub"
    id: str
    revision: str | None = None
    variant: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class TinyPipeline(BaseModel):
    """An SD-shaped pipeline built from configs (random weights seeded by ``seed``).

    ``preset: sd14`` ignores the size fields and builds SD-1.4's UNet / VAE / text-encoder
    architectures (860M-parameter UNet, 512 px) so the benchmark measures real-sized compute
    without downloading weights.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["config"] = "config"
    preset: Literal["tiny", "sd14"] = "tiny"
    seed: int = 0
    unet_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    max_length: int = 16
    vae_channels: list[int] = Field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    resolution: int = 32
    scheduler: Literal["ddpm", "ddim"] = "ddpm"
    num_train_timesteps: int = 1000
    # A random VAE's posterior std is ~1 (log-variance ~0) and SD's scaling factor 0.18215 was
    # fitted to SD's trained VAE, so by default image content is a few % of a training latent and
    # the LoRAs barely depend on their images (fine for a smoke test). ``vae_posterior_std`` fixes
    # the posterior std (0: the mean, as a trained VAE nearly is) and ``vae_scaling_factor`` brings
    # the latents to about unit scale: a tiny zoo whose LoRAs carry their data (t2i-quickstart).
    vae_posterior_std: float | None = Field(None, ge=0)  # None: the random VAE's own
    vae_scaling_factor: float = Field(0.18215, gt=0)
    # Train the seeded UNet further before any LoRA (as SD-1.5 is SD-1.4 trained further):
    # full-UNet denoising steps on the builder's own images, every class, captioned by
    # ``pretrain_prompt`` ({group} = the image's class); cached under $LORA_ZOO_CACHE by a hash
    # of everything that determines it (pretrain.py). 0: the seeded weights as they are.
    pretrain_steps: int = Field(0, ge=0)
    pretrain_lr: float = Field(1e-4, gt=0)
    pretrain_batch_size: int = Field(8, ge=1)
    pretrain_seed: int | None = None  # None: sub_seed(seed, "pretrain")
    pretrain_prompt: str = "a photo of {group}"


BaseModelSpec = Annotated[HubPipeline | TinyPipeline, Field(discriminator="kind")]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# A handful of merges so the tokenizer exercises real BPE, not just characters.
_TINY_MERGES = [("s", "k"), ("t", "h"), ("a", "n"), ("o", "n"), ("e", "r"), ("i", "n")]


def write_tiny_tokenizer(directory: str | os.PathLike[str]) -> Path:
    """Write a deterministic byte-level CLIP vocab.json + merges.txt (517 + merges tokens).

    Every byte is a token, with and without the ``</w>`` end-of-word suffix, so any text
    tokenizes (no unknowns) and the files are byte-identical on every machine.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for a, b in _TINY_MERGES:
        merges.append(f"{a} {b}</w>")
        vocab[f"{a}{b}</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, sort_keys=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d


def tiny_tokenizer(directory: str | os.PathLike[str], max_length: int = 16):
    """A real ``CLIPTokenizer`` loaded from the deterministic files above."""
    from transformers import CLIPTokenizer

    d = write_tiny_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=max_length)


def _down_up(n: int, attn: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """SD's block layout: cross-attention everywhere except the deepest level."""
    down = tuple("CrossAttnDownBlock2D" if attn and i < n - 1 else "DownBlock2D" for i in range(n))
    up = tuple("UpBlock2D" if i == 0 or not attn else "CrossAttnUpBlock2D" for i in range(n))
    return down, up


def sd14_unet_config() -> dict[str, Any]:
    """The UNet2DConditionModel config of CompVis/stable-diffusion-v1-4 (860M parameters).

    Used by the benchmark to measure an SD-sized UNet without downloading weights.
    """
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_unet(spec: TinyPipeline):
    """UNet2DConditionModel of the tiny spec, seeded (weights depend only on ``spec.seed``)."""
    from diffusers import UNet2DConditionModel

    if spec.preset == "sd14":
        with seeded_init(spec.seed):
            return UNet2DConditionModel(**sd14_unet_config())
    n_vae = len(spec.vae_channels)
    down, up = _down_up(len(spec.unet_channels))
    with seeded_init(spec.seed):
        return _unet(spec, n_vae, down, up)


def seeded_init(seed: int) -> Any:
    """diffusers / transformers constructors take no generator and init from the global RNG:
    seed it inside ``fork_rng`` so weights depend on ``seed`` only and the caller's RNG state
    is restored afterwards (no leak into anything drawn later)."""
    import contextlib

    @contextlib.contextmanager
    def ctx() -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            yield

    return ctx()


def _unet(spec: TinyPipeline, n_vae: int, down: Any, up: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=spec.resolution // 2 ** (n_vae - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=min(32, min(spec.unet_channels)),
    )


def _sd14_spec(spec: TinyPipeline) -> TinyPipeline:
    """SD-1.4's VAE (128..512, 4 levels -> /8 latents) and text encoder (768 wide, 12 layers)."""
    return spec.model_copy(
        update=dict(
            unet_channels=[320, 640, 1280, 1280],
            cross_attention_dim=768,
            text_hidden=768,
            text_layers=12,
            max_length=77,
            vae_channels=[128, 256, 512, 512],
            resolution=512,
        )
    )


def build_tiny_pipeline(spec: TinyPipeline, cache_dir: str | os.PathLike[str]):
    """A real StableDiffusionPipeline whose parts are built from configs with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    if spec.preset == "sd14":
        spec = _sd14_spec(spec)
    if spec.text_hidden != spec.cross_attention_dim:
        raise BuildError(
            f"text_hidden ({spec.text_hidden}) must equal cross_attention_dim "
            f"({spec.cross_attention_dim}): the UNet attends to the text encoder's states",
            key="base_model.text_hidden",
        )
    tok = tiny_tokenizer(Path(cache_dir) / "tiny_clip_tokenizer", spec.max_length)
    unet = tiny_unet(spec)
    n = len(spec.vae_channels)
    with seeded_init(sub_seed(spec.seed, "vae")):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(spec.vae_channels),
            latent_channels=spec.latent_channels,
            layers_per_block=2 if spec.preset == "sd14" else 1,
            norm_num_groups=min(32, min(spec.vae_channels)),
            sample_size=spec.resolution,
            scaling_factor=spec.vae_scaling_factor,
        )
    if spec.vae_posterior_std is not None:
        # quant_conv's second half of channels is the log-variance: make it the constant
        # 2 log(std) (diffusers clamps log-variance to >= -30, std ~3e-7, for std 0)
        lat, std = spec.latent_channels, spec.vae_posterior_std
        with torch.no_grad():
            vae.quant_conv.weight[lat:].zero_()
            vae.quant_conv.bias[lat:].fill_(2 * math.log(std) if std > 0 else -30.0)
    with seeded_init(sub_seed(spec.seed, "text_encoder")):
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=spec.text_hidden,
                intermediate_size=2 * spec.text_hidden,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=12
                if spec.text_hidden % 12 == 0 and spec.text_hidden >= 384
                else 4,
                max_position_embeddings=spec.max_length,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
    # SD-1.x's noise schedule (scaled_linear 0.00085..0.012), steps_offset=1 as in the hub configs.
    sched_kw: dict[str, Any] = dict(
        num_train_timesteps=spec.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    if spec.scheduler == "ddim":
        sched = DDIMScheduler(set_alpha_to_one=False, **sched_kw)
    else:
        sched = DDPMScheduler(**sched_kw)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    spec: HubPipeline | TinyPipeline, *, device: str = "cpu", cache_dir: str | None = None
):
    """Load the base pipeline once, frozen, in eval mode, on ``device``."""
    cache = cache_root(cache_dir)
    if isinstance(spec, TinyPipeline):
        pipe = build_tiny_pipeline(spec, cache)
    else:
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                spec.id,
                revision=spec.revision,
                variant=spec.variant,
                torch_dtype=_DTYPES[spec.dtype],
                safety_checker=None,
                requires_safety_checker=False,
                use_safetensors=True,
            )
        except Exception as e:  # OSError / HF errors: name the repo in one clean line
            raise BuildError(
                f"cannot load StableDiffusionPipeline {spec.id!r}@{spec.revision}: {e}",
                key="base_model.id",
            ) from e
    pipe = pipe.to(device)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded base pipeline (%s) on %s", spec.kind, device)
    return pipe


def make_sampler(pipe, name: str):
    """A fresh inference scheduler of kind ``name`` sharing the pipeline's noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise BuildError(
            f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}", key="eval.sampler"
        )
    return getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


def training_scheduler(pipe):
    """DDPM noise schedule for training (what DreamBooth uses regardless of the sampler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
