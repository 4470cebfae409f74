"""Batched multi-LoRA training: K adapters on one frozen base model in one forward/backward.

Why: a LoRA zoo is thousands of small adapters on the same base. Training them one by one
(the paper's scripts: one process + one model load per LoRA) spends most of the time on the
base model. Here the base is loaded once, each target layer carries K stacked adapters, and one
batch holds rows for all K; the base matmul runs once for the whole batch and only the tiny
LoRA path is per-adapter (a batched matmul). Gradients stay independent because every LoRA only
sees its own rows and the loss is a sum of per-LoRA means.

Family-agnostic: losses belong to the builders (``builders/causal_lm/losses.py``,
``builders/text_to_image/train.py``); the engine only needs each LoRA's (K,) loss.

API (stable; builders/causal_lm/ and builders/text_to_image/ use exactly this)::

    from lora_zoo.engine import (LoraSpec, MultiLoraModel, TrainHParams, MultiLoraTrainer,
                                 stack_rows, peft_init_like, IGNORE_INDEX)

    specs = [LoraSpec(r=4, alpha=8, dropout=0.05, init_seed=s_init, dropout_seed=s_drop,
                      use_rslora=False, rank_pattern=None, alpha_pattern=None,
                      use_dora=False, init="default"|"gaussian"|"pissa"|"olora"), ...]  # K of them
    #   use_dora: a trained magnitude per output row beside B, A (PEFT's DoRA, norms detached);
    #   pissa/olora: B0, A0 from W0's SVD / QR, the base kept and s B0 A0 subtracted in the LoRA
    #   path; extract() then gives PEFT's converted rank-2r LoRA on the true base (model.py).
    mm = MultiLoraModel(model, target_modules=["q_proj", "v_proj"], specs=specs)
    #   target_modules: PEFT-style suffixes (list) or a regex string (full match on the name).
    #   Replaces every matching nn.Linear / transformers Conv1D *in place* by a MultiLoraLinear
    #   wrapper (base layer kept inside, frozen); all base params get requires_grad=False.
    #   Factors: A (K, r_max, in), B (K, out, r_max), scale (K,), rank mask (K, r_max).
    #   Init = PEFT default: A kaiming_uniform(a=sqrt(5)) drawn per LoRA from
    #   torch.Generator().manual_seed(init_seed) over the target modules in named_modules()
    #   order (CPU float32, then cast), B = 0.  Padded rank rows/cols are exactly 0 and stay 0.
    mm.reset(specs2)           # new chunk: new K / ranks / seeds, fresh factors (re-make trainer)
    with mm.disabled(): ...    # run the plain base model (e.g. base-model eval, CFG branches)
    model(**batch)             # batch first dim is K*b: rows k*b:(k+1)*b belong to LoRA k.
    #   Any layout works as long as dim 0 is grouped by LoRA (the wrapper reshapes the input to
    #   (K, -1, in)), so UNet attention with (K*b, seq, in) or (K*b*seq, in) inputs is fine.
    mm.num_loras, mm.specs, mm.parameters()   # the stacked trainable tensors only
    records = mm.extract(lora_ids=[...], base_model_name="Qwen/Qwen2-0.5B",
                         extra_config={"task_type": "CAUSAL_LM"})   # -> list[LoraRecord]
    #   PEFT module names ("model.layers.0.self_attn.q_proj"), PEFT config (r, lora_alpha,
    #   target_modules, use_rslora, lora_dropout, fan_in_fan_out, rank_pattern/alpha_pattern
    #   when per-module values differ); record.to_safetensors_bytes() loads in PeftModel.
    mm.remove()                # put the original layers back (model is the plain base again)

    hp = [TrainHParams(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                       max_grad_norm=1.0, total_steps=40, warmup_steps=0,
                       schedule="constant"|"linear"), ...]                    # K of them
    trainer = MultiLoraTrainer(mm, hp)
    losses = trainer.step(lambda: per_lora_losses)   # closure returns (K,) losses
    #   - backward of the sum of finite per-LoRA losses (LoRA k's loss = mean over ITS tokens)
    #   - per-LoRA grad clipping (norm over all of LoRA k's params across modules, same formula
    #     as torch.nn.utils.clip_grad_norm_), per-LoRA AdamW (exact torch.optim.AdamW math with
    #     (K,) lr / wd / betas / eps and a per-LoRA step count), per-LoRA lr schedule
    #   - a LoRA whose loss or grad norm is NaN/inf is marked failed at that step and frozen
    #     (its factors keep the last finite values); the others are unaffected
    #   - a LoRA that has done total_steps stops changing (feed it padding rows; zero loss)
    trainer.active (K,) bool, trainer.steps_done (K,), trainer.failed_step: list[int | None],
    trainer.last_loss (K,), trainer.loss_history: list of (K,) tensors

    stack_rows(per_lora_batches: list[dict[str, Tensor (b_k, T_k)]], pad: dict[str, value])
    #   -> dict[str, Tensor (K*b_max, T_max)]; right-pads T, pads missing rows with pad rows
    #   (labels -100 => zero loss weight) so LoRAs with different batch sizes share one pass
    peft_init_like(peft_model, spec, adapter_name="default")
    #   give a PEFT model exactly the init MultiLoraModel gives LoRA `spec` (reference tests)

    with autocast(device, "bfloat16"): model(**batch)   # base matmuls in bf16, factors fp32
    est = memory.estimate(model, list(mm.wrappers.values()), k=K, rows=b, r=r,
                          run_one_row=lambda: loss_of_K_rows / K)   # bytes per pass, by K
    memory.format_table(est)                            # the table builders log before a build
"""

from __future__ import annotations

from lora_zoo.engine import memory
from lora_zoo.engine.layers import MultiLoraLinear
from lora_zoo.engine.model import LoraSpec, MultiLoraModel, peft_init_like
from lora_zoo.engine.optim import StackedAdamW, TrainHParams, clip_grad_norm_per_lora, lr_factor
from lora_zoo.engine.precision import AUTOCAST_DTYPES, autocast
from lora_zoo.engine.trainer import IGNORE_INDEX, MultiLoraTrainer, stack_rows

__all__ = [
    "AUTOCAST_DTYPES",
    "IGNORE_INDEX",
    "LoraSpec",
    "MultiLoraLinear",
    "MultiLoraModel",
    "MultiLoraTrainer",
    "StackedAdamW",
    "TrainHParams",
    "autocast",
    "clip_grad_norm_per_lora",
    "lr_factor",
    "memory",
    "peft_init_like",
    "stack_rows",
]
