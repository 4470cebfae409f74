"""Engine behaviour beyond the PEFT match: isolation of failures, stopping, dropout streams,
re-chunking, extraction into loadable PEFT adapters, padding and schedules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from lora_zoo.builders.causal_lm.losses import causal_lm_losses
from lora_zoo.engine import (
    LoraSpec,
    MultiLoraModel,
    MultiLoraTrainer,
    StackedAdamW,
    TrainHParams,
    lr_factor,
    stack_rows,
)
from lora_zoo.errors import SelectionError
from tests.fixtures.models import tiny_gpt2, tiny_llama
from tests.reference.tolerance import tol

PAD = {"input_ids": 0, "labels": -100, "attention_mask": 0}
VOCAB = 128  # tests.fixtures.models' tiny models: hidden 64, MLP 128, vocab 128: GEMMs <= 128


def train_tol(steps: int, ref: torch.Tensor) -> float:
    """Two float32 trainings of the same LoRA (e.g. alone vs in a batch): each step's GEMMs
    (inner dims <= VOCAB) and optimizer update add ~eps n relative to the factors' size:
    10 eps32 * (steps * VOCAB) * max|ref|."""
    return tol(torch.float32, n=steps * VOCAB, scale=float(ref.abs().max()))


def batches_for(seed: int, steps: int, b: int = 2, t: int = 8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, 128, (b, t), generator=g)
        out.append(
            {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        )
    return out


def train(model, specs, hps, data, inject_nan_at=None, targets=("q_proj", "v_proj")):
    mm = MultiLoraModel(model, list(targets), specs)
    tr = MultiLoraTrainer(mm, hps)
    step = 0
    while not tr.done:
        batch = stack_rows([d[step] if step < len(d) else None for d in data], PAD)

        def closure(batch=batch, step=step):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            losses = causal_lm_losses(logits, batch["labels"], len(specs))
            if inject_nan_at is not None and step == inject_nan_at[1]:
                bump = torch.zeros_like(losses)
                bump[inject_nan_at[0]] = float("nan")
                losses = losses + bump
            return losses

        tr.step(closure)
        step += 1
    return mm, tr


def factors(mm, k):
    return {
        n: (w.lora_A[k].detach().clone(), w.lora_B[k].detach().clone())
        for n, w in mm.wrappers.items()
    }


def test_nan_loss_freezes_only_that_lora():
    base = tiny_llama()
    specs = [LoraSpec(r=4, init_seed=i) for i in range(3)]
    hps = [TrainHParams(lr=1e-2, weight_decay=0.1, total_steps=6)] * 3
    data = [batches_for(10 + i, 6) for i in range(3)]
    mm, tr = train(copy.deepcopy(base), specs, hps, data, inject_nan_at=(1, 3))
    assert tr.failed_step == [None, 3, None]
    assert tr.steps_done.tolist() == [6, 3, 6]
    assert torch.isnan(tr.loss_history[4][1]) and torch.isfinite(tr.loss_history[4][0])
    # the others trained exactly as in a run without the failing LoRA
    mm2, _ = train(copy.deepcopy(base), [specs[0], specs[2]], [hps[0], hps[2]], [data[0], data[2]])
    for k_full, k_alone in ((0, 0), (2, 1)):
        f_full, f_alone = factors(mm, k_full), factors(mm2, k_alone)
        for n in f_full:
            for j in (0, 1):  # 10 eps32 (6 steps * VOCAB) max|factor|
                t = train_tol(6, f_alone[n][j])
                torch.testing.assert_close(f_full[n][j], f_alone[n][j], atol=t, rtol=0)
    # the failed LoRA kept its (finite) factors from before the failing step
    for a, b in factors(mm, 1).values():
        assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_finished_lora_state_does_not_change():
    base = tiny_llama()
    specs = [LoraSpec(r=2, init_seed=1), LoraSpec(r=2, init_seed=2)]
    hps = [
        TrainHParams(lr=1e-2, weight_decay=0.5, total_steps=2),
        TrainHParams(lr=1e-2, weight_decay=0.5, total_steps=5),
    ]
    model = copy.deepcopy(base)
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], specs)
    tr = MultiLoraTrainer(mm, hps)
    data = [batches_for(1, 2), batches_for(2, 5)]
    snap = None
    for step in range(5):
        batch = stack_rows([d[step] if step < len(d) else None for d in data], PAD)
        tr.step(
            lambda batch=batch: causal_lm_losses(
                model(input_ids=batch["input_ids"]).logits, batch["labels"], 2
            )
        )
        if step == 1:
            snap = (factors(mm, 0), [m[0].clone() for m in tr.opt.exp_avg])
    assert tr.done and tr.steps_done.tolist() == [2, 5]
    for n, (a, b) in factors(mm, 0).items():
        assert torch.equal(a, snap[0][n][0]) and torch.equal(b, snap[0][n][1])
    for m_now, m_then in zip(tr.opt.exp_avg, snap[1]):
        assert torch.equal(m_now[0], m_then)


def test_dropout_is_deterministic_and_per_lora():
    base = tiny_llama()
    hps = [TrainHParams(lr=5e-3, total_steps=4)] * 2
    data = [batches_for(3, 4), batches_for(4, 4)]
    specs = [
        LoraSpec(r=4, init_seed=1, dropout=0.3, dropout_seed=7),
        LoraSpec(r=4, init_seed=2, dropout=0.0),
    ]
    mm1, _ = train(copy.deepcopy(base), specs, hps, data)
    mm2, _ = train(copy.deepcopy(base), specs, hps, data)
    specs3 = [LoraSpec(r=4, init_seed=1, dropout=0.3, dropout_seed=8), specs[1]]
    mm3, _ = train(copy.deepcopy(base), specs3, hps, data)
    f1, f2, f3 = factors(mm1, 0), factors(mm2, 0), factors(mm3, 0)
    name = next(iter(f1))
    assert all(torch.equal(f1[n][1], f2[n][1]) for n in f1)  # same seeds -> same result
    assert not torch.allclose(f1[name][1], f3[name][1])  # other dropout stream -> differs
    # LoRA 1 (no dropout) is unaffected by LoRA 0's dropout stream
    g1, g3 = factors(mm1, 1), factors(mm3, 1)
    # 10 eps32 (4 steps * VOCAB) max|B|
    assert all(torch.allclose(g1[n][1], g3[n][1], rtol=0, atol=train_tol(4, g1[n][1])) for n in g1)


def test_reset_changes_k_and_init_depends_only_on_seed():
    model = tiny_llama()
    mm = MultiLoraModel(model, ["q_proj"], [LoraSpec(r=4, init_seed=5)])
    a_alone = factors(mm, 0)
    mm.reset([LoraSpec(r=2, init_seed=9), LoraSpec(r=4, init_seed=5), LoraSpec(r=8)])
    assert mm.num_loras == 3
    a_chunk = factors(mm, 1)
    for n in a_alone:
        assert torch.equal(a_alone[n][0][:4], a_chunk[n][0][:4])
    x = torch.randint(0, 128, (3 * 2, 6))
    assert model(input_ids=x).logits.shape == (6, 6, 128)
    with pytest.raises(ValueError, match="multiple of K"):
        model(input_ids=x[:4])


def test_disabled_and_remove_restore_base_outputs():
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 6))
    ref = model(input_ids=x).logits
    mm = MultiLoraModel(model, ["q_proj", "v_proj"], [LoraSpec(r=2, init_seed=1)] * 2)
    for w in mm.wrappers.values():
        torch.nn.init.normal_(w.lora_B.data)
    assert not torch.allclose(model(input_ids=x).logits, ref)
    with mm.disabled():
        torch.testing.assert_close(model(input_ids=x).logits, ref)
    mm.remove()
    torch.testing.assert_close(model(input_ids=x).logits, ref)
    assert not any("MultiLora" in type(m).__name__ for m in model.modules())


def test_no_matching_target_is_a_named_error():
    with pytest.raises(SelectionError, match="target_modules"):
        MultiLoraModel(tiny_llama(), ["nope_proj"], [LoraSpec()])


@pytest.mark.parametrize(
    "make_base,targets",
    [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])],
    ids=["llama", "gpt2"],
)
def test_extracted_records_load_in_peft_and_reproduce_outputs(tmp_path, make_base, targets):
    base = make_base()
    model = copy.deepcopy(base)
    specs = [LoraSpec(r=2, alpha=4, init_seed=1), LoraSpec(r=4, alpha=4, init_seed=2)]
    mm = MultiLoraModel(model, targets, specs)
    for w in mm.wrappers.values():  # non-trivial factors (respecting the rank padding)
        w.lora_B.data.normal_(0, 0.2)
        w.lora_B.data.mul_(w.rank_mask[:, None, :])
    x = torch.randint(0, 128, (1, 7))
    batched = model(input_ids=x.repeat(2, 1)).logits  # (2, 7, V): LoRA 0 row, LoRA 1 row
    recs = mm.extract(["a", "b"], base_model_name="tiny")
    for k, rec in enumerate(recs):
        d = tmp_path / f"ad{k}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(rec.to_safetensors_bytes())
        (d / "adapter_config.json").write_text(json.dumps(rec.config))
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
        # float32 forward through 2 layers of GEMMs with inner dims <= VOCAB (x 2 layers,
        # + the LoRA path): 10 eps32 (2 VOCAB) max|logit|
        t = tol(torch.float32, n=2 * VOCAB, scale=float(batched[k].abs().max()))
        torch.testing.assert_close(pm(input_ids=x).logits[0], batched[k], atol=t, rtol=0)
    assert recs[1].config["r"] == 4 and recs[0].modules[next(iter(recs[0].modules))].rank == 2


def test_stack_rows_pads_rows_and_length():
    a = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    b = {k: torch.full((1, 5), 2, dtype=torch.long) for k in a}
    out = stack_rows([a, b, None], PAD)
    assert out["input_ids"].shape == (6, 5)
    assert out["labels"][0, 3:].tolist() == [-100, -100]  # right padding ignored
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert out["labels"][3].tolist() == [-100] * 5  # missing row: zero weight
    assert out["attention_mask"][3].tolist() == [1] * 5  # never a fully masked row
    assert (out["labels"][4:] == -100).all()


def test_causal_lm_losses_is_per_lora_mean():
    logits = torch.randn(4, 5, 11)
    labels = torch.randint(0, 11, (4, 5))
    labels[1] = -100  # LoRA 0 has only row 0's tokens
    got = causal_lm_losses(logits, labels, 2)
    ce = torch.nn.functional.cross_entropy
    ref0 = ce(logits[0, :-1], labels[0, 1:])
    ref1 = ce(logits[2:, :-1].reshape(-1, 11), labels[2:, 1:].reshape(-1))
    torch.testing.assert_close(got, torch.stack([ref0, ref1]))


def test_stacked_adamw_matches_torch_for_each_row():
    torch.manual_seed(0)
    hps = [
        TrainHParams(lr=1e-2, weight_decay=0.1),
        TrainHParams(lr=3e-3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0),
    ]
    p = torch.nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))
    refs = [torch.nn.Parameter(p.detach()[k].clone()) for k in range(2)]
    opts = [
        torch.optim.AdamW([r], lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay)
        for r, h in zip(refs, hps)
    ]
    opt = StackedAdamW([p], hps)
    for _ in range(10):
        g = torch.randn(2, 3, 4, dtype=torch.float64)
        p.grad = g.clone()
        opt.step(torch.tensor([True, True]))
        for k in range(2):
            refs[k].grad = g[k].clone()
            opts[k].step()
    for k in range(2):
        # elementwise AdamW, a few roundings per step, 10 steps: 10 eps64 * 10 * max|p|
        t = tol(torch.float64, n=10, scale=float(refs[k].detach().abs().max()))
        torch.testing.assert_close(p.detach()[k], refs[k].detach(), atol=t, rtol=0)


def test_lr_schedules():
    assert lr_factor("constant", 5, 10) == 1.0
    assert lr_factor("linear", 0, 10, 2) == 0.0 and lr_factor("linear", 1, 10, 2) == 0.5
    assert lr_factor("linear", 6, 10, 2) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor("bogus", 0, 1)
