"""merge: collections combine with a collection column; different base models are refused
unless kept as separate configs (each a loadable zoo and a `datasets` config)."""

from __future__ import annotations

import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.contrib.merge import merge_zoos
from lora_zoo.errors import IncompatibleBaseModelError
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraModule, LoraRecord
from lora_zoo.zoo.writer import ZooWriter


def _rec(seed: int, out: int = 8) -> LoraRecord:
    g = torch.Generator().manual_seed(seed)
    m = LoraModule(torch.randn(2, 8, generator=g), torch.randn(out, 2, generator=g), 4.0, 2.0)
    return LoraRecord({"layers.0.q": m}, {"r": 2, "lora_alpha": 4.0})


def _zoo(path, ids, base, collection="default", seed=0, out=8):
    with ZooWriter(path) as w:
        for i, lid in enumerate(ids):
            w.add(_rec(seed + i, out), lora_id=lid, base_model=base, collection=collection,
                  metadata={"score": float(i), "hp": {"lr": 0.1 * i}}, labels={"acc": 0.5 + i})  # fmt: skip
    return path


@pytest.fixture
def zoos(tmp_path):
    a = _zoo(tmp_path / "ours", ["a", "b"], "tiny-llama")
    b = _zoo(tmp_path / "theirs_zoo", ["a"], "tiny-llama", collection="theirs", seed=10)
    c = _zoo(tmp_path / "gpt", ["g"], "tiny-gpt2", seed=20, out=6)
    return a, b, c


def test_merge_adds_collection_and_renames_collisions(zoos, tmp_path):
    a, b, _ = zoos
    rep = merge_zoos([a, b], tmp_path / "m")
    z = load_zoo(tmp_path / "m")["train"]
    assert sorted(z.ids) == ["a", "b", "theirs/a"]
    assert rep["renamed"] == [{"zoo": "theirs_zoo", "from": "a", "to": "theirs/a"}]
    assert z.row("a")["collection"] == "ours" and z.row("theirs/a")["collection"] == "theirs"
    assert "acc" in z.label_columns and {"score", "hp.lr"} <= set(z.metadata_columns)
    assert z.row("b")["hp.lr"] == pytest.approx(0.1)
    src = load_zoo(b)["train"].record("a")
    assert torch.equal(z.record("theirs/a").modules["layers.0.q"].B, src.modules["layers.0.q"].B)


def test_incompatible_base_models_refused(zoos, tmp_path):
    a, _, c = zoos
    with pytest.raises(IncompatibleBaseModelError, match="separate-configs"):
        merge_zoos([a, c], tmp_path / "m")
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "m2")]) == 1


def test_separate_configs(zoos, tmp_path):
    import datasets

    a, _, c = zoos
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "s"), "--separate-configs"]) == 0
    g = load_zoo(tmp_path / "s" / "configs" / "tiny-gpt2")["train"]
    assert g.ids == ["g"] and g.row("g")["collection"] == "gpt"
    assert len(load_zoo(tmp_path / "s" / "configs" / "tiny-llama")["train"]) == 2
    ds = datasets.load_dataset(str(tmp_path / "s"), "tiny-gpt2", split="train")
    assert ds["lora_id"] == ["g"]
