"""export: a LoRA taken out of a zoo loads in its target tool with the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.contrib.export import export_lora
from lora_zoo.contrib.formats import read_adapter
from lora_zoo.contrib.formats.naming import split_component
from lora_zoo.errors import SelectionError, UnsupportedVariantError
from lora_zoo.zoo.writer import ZooWriter
from tests.fixtures.adapters import diffusers_lora, llama_peft, tiny_pipe


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    base, pm = llama_peft(root / "llama")
    sd_file, _ = diffusers_lora(root / "sd")
    with ZooWriter(root / "zoo") as w:
        w.add(read_adapter(root / "llama"), lora_id="llama-0", base_model="tiny-llama")
        w.add(read_adapter(sd_file), lora_id="sd-0", base_model="tiny-sd", split="test")
    return root / "zoo", base, pm, read_adapter(sd_file)


def test_export_peft_loads_with_same_outputs(zoo, tmp_path, capsys):
    from peft import PeftModel

    path, base, pm, _ = zoo
    assert (
        main(["export", str(path), "llama-0", "--format", "peft", "--out", str(tmp_path / "p")])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "p")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_sd_loads_in_diffusers(zoo, tmp_path, fmt):
    path, _, _, rec = zoo
    f = export_lora(path, "sd-0", fmt, tmp_path / f"{fmt}.safetensors")
    back = read_adapter(f)
    assert {n: m.alpha for n, m in back.modules.items()} == {
        n: m.alpha for n, m in rec.modules.items()
    }
    loaded, by_hand = tiny_pipe(0), tiny_pipe(0)
    loaded.load_lora_weights(str(f))
    with torch.no_grad():
        for name, d in rec.delta_weights().items():
            comp, p = split_component(name)
            model = getattr(by_hand, comp)
            p = p if hasattr(model, "text_model") else p.removeprefix("text_model.")
            model.get_submodule(p).weight.add_(d)
        g = torch.Generator().manual_seed(0)
        lat, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
        ids = torch.randint(0, 100, (1, 16), generator=g)
        for pipe_pair in ((loaded, by_hand),):
            a, b = pipe_pair
            torch.testing.assert_close(
                a.unet(lat, 50, encoder_hidden_states=states).sample,
                b.unet(lat, 50, encoder_hidden_states=states).sample,
                rtol=1e-4,
                atol=1e-5,
            )
            torch.testing.assert_close(
                a.text_encoder(ids)[0], b.text_encoder(ids)[0], rtol=1e-4, atol=1e-5
            )


def test_export_errors(zoo, tmp_path):
    path = zoo[0]
    with pytest.raises(SelectionError, match="did you mean 'llama-0'"):
        export_lora(path, "llama-O", "peft", tmp_path / "x")
    with pytest.raises(UnsupportedVariantError, match="diffusers or kohya"):
        export_lora(path, "sd-0", "peft", tmp_path / "y")
    assert (
        main(["export", str(path), "nope", "--format", "kohya", "--out", str(tmp_path / "z")]) == 1
    )
