"""LyCORIS and other non-LoRA variants are refused by name, with what a user can do
(docs/FORMAT.md, 'LyCORIS and other variants'): kohya / LyCORIS files (LoHa, LoKr, Tucker,
kohya DoRA), PEFT LoHa / LoKr folders made by PEFT itself, and inside ``ingest`` (reported per
file, the plain LoRAs beside them accepted)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_zoo.contrib.formats import read_adapter
from lora_zoo.errors import UnsupportedVariantError
from tests.fixtures.adapters import KOHYA_MODULES, kohya_file, kohya_state
from tests.fixtures.models import tiny_llama

K = next(iter(KOHYA_MODULES))


@pytest.mark.parametrize(
    ("extra", "named", "todo"),
    [
        ({"hada_w1_a": (2, 4), "hada_w1_b": (2, 4)}, "LoHa", "extract a plain LoRA"),
        ({"lokr_w1": (2, 2), "lokr_w2": (2, 2)}, "LoKr", "extract a plain LoRA"),
        ({"lora_mid.weight": (2, 2, 3, 3)}, "Tucker", "extract a plain LoRA"),
        ({"dora_scale": (1, 4)}, "DoRA in kohya", "re-save it in PEFT's layout"),
    ],
)
def test_kohya_lycoris_files_are_refused_by_name(tmp_path, extra, named, todo):
    sd = kohya_state()
    for suffix, shape in extra.items():
        sd[f"{K}.{suffix}"] = torch.zeros(shape)
    save_file(sd, str(tmp_path / "v.safetensors"))
    with pytest.raises(UnsupportedVariantError, match=named) as e:
        read_adapter(tmp_path / "v.safetensors")
    assert todo in str(e.value) and e.value.key.startswith(K)


@pytest.mark.parametrize(("kind", "named"), [("LOHA", "LoHa"), ("LOKR", "LoKr")])
def test_peft_lycoris_folders_are_refused_by_name(tmp_path, kind, named):
    import peft

    cls = peft.LoHaConfig if kind == "LOHA" else peft.LoKrConfig
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama(0)), cls(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == kind
    with pytest.raises(UnsupportedVariantError, match=f"{kind}.*{named}") as e:
        read_adapter(tmp_path)
    assert e.value.key == "peft_type" and "merge_and_unload" in str(e.value)


def test_ingest_reports_variants_and_keeps_the_rest(tmp_path):
    from lora_zoo.contrib.ingest import ingest
    from lora_zoo.load.source import load_zoo

    src = tmp_path / "src"
    src.mkdir()
    kohya_file(src / "plain.safetensors")
    # a LoHa file as LyCORIS writes it: only hada_* factors and alpha per module
    sd = {f"{K}.{f}": torch.randn(2, 32) for f in ("hada_w1_a", "hada_w2_a")}
    sd.update({f"{K}.{f}": torch.randn(32, 2) for f in ("hada_w1_b", "hada_w2_b")})
    sd[f"{K}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(src / "loha.safetensors"))
    report = ingest([str(src)], tmp_path / "zoo")
    rejected = report["rejected"]
    assert [r["file"].rsplit("/", 1)[-1] for r in rejected] == ["loha.safetensors"]
    assert rejected[0]["error"] == "UnsupportedVariantError" and "LoHa" in rejected[0]["message"]
    assert len(load_zoo(tmp_path / "zoo")["train"]) == 1
