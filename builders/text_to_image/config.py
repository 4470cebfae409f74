"""The text-to-image builder's recipe sections (``Config``) and the hyperparameters a job may vary.

Why its own module (as in ``causal_lm``): the runner, ``plan --estimate`` and the card validate
a recipe against ``Config`` without importing the training code, and CONTRIBUTING's table
promises every builder a ``config.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import DataSpec
from .eval import ClipSpec, TinyClip
from .pipeline import BaseModelSpec

# Per-LoRA hyperparameters a recipe may vary (JobSpec.hparams keys).
HPARAM_KEYS = frozenset(
    {
        "lr",
        "steps",
        "grad_accum",
        "batch_size",
        "weight_decay",
        "max_grad_norm",
        "prompt",
        "r",
        "alpha",
        "dropout",
        "num_images",
        "warmup_steps",
    }
)


class LoraSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 4
    alpha: float = 4.0
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    use_rslora: bool = False


class TrainSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = 4  # LoRAs per batched pass (read by the runner)
    steps: int = 100
    lr: float = 1e-4
    grad_accum: int = 1
    batch_size: int = 1
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_schedule: Literal["constant", "linear"] = "constant"
    warmup_steps: int = 0
    optimizer: Literal["adamw"] = "adamw"
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # only used on CUDA
    prompt: str = "sks"  # default instance prompt when hparams has none


class EvalSection(BaseModel):
    """CLIP scoring: images for a fixed prompt list ({prompt} = the LoRA's instance prompt)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    prompts: list[str] = Field(default_factory=lambda: ["a photo of {prompt}"])
    sampler: Literal["ddim", "ddpm", "pndm", "euler", "dpm"] = "ddim"
    steps: int = 20
    guidance: float = 7.5
    seed: int = 42
    resolution: int | None = None  # default: data.resolution
    clip: ClipSpec = Field(default_factory=TinyClip)


class BuilderArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_cache_size: int = 4096
    membership_bits: bool = True  # store a 0/1 vector over all groups (Imagenette's 10 bits)
    # also one bool label per group, in_group.<g> (what `lora-zoo bench --target 'in_group.*'`
    # learns, as for causal_lm zoos); off by default: CelebA has ~10k identities
    in_group_columns: bool = False
    progress: bool = False


class Config(BaseModel):
    """The recipe sections this builder reads (extra keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    base_model: BaseModelSpec
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSpec
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    builder_args: BuilderArgs = Field(default_factory=BuilderArgs)
