"""The batched engine's variants against PEFT's own: K DoRA LoRAs in one pass vs separate PEFT
``use_dora=True`` runs; PiSSA / OLoRA vs PEFT's ``init_lora_weights`` (which rewrites the base)
and vs PEFT's own conversion of the trained adapter to a plain LoRA on the true base; the
gaussian init's distribution and PEFT-equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_zoo.engine import LoraSpec, MultiLoraModel, TrainHParams
from lora_zoo.errors import SelectionError
from tests.fixtures.models import tiny_gpt2, tiny_llama
from tests.reference.peft_runs import (
    make_batches,
    peft_factors,
    peft_magnitudes,
    peft_train,
    run_engine,
    run_peft,
    train_tol,
)

STEPS = 8
DORA_CASES = [
    (LoraSpec(r=2, alpha=4, init_seed=11, use_dora=True), TrainHParams(lr=3e-3, weight_decay=0.1)),
    (
        LoraSpec(r=4, alpha=8, init_seed=22, use_rslora=True, use_dora=True, init="gaussian"),
        TrainHParams(lr=2e-3, weight_decay=0.0, max_grad_norm=0.05),
    ),
    (LoraSpec(r=3, alpha=6, init_seed=33), TrainHParams(lr=5e-3, weight_decay=0.01)),  # plain
]


@pytest.mark.parametrize(
    "make_base,targets",
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])],
    ids=["llama", "gpt2"],
)
def test_batched_dora_matches_separate_peft_use_dora_runs(make_base, targets):
    base = make_base().double()
    specs = [c[0] for c in DORA_CASES]
    hps = [TrainHParams(**{**c[1].__dict__, "total_steps": STEPS}) for c in DORA_CASES]
    batches = [make_batches(200 + i, STEPS, 2, 10) for i in range(len(specs))]
    mm, tr = run_engine(base, targets, specs, hps, batches)
    records = mm.extract([f"l{i}" for i in range(3)], dtype=torch.float64)
    assert [r.is_dora for r in records] == [True, True, False]
    for i, spec in enumerate(specs):
        pm, ref_losses = run_peft(base, targets, spec, hps[i], batches[i])
        ref_t = torch.tensor(ref_losses, dtype=torch.float64)
        got_t = torch.stack([h[i] for h in tr.loss_history[:STEPS]])
        # 10 eps64 (T V) max loss, as for plain LoRA (the DoRA norm adds O(in) terms per step,
        # in < V here)
        torch.testing.assert_close(
            got_t, ref_t, atol=train_tol(torch.float64, STEPS, ref_t), rtol=0
        )
        mags = peft_magnitudes(pm)
        for name, (a_ref, b_ref) in peft_factors(pm).items():
            mod = records[i].modules[name]
            assert b_ref.abs().max() > 1e-4  # trained: B moved off 0
            for got, want in ((mod.A, a_ref), (mod.B, b_ref)):
                torch.testing.assert_close(
                    got, want, atol=train_tol(torch.float64, STEPS, want), rtol=0
                )
            if spec.use_dora:
                m_ref = mags[name]
                assert not torch.allclose(m_ref, mag0(base, name, targets), atol=1e-6)  # trained
                t_m = train_tol(torch.float64, STEPS, m_ref)
                torch.testing.assert_close(mod.magnitude, m_ref, atol=t_m, rtol=0)
            else:
                assert name not in mags and mod.magnitude is None


def mag0(base, name, targets):
    w = base.get_submodule(name).weight
    w = w.T if type(base).__name__.startswith("GPT2") else w
    return w.norm(dim=1)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_match_peft_and_its_conversion(init, tmp_path):
    from peft import PeftModel

    from lora_zoo.contrib.formats import read_adapter, write_adapter

    base = tiny_llama()  # PEFT's PiSSA / OLoRA need a float32 base
    targets = ["q_proj", "v_proj"]
    spec = LoraSpec(r=4, alpha=8, init_seed=5, init=init)
    specs = [spec, LoraSpec(r=2, alpha=4, init_seed=6)]  # a default LoRA in the same chunk
    hps = [TrainHParams(lr=2e-3, weight_decay=0.05, total_steps=STEPS)] * 2
    batches = [make_batches(300 + i, STEPS, 2, 10) for i in range(2)]
    mm, _ = run_engine(base, targets, specs, hps, batches)
    rec = mm.extract(["p", "d"])[0]
    # PEFT: init on the base (rewriting it), saved, trained, converted by PEFT itself
    model = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "init"))  # the initial adapter PEFT's conversion reads
    pm.peft_config["default"].init_lora_weights = True
    pm_trained, _ = peft_train(pm, hps[0], batches[0], schedule=False)
    pm_trained.save_pretrained(
        str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    conv = read_adapter(tmp_path / "conv")
    assert rec.config["r"] == conv.config["r"] == 8 and rec.config["init_lora_weights"] is True
    for name, m in rec.modules.items():
        c = conv.modules[name]
        assert m.rank == 8 and m.scale == pytest.approx(c.scale)
        for got, want in ((m.A, c.A), (m.B, c.B)):  # [A; A0], [B, -B0] factor by factor
            torch.testing.assert_close(
                got, want, atol=train_tol(torch.float32, STEPS, want), rtol=0
            )
    # what the zoo stores, loaded by PEFT on the TRUE base, computes the trained PiSSA model
    out = write_adapter(rec, tmp_path / "ours", "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = batches[0][0]["input_ids"]
    with torch.no_grad():
        want, got = pm_trained(input_ids=ids).logits, loaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    # float32 forward through 2 layers of width 64 on weights that differ by the trained
    # tolerance: 10 eps32 (T V) max|logit|
    torch.testing.assert_close(got, want, atol=train_tol(torch.float32, STEPS, want), rtol=0)


def test_gaussian_init_is_peft_gaussian():
    base = tiny_llama()
    specs = [LoraSpec(r=4, init_seed=1, init="gaussian"), LoraSpec(r=4, init_seed=1)]
    mm = MultiLoraModel(copy.deepcopy(base), ["q_proj", "v_proj", "o_proj"], specs)
    a = torch.cat([w.lora_A[0].detach().flatten() for w in mm.wrappers.values()])  # 3 * 2 * 4 * 64
    # N(0, 1/r^2) with n = 1536 draws: the sample std is within 5 standard errors
    # (std / sqrt(2n)) of 1/4, the mean within 5 std / sqrt(n) of 0
    n = a.numel()
    assert abs(float(a.std()) - 0.25) < 5 * 0.25 / (2 * n) ** 0.5
    assert abs(float(a.mean())) < 5 * 0.25 / n**0.5
    assert all(torch.count_nonzero(w.lora_B) == 0 for w in mm.wrappers.values())
    # the default LoRA beside it keeps its kaiming draw (the gaussian draw is its own)
    ref = MultiLoraModel(copy.deepcopy(base), ["q_proj", "v_proj", "o_proj"], specs[1:])
    for name, w in mm.wrappers.items():
        assert torch.equal(w.lora_A[1], ref.wrappers[name].lora_A[0])
    with pytest.raises(SelectionError, match="not one of"):
        LoraSpec(init="eva")
    with pytest.raises(SelectionError, match="DoRA with init 'pissa'"):
        LoraSpec(init="pissa", use_dora=True)
