"""kohya files: names map to the canonical naming, ΔW follows the kohya formula, alpha survives
every conversion (kohya <-> diffusers <-> PEFT <-> zoo bytes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_zoo.contrib.formats import read_adapter, write_adapter
from lora_zoo.contrib.formats.detect import detect_format
from lora_zoo.contrib.formats.naming import kohya_name, kohya_to_canonical
from lora_zoo.errors import MissingAlphaError
from lora_zoo.record import LoraRecord
from tests.fixtures.adapters import (
    KOHYA_CANONICAL,
    KOHYA_MODULES,
    kohya_file,
    kohya_reference_delta,
    kohya_state,
    llama_peft,
)


def test_reads_hand_written_kohya(tmp_path):
    f = kohya_file(tmp_path / "k.safetensors")
    assert detect_format(f) == "kohya"
    rec = read_adapter(f)
    assert set(rec.modules) == set(KOHYA_CANONICAL.values())
    for kn, name in KOHYA_CANONICAL.items():
        assert rec.modules[name].alpha == KOHYA_MODULES[kn][2]
    ref = kohya_reference_delta(kohya_state())
    for k, v in rec.delta_weights().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7)
    assert rec.modules["down_blocks.0.resnets.0.conv1"].is_conv


def test_fp16_kept(tmp_path):
    f = tmp_path / "h.safetensors"
    save_file(kohya_state(dtype=torch.float16), str(f))
    rec = read_adapter(f)
    assert {m.A.dtype for m in rec.modules.values()} == {torch.float16}


def test_names_exact_with_known_modules_and_heuristic_otherwise():
    # heuristic: compounds of diffusers / CLIP / LLM vocab
    assert (
        kohya_to_canonical("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0")
        == "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"
    )
    assert (
        kohya_to_canonical("lora_te1_text_model_encoder_layers_11_self_attn_out_proj")
        == "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
    )
    # a module name the vocabulary cannot know: exact only with the base model's module list
    name = "blocks.0.my_custom_proj"
    assert kohya_to_canonical(kohya_name(name)) != name
    assert kohya_to_canonical(kohya_name(name), known=[name, "blocks.0.other"]) == name
    # every canonical fixture name survives name -> kohya -> name
    for kn, canon in KOHYA_CANONICAL.items():
        assert kohya_name(canon) == kn
        assert kohya_to_canonical(kn) == canon


def test_missing_alpha_refused_unless_assumed(tmp_path):
    sd = kohya_state()
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    f = tmp_path / "na.safetensors"
    save_file(sd, str(f))
    with pytest.raises(MissingAlphaError, match="assume-alpha-equals-rank"):
        read_adapter(f)
    rec = read_adapter(f, assume_alpha_equals_rank=True)
    assert all(m.scale == 1.0 and m.alpha == m.rank for m in rec.modules.values())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_kohya_converts_with_alpha_intact(fmt, tmp_path):
    rec = read_adapter(kohya_file(tmp_path / "k.safetensors"))
    back = read_adapter(write_adapter(rec, tmp_path / f"o_{fmt}.safetensors", fmt))
    assert set(back.modules) == set(rec.modules)
    for name, m in rec.modules.items():
        b = back.modules[name]
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B), name
        assert (b.alpha, b.scale) == (m.alpha, m.scale), name
    # and through the zoo's own weight bytes
    z = LoraRecord.from_safetensors_bytes(back.to_safetensors_bytes())
    assert {n: m.alpha for n, m in z.modules.items()} == {
        n: m.alpha for n, m in rec.modules.items()
    }


def test_peft_rslora_through_kohya_restores_config(tmp_path):
    """kohya has no rsLoRA: the stored alpha keeps the math; our header restores the config."""
    _, _pm = llama_peft(tmp_path / "p")
    rec = read_adapter(tmp_path / "p")
    back = read_adapter(write_adapter(rec, tmp_path / "k.safetensors", "kohya"))
    assert back.config["use_rslora"] is True
    for name, m in rec.modules.items():
        b = back.modules[name]
        assert (b.alpha, b.scale, b.rank) == (m.alpha, m.scale, m.rank)
        torch.testing.assert_close(b.delta_w(), m.delta_w())
