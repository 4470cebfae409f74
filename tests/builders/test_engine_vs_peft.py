"""The batched engine must train each LoRA exactly as a separate PEFT run would.

Reference: per LoRA, a deep copy of the base model, ``get_peft_model`` + ``torch.optim.AdamW`` +
``clip_grad_norm_`` + a LambdaLR schedule, HF's own ``labels=`` loss, same init (peft_init_like),
same data order and hyperparameters. Mixed ranks, batch sizes, step counts, lr, wd, betas.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import (
    LoraSpec,
    MultiLoraModel,
    MultiLoraTrainer,
    TrainHParams,
    peft_init_like,
)
from tests.fixtures.models import tiny_gpt2, tiny_llama
from tests.reference.peft_runs import (
    make_batches,
    peft_factors,
    run_engine,
    run_peft,
    train_tol,
)

CASES = [
    # (spec, hparams, batch size, steps, seq len)
    (
        LoraSpec(r=2, alpha=4, init_seed=11),
        TrainHParams(lr=3e-3, weight_decay=0.1, total_steps=24, max_grad_norm=1.0),
        2,
        24,
        12,
    ),
    (
        LoraSpec(r=4, alpha=8, init_seed=22, use_rslora=True),
        TrainHParams(
            lr=1e-3,
            weight_decay=0.0,
            betas=(0.8, 0.99),
            eps=1e-6,
            total_steps=20,
            warmup_steps=4,
            schedule="linear",
            max_grad_norm=0.05,
        ),
        3,
        20,
        10,
    ),
    (
        LoraSpec(r=4, alpha=16, init_seed=33),
        TrainHParams(
            lr=5e-3, weight_decay=0.01, total_steps=22, schedule="cosine", max_grad_norm=None
        ),
        1,
        22,
        12,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_base,targets",
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])],
    ids=["llama", "gpt2"],
)
def test_batched_matches_separate_peft_runs(make_base, targets):
    base = make_base().double()
    specs = [c[0] for c in CASES]
    hps = [c[1] for c in CASES]
    if hps[2].max_grad_norm is None:  # torch's clip with inf is a no-op; keep the same
        hps[2] = TrainHParams(**{**hps[2].__dict__, "max_grad_norm": float("inf")})
    batches = [make_batches(100 + i, c[3], c[2], c[4]) for i, c in enumerate(CASES)]
    mm, tr = run_engine(base, targets, specs, hps, batches)
    assert tr.steps_done.tolist() == [24, 20, 22]
    assert tr.failed_step == [None, None, None]
    records = mm.extract([f"l{i}" for i in range(3)], dtype=torch.float64)
    for i, (spec, _hp, *_rest) in enumerate(CASES):
        pm, ref_losses = run_peft(base, targets, spec, hps[i], batches[i])
        ref = peft_factors(pm)
        rec = records[i]
        assert set(rec.modules) == set(ref)
        eng_losses = [float(h[i]) for h in tr.loss_history[: len(ref_losses)]]
        ref_t = torch.tensor(ref_losses, dtype=torch.float64)
        torch.testing.assert_close(
            torch.tensor(eng_losses, dtype=torch.float64),
            ref_t,
            atol=train_tol(torch.float64, len(ref_losses), ref_t),  # 10 eps (T V) max loss
            rtol=0,
        )
        for name, (a_ref, b_ref) in ref.items():
            mod = rec.modules[name]
            assert mod.A.shape == (spec.r, a_ref.shape[1])
            # the LoRAs really moved (B starts at 0), so the comparison is not vacuous
            assert b_ref.abs().max() > 1e-4
            steps = len(ref_losses)  # 10 eps64 (T V) max|ref|
            t_a, t_b = (train_tol(torch.float64, steps, x) for x in (a_ref, b_ref))
            torch.testing.assert_close(mod.A.double(), a_ref, atol=t_a, rtol=0)
            torch.testing.assert_close(mod.B.double(), b_ref, atol=t_b, rtol=0)


def test_padded_rank_entries_stay_exactly_zero():
    base = tiny_llama()
    specs = [LoraSpec(r=2, init_seed=1), LoraSpec(r=6, init_seed=2)]
    hps = [TrainHParams(lr=1e-2, weight_decay=0.1, total_steps=5)] * 2
    batches = [make_batches(i, 5, 2, 8) for i in range(2)]
    mm, _ = run_engine(base, ["q_proj", "v_proj"], specs, hps, batches)
    for w in mm.wrappers.values():
        assert w.lora_A.shape[1] == 6
        assert torch.count_nonzero(w.lora_A[0, 2:]) == 0
        assert torch.count_nonzero(w.lora_B[0, :, 2:]) == 0
        assert torch.count_nonzero(w.lora_B[1]) > 0


def test_float32_single_lora_matches_peft():
    """K=1 in float32 (the dtype zoos are built in) against PEFT."""
    base = tiny_llama()
    spec = LoraSpec(r=4, alpha=8, init_seed=5)
    hp = TrainHParams(lr=2e-3, weight_decay=0.05, total_steps=20)
    batches = make_batches(7, 20, 4, 16)
    model = copy.deepcopy(base)
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], [spec])
    tr = MultiLoraTrainer(mm, [hp])
    for b in batches:
        tr.step(
            lambda b=b: causal_lm_losses(model(input_ids=b["input_ids"]).logits, b["labels"], 1)
        )
    rec = mm.extract()[0]
    pm, _ = run_peft(base, ["q_proj", "v_proj"], spec, hp, batches)
    for name, (a_ref, b_ref) in peft_factors(pm).items():
        t_a, t_b = (train_tol(torch.float32, 20, x) for x in (a_ref, b_ref))  # 10 eps32 (T V) max
        torch.testing.assert_close(rec.modules[name].A, a_ref, atol=t_a, rtol=0)
        torch.testing.assert_close(rec.modules[name].B, b_ref, atol=t_b, rtol=0)


class SeededDropout(torch.nn.Module):
    """PEFT's lora_dropout replaced by the engine's draw: one generator per LoRA shared by all
    its layers, uniform float32 draws of the input's shape in forward order, inverted dropout.
    Everything else (the LoRA math, optimizer, clipping) stays PEFT's and torch's own."""

    def __init__(self, p: float, gen: torch.Generator) -> None:
        super().__init__()
        self.p, self.gen = p, gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape, generator=self.gen, dtype=torch.float32)
        return x * (u >= self.p).to(x.dtype) / (1.0 - self.p)


def test_batched_with_dropout_matches_peft_runs():
    """K=3, dropout > 0 (different p and seeds), different ranks, lr, wd and clipping, equal
    batch shapes (the dropout draw has the padded batch's shape): every LoRA equals its PEFT
    run with the same masks, and the masks really change the result."""
    base = tiny_llama().double()
    targets = ["q_proj", "v_proj"]
    specs = [
        LoraSpec(r=2, alpha=4, dropout=0.1, init_seed=1, dropout_seed=101),
        LoraSpec(r=4, alpha=8, dropout=0.3, init_seed=2, dropout_seed=102),
        LoraSpec(r=3, alpha=3, dropout=0.05, init_seed=3, dropout_seed=103),
    ]
    hps = [
        TrainHParams(lr=3e-3, weight_decay=0.1, total_steps=12, max_grad_norm=0.5),
        TrainHParams(lr=1e-3, weight_decay=0.0, total_steps=12, max_grad_norm=float("inf")),
        TrainHParams(lr=5e-3, weight_decay=0.01, total_steps=12, max_grad_norm=0.05),
    ]
    batches = [make_batches(200 + i, 12, 2, 10) for i in range(3)]
    mm, tr = run_engine(base, targets, specs, hps, batches)
    assert tr.failed_step == [None, None, None]
    records = mm.extract(dtype=torch.float64)
    for i, spec in enumerate(specs):
        factors = {}
        for p_drop in (spec.dropout, 0.0):
            model = copy.deepcopy(base)
            cfg = LoraConfig(
                r=spec.r, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=0.1
            )
            pm = get_peft_model(model, cfg)
            peft_init_like(pm, spec)
            gen = torch.Generator().manual_seed(spec.dropout_seed)
            n = 0
            for m in pm.modules():
                if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict):
                    m.lora_dropout["default"] = SeededDropout(p_drop, gen)
                    n += 1
            assert n == 4
            pm.eval()
            params = [p for p in pm.parameters() if p.requires_grad]
            hp = hps[i]
            opt = torch.optim.AdamW(
                params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
            )
            for b in batches[i]:
                opt.zero_grad()
                logits = pm(input_ids=b["input_ids"]).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    b["labels"][:, 1:].reshape(-1),
                    ignore_index=-100,
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                opt.step()
            factors[p_drop] = peft_factors(pm)
        for name, (a_ref, b_ref) in factors[spec.dropout].items():
            mod = records[i].modules[name]
            t_a, t_b = (train_tol(torch.float64, 12, x) for x in (a_ref, b_ref))  # 10 eps (T V)
            torch.testing.assert_close(mod.A.double(), a_ref, atol=t_a, rtol=0)
            torch.testing.assert_close(mod.B.double(), b_ref, atol=t_b, rtol=0)
            # without the masks the result differs: the test does exercise dropout
            assert (mod.B.double() - factors[0.0][name][1]).abs().max() > 1e-5
