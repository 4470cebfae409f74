"""diffusers LoRA files: read what ``save_lora_weights`` writes (ΔW == PEFT's), and
``load_lora_weights`` loads our diffusers and kohya exports into a tiny SD pipeline with the same
UNet / text-encoder outputs as adding our ΔW to the weights by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_zoo.contrib.formats import read_adapter, write_adapter
from lora_zoo.contrib.formats.detect import detect_format
from lora_zoo.contrib.formats.naming import split_component
from tests.fixtures.adapters import diffusers_lora, kohya_file, tiny_pipe


def _check_delta(rec, ref):
    ours = rec.delta_weights()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def dfile(tmp_path_factory):
    return diffusers_lora(tmp_path_factory.mktemp("dl"), with_metadata=True)


def test_reads_save_lora_weights_with_metadata(dfile):
    path, ref = dfile
    assert detect_format(path) == "diffusers"
    rec = read_adapter(path)
    assert any(n.startswith("text_encoder.text_model.") for n in rec.modules)
    assert rec.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"].rank == 2
    assert rec.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 2.0
    _check_delta(rec, ref)


def test_reads_save_lora_weights_without_metadata(tmp_path):
    path, ref = diffusers_lora(tmp_path, with_metadata=False)
    _check_delta(read_adapter(path), ref)  # alpha = r: diffusers' convention


def test_reads_old_attn_processor_layout(dfile, tmp_path):
    rec = read_adapter(dfile[0])
    old = {}
    for name, m in rec.modules.items():
        comp, path = split_component(name)
        if comp != "unet" or m.is_conv or ".attn" not in path:
            continue
        head, proj = path.rsplit(".", 1) if not path.endswith("to_out.0") else (path[:-9], "to_out")
        k = f"unet.{head}.processor.{proj}_lora"
        old[f"{k}.down.weight"], old[f"{k}.up.weight"] = m.A, m.B
        old[f"unet.{head}.processor.{proj}_lora.alpha"] = torch.tensor(m.alpha)
    save_file(old, str(tmp_path / "old.safetensors"))
    back = read_adapter(tmp_path / "old.safetensors", "diffusers")
    assert len(back) == len(old) // 3 > 0
    for name, m in back.modules.items():
        torch.testing.assert_close(m.delta_w(), rec.modules[name].delta_w())


def _merge_by_hand(pipe, rec):
    with torch.no_grad():
        for name, d in rec.delta_weights().items():
            comp, path = split_component(name)
            model = getattr(pipe, comp)
            if not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            w = model.get_submodule(path).weight
            w += d.to(w.dtype)


def _outputs(pipe):
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    with torch.no_grad():
        te = pipe.text_encoder(ids)[0]
        # feed the same states to both UNets so the UNet comparison isolates UNet LoRAs
        states = torch.randn(2, 16, 32, generator=g)
        out = pipe.unet(lat, torch.tensor([10, 500]), encoder_hidden_states=states).sample
    return te, out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_load_lora_weights_loads_our_exports(fmt, tmp_path, dfile):
    rec = read_adapter(dfile[0])
    f = write_adapter(rec, tmp_path / f"{fmt}.safetensors", fmt)
    assert detect_format(f) == fmt
    loaded = tiny_pipe(0)
    loaded.load_lora_weights(str(f))
    by_hand = tiny_pipe(0)
    plain_te, plain_unet = _outputs(by_hand)
    _merge_by_hand(by_hand, rec)
    te_ref, unet_ref = _outputs(by_hand)
    te_got, unet_got = _outputs(loaded)
    assert not torch.allclose(unet_ref, plain_unet, atol=1e-4)
    assert not torch.allclose(te_ref, plain_te, atol=1e-4)
    torch.testing.assert_close(unet_got, unet_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(te_got, te_ref, rtol=1e-4, atol=1e-5)


def test_load_lora_weights_loads_hand_written_kohya(tmp_path):
    """Our reading of a third-party kohya file agrees with diffusers' own conversion.

    One alpha for the whole file: diffusers 0.42 drops per-module kohya alphas of attention
    modules (its alpha_pattern keys keep the processor names and match nothing), so with mixed
    alphas diffusers itself is wrong; test_formats_kohya checks those against the formula."""
    f = kohya_file(tmp_path / "k.safetensors", alpha=3.0)
    rec = read_adapter(f)
    loaded = tiny_pipe(0)
    loaded.load_lora_weights(str(f))
    by_hand = tiny_pipe(0)
    _merge_by_hand(by_hand, rec)
    for got, want in zip(_outputs(loaded), _outputs(by_hand)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reads_unet_save_lora_adapter(tmp_path):
    """``unet.save_lora_adapter`` writes unprefixed PEFT keys with the config in the header."""
    from peft import LoraConfig

    from tests.fixtures.adapters import UNET_TARGETS, randomize_lora, tuner_deltas

    unet = tiny_pipe(0).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=7, target_modules=UNET_TARGETS, use_rslora=True))
    randomize_lora(unet, 5, std=0.1)
    unet.save_lora_adapter(str(tmp_path))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    rec = read_adapter(files[0])
    assert rec.config["use_rslora"] is True
    _check_delta(rec, tuner_deltas(unet))
