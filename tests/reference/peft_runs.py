"""The obvious slow path the batched engine is held to: one PEFT model per LoRA, trained by a
plain AdamW loop, plus the engine-side harness that feeds both the same batches.

Shared by tests/builders/test_engine_vs_peft.py (plain LoRA, rsLoRA, schedules, dropout),
test_engine_variants.py (DoRA, PiSSA / OLoRA, gaussian init) and test_real_size.py (Qwen2-0.5B),
so the three compare against one reference loop, not three copies that drift (one copy once lost
its LR scheduler)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import (
    LoraSpec,
    MultiLoraModel,
    MultiLoraTrainer,
    TrainHParams,
    lr_factor,
    peft_init_like,
    stack_rows,
)
from tests.reference.tolerance import tol

VOCAB = 128  # tests.fixtures.models' tiny models: hidden 64, MLP 128, vocab 128
PAD = {"input_ids": 0, "labels": -100, "attention_mask": 0}


def train_tol(dtype: torch.dtype, steps: int, ref: torch.Tensor) -> float:
    """Trained factors of two implementations of the same training, absolute: each step's
    forward/backward GEMMs (inner dims <= vocab) and the optimizer add an error ~eps n to the
    update relative to the factors' size, accumulated over the steps:
    10 eps(dtype) * (steps * VOCAB) * max|ref|."""
    return tol(dtype, n=steps * VOCAB, scale=float(ref.abs().max()))


def make_batches(seed: int, steps: int, b: int, t: int) -> list[dict[str, torch.Tensor]]:
    """Random token batches for one LoRA; a few label positions ignored, like prompt masking."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (b, t), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out


def run_engine(base, targets, specs, hps, batches):
    """K LoRAs through the batched engine in float64, each fed its own batch list (a LoRA whose
    list ran out gets a padded row, as in a build)."""
    model = copy.deepcopy(base)
    mm = MultiLoraModel(model, targets, specs, dtype=torch.float64)
    tr = MultiLoraTrainer(mm, hps)
    k = len(specs)
    step = 0
    while not tr.done:
        per = [bs[step] if step < len(bs) else None for bs in batches]
        batch = stack_rows(per, PAD)

        def closure(batch=batch):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            return causal_lm_losses(logits, batch["labels"], k)

        tr.step(closure)
        step += 1
    return mm, tr


def run_peft(base, targets, spec: LoraSpec, hp: TrainHParams, batches, *, copy_init: bool = True):
    """One separate PEFT run: a deep copy of the base, ``get_peft_model`` with the spec's
    variant (rsLoRA, DoRA, init), the engine's init copied in (``copy_init``; False keeps PEFT's
    own, e.g. PiSSA rewriting the base), then ``peft_train``."""
    model = copy.deepcopy(base)
    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        init_lora_weights=True if spec.init == "default" else spec.init,
        fan_in_fan_out=type(base).__name__.startswith("GPT2"),
    )
    pm = get_peft_model(model, cfg)
    if copy_init:
        peft_init_like(pm, spec)
    return peft_train(pm, hp, batches)


def peft_train(pm, hp: TrainHParams, batches, *, schedule: bool = True):
    """The obvious PEFT loop: AdamW, plain shifted cross-entropy, grad clipping and (with
    ``schedule``) the LambdaLR of ``hp``. Returns (model, per-step losses).

    HF's ``labels=`` loss upcasts logits to float32; the loop recomputes it in the model's dtype
    (float64 in these tests) so the comparison is limited by that dtype's round-off, and checks
    HF's own loss agrees to float32."""
    pm.eval()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
    )
    sched = (
        torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(hp.schedule, s, hp.total_steps, hp.warmup_steps)
        )
        if schedule
        else None
    )
    losses = []
    for b in batches:
        opt.zero_grad()
        out = pm(**b)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            b["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
        )
        # HF's float32 log-softmax: each token's loss within ~eps32 |logits| (one rounding of the
        # logits and the logsumexp), the mean over b * t tokens: 10 eps32 (b t) loss
        t_hf = tol(torch.float32, n=b["labels"].numel(), scale=max(float(loss), 1.0))
        assert abs(float(out.loss.detach()) - float(loss.detach())) < t_hf
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return pm, losses


def peft_factors(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name without PEFT's prefix: (A, B)} of the default adapter."""
    out = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
    return out


def peft_magnitudes(pm) -> dict[str, torch.Tensor]:
    """{module name: DoRA magnitude vector} of a ``use_dora`` PEFT model."""
    return {
        n.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]: p.detach()
        for n, p in pm.named_parameters()
        if "lora_magnitude_vector" in n
    }
