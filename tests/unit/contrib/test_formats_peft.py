"""PEFT format against PEFT itself: our ΔW == merge_and_unload's weight change; a folder we
write loads with PeftModel.from_pretrained and gives the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_zoo.contrib.formats import read_adapter, write_adapter
from lora_zoo.contrib.formats.detect import detect_format
from tests.fixtures.adapters import gpt2_peft, llama_peft, merged_delta, unet_peft


def _check_delta(rec, ref):
    ours = rec.delta_weights()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    base, pm = llama_peft(d)
    return d, base, pm


def test_llama_rslora_patterns_delta_matches_merge(llama):
    d, base, pm = llama
    assert detect_format(d) == "peft"
    rec = read_adapter(d)
    assert rec.ranks["model.layers.0.self_attn.v_proj"] == 2
    assert rec.ranks["model.layers.1.self_attn.q_proj"] == 6
    assert rec.modules["model.layers.0.self_attn.o_proj"].alpha == 3.0
    _check_delta(rec, merged_delta(base, pm))


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base, pm = gpt2_peft(tmp_path)
    rec = read_adapter(tmp_path)
    assert all(m.fan_in_fan_out for m in rec.modules.values())
    _check_delta(rec, merged_delta(base, pm))


def test_unet_conv_lora_delta_matches_merge(tmp_path):
    base, pm = unet_peft(tmp_path)
    rec = read_adapter(tmp_path)
    conv = rec.modules["down_blocks.0.resnets.0.conv1"]
    assert conv.is_conv and conv.rank == 2 and conv.A.shape[2:] == (3, 3)
    _check_delta(rec, merged_delta(base, pm))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_written_folder_loads_in_peft_with_same_outputs(which, tmp_path, llama):
    from peft import PeftModel

    if which == "llama":
        _, base, pm = llama
        src = llama[0]
    else:
        src = tmp_path / "src"
        base, pm = gpt2_peft(src)
    rec = read_adapter(src)
    # drop the original config: the writer must rebuild an exact one from the modules alone
    rec.config = {}
    out = write_adapter(rec, tmp_path / "out", "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_roundtrip_keeps_alpha_and_config(llama, tmp_path):
    rec = read_adapter(llama[0])
    back = read_adapter(write_adapter(rec, tmp_path / "o", "peft"))
    assert back.config["use_rslora"] is True
    for name, m in rec.modules.items():
        b = back.modules[name]
        assert torch.equal(m.A, b.A) and torch.equal(m.B, b.B)
        assert (b.alpha, b.scale) == (m.alpha, m.scale)
