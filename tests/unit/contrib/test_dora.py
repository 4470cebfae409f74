"""DoRA end to end against PEFT's own ``use_dora``: the magnitude is read, stored in a zoo
bit-exactly, merged exactly as ``merge_and_unload`` merges, and exported to a folder PEFT loads
with the same outputs; formats without a DoRA layout refuse it by name."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_zoo.contrib.formats import read_adapter, write_adapter
from lora_zoo.errors import UnsupportedVariantError
from lora_zoo.load import symmetry
from lora_zoo.record import LoraModule, LoraRecord
from tests.fixtures.adapters import dora_peft
from tests.reference.factors import exact_cond_gl


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def dora(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dora_{request.param}")
    base, pm = dora_peft(d, request.param)
    return d, base, pm


def _magnitudes(pm) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]: p.detach()
        for n, p in pm.named_parameters()
        if "lora_magnitude_vector" in n
    }


def test_read_keeps_magnitudes_and_merges_like_peft(dora):
    d, base, pm = dora
    rec = read_adapter(d)
    assert rec.is_dora and rec.config["use_dora"] is True
    mags = _magnitudes(pm)
    assert set(mags) == set(rec.modules)
    for name, m in rec.modules.items():
        assert torch.equal(m.magnitude, mags[name])  # stored as PEFT saved it, bit for bit
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    w0 = base.state_dict()
    for name, m in rec.modules.items():
        want = merged[f"{name}.weight"].double()
        got = m.merged_weight(w0[f"{name}.weight"])
        # PEFT merges in float32: each entry is a sum of r products plus W0 (GEMM error
        # r eps |.|), then a row norm over `in` entries and one division (~in eps relative);
        # 10 x eps32 x (r + in) x max|W| bounds both, far below the effect of a dropped
        # magnitude (O(1) relative)
        n_in = m.A.shape[1]
        tol = 10 * torch.finfo(torch.float32).eps * (m.rank + n_in) * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=name)
        plain = LoraModule(m.A, m.B, m.alpha, m.scale, m.fan_in_fan_out).merged_weight(
            w0[f"{name}.weight"]
        )
        assert float((plain - want).abs().max()) > 100 * tol  # the magnitude matters


def test_export_loads_in_peft_with_same_outputs(dora, tmp_path):
    from peft import PeftModel

    d, base, pm = dora
    rec = read_adapter(d)
    rec.config = {}  # the writer must rebuild use_dora, rsLoRA and patterns from the modules
    out = write_adapter(rec, tmp_path / "out", "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert loaded.peft_config["default"].use_dora
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = pm(input_ids=ids).logits, loaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)
    # the same float32 forward on the same tensors: only op-order differences
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    back = read_adapter(out)
    for name, m in back.modules.items():
        assert torch.equal(m.magnitude, rec.modules[name].magnitude)


def test_zoo_roundtrip_is_exact_and_keeps_dtype(dora, tmp_path):
    from lora_zoo.load.source import load_zoo
    from lora_zoo.zoo.writer import ZooWriter

    rec = read_adapter(dora[0]).to(torch.bfloat16)
    with ZooWriter(tmp_path / "z") as w:
        w.add(rec, lora_id="d0")
    back = load_zoo(tmp_path / "z")["train"].record("d0")
    assert back.is_dora and back.config["use_dora"]
    for name, m in rec.modules.items():
        b = back.modules[name]
        assert b.magnitude.dtype == torch.bfloat16 and torch.equal(b.magnitude, m.magnitude)
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B)


def test_gl_symmetry_leaves_the_dora_layer_unchanged(dora):
    d, base, _ = dora
    rec = read_adapter(d)
    w0 = base.state_dict()
    for i, (name, m) in enumerate(rec.modules.items()):
        r = m.rank
        rm, rit = exact_cond_gl(r, 30.0, i) if r > 1 else (torch.eye(1, dtype=torch.float64),) * 2
        a, b = m.A.double(), m.B.double()
        m2 = LoraModule(rit.T @ a, b @ rm, m.alpha, m.scale, m.fan_in_fan_out, m.magnitude)
        want = m.merged_weight(w0[f"{name}.weight"])
        got = m2.merged_weight(w0[f"{name}.weight"])
        # B R R^-1 A in float64 with cond(R) = 30: 10 eps64 r cond |ΔW|-scale entries
        tol = 10 * torch.finfo(torch.float64).eps * r * 30 * float(want.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=name)
        u, v = m.factors(dtype=torch.float64)
        u2, v2 = m2.factors(dtype=torch.float64)
        s, s2 = symmetry.svals(u, v), symmetry.svals(u2, v2)
        torch.testing.assert_close(s, s2, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_formats_without_dora_refuse_by_name(dora, tmp_path, fmt):
    rec = read_adapter(dora[0])
    with pytest.raises(UnsupportedVariantError, match="DoRA.*--format peft") as e:
        write_adapter(rec, tmp_path / "o", fmt)
    assert e.value.key in rec.modules


def test_use_dora_and_magnitudes_must_agree():
    from lora_zoo.errors import MissingPairError

    m = LoraModule(torch.randn(2, 5), torch.randn(3, 2), 2.0, 1.0, magnitude=torch.ones(3))
    with pytest.raises(MissingPairError, match="use_dora=False but this module has"):
        LoraRecord({"x": m}, {"r": 2, "lora_alpha": 2}).validate()
    LoraRecord({"x": m}, {"r": 2, "lora_alpha": 2, "use_dora": True}).validate()


def test_diff_compares_magnitudes():
    from lora_zoo.contrib.diff import compare_records

    rec = read_adapter_llama_like()
    other = LoraRecord(
        {
            n: LoraModule(m.A, m.B, m.alpha, m.scale, magnitude=m.magnitude * 1.5)
            for n, m in rec.modules.items()
        },
        rec.config,
    )
    diffs, worst = compare_records("x", rec, other, 0.0, 0.0)
    assert diffs and all("magnitude" in d.message for d in diffs) and worst > 0
    plain = LoraRecord({n: LoraModule(m.A, m.B, m.alpha, m.scale) for n, m in rec.modules.items()})
    diffs, _ = compare_records("x", rec, plain, 0.0, 0.0)
    assert any("DoRA magnitude only in A" in d.message for d in diffs)
    assert compare_records("x", rec, rec, 0.0, 0.0)[0] == []


def read_adapter_llama_like() -> LoraRecord:
    g = torch.Generator().manual_seed(3)
    mods = {
        f"l{i}": LoraModule(
            torch.randn(2, 5, generator=g),
            torch.randn(4, 2, generator=g),
            2.0,
            1.0,
            magnitude=torch.rand(4, generator=g) + 0.5,
        )  # fmt: skip
        for i in range(2)
    }
    return LoraRecord(mods, {"r": 2, "lora_alpha": 2, "use_dora": True})


def test_ingest_keeps_a_peft_dora_folder(dora, tmp_path):
    from lora_zoo.contrib.ingest import ingest
    from lora_zoo.load.source import load_zoo

    d, _, pm = dora
    report = ingest([str(d)], tmp_path / "zoo")
    assert report["rejected"] == []
    rec = load_zoo(tmp_path / "zoo")["train"].record(0)
    assert rec.is_dora and rec.config["use_dora"]
    for name, mag in _magnitudes(pm).items():
        assert torch.equal(rec.modules[name].magnitude, mag)
