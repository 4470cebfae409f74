"""Every file of the broken corpus raises its named error, naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from lora_zoo.contrib.formats import read_adapter
from lora_zoo.contrib.formats.files import read_tensor_file
from lora_zoo.errors import LoraZooError, PickleRefusedError
from tests.fixtures.broken import make_corpus


class _Evil:
    """An arbitrary class: unpickling it would run attacker-chosen code paths."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("broken"))


def test_corpus_is_complete(corpus):
    assert len(corpus) >= 20
    assert len({cls for cls, _ in corpus.values()}) >= 9


def test_each_broken_file_raises_its_error(corpus):
    for path, (cls, key) in corpus.items():
        with pytest.raises(LoraZooError) as ei:
            read_adapter(path, max_bytes=200_000)
        e = ei.value
        assert type(e) is cls, f"{path.name}: got {type(e).__name__}: {e}"
        assert e.file is not None and Path(path).name in e.file, f"{path.name}: {e}"
        if key is not None:
            assert e.key == key, f"{path.name}: key {e.key!r} != {key!r}"
        assert str(e).startswith(e.file)


def test_pickle_message_says_how_to_convert(corpus):
    path = next(p for p in corpus if p.name == "model.bin")
    with pytest.raises(PickleRefusedError, match="allow-pickle-conversion"):
        read_adapter(path)


def test_pickle_conversion_behind_flag_uses_weights_only(tmp_path):
    """With the flag a real torch.save checkpoint is converted; without it, refused."""
    sd = {
        "base_model.model.x.lora_A.weight": torch.randn(2, 4),
        "base_model.model.x.lora_B.weight": torch.randn(3, 2),
    }
    torch.save(sd, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    with pytest.raises(PickleRefusedError):
        read_adapter(tmp_path)
    rec = read_adapter(tmp_path, allow_pickle_conversion=True)
    assert torch.equal(rec.modules["x"].A, sd["base_model.model.x.lora_A.weight"])
    assert rec.modules["x"].scale == 2.0

    # weights_only=True must refuse arbitrary objects even behind the flag
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LoraZooError, match="weights_only"):
        read_tensor_file(tmp_path / "evil.pt", allow_pickle_conversion=True)


def test_truncation_anywhere_is_a_named_error(tmp_path):
    """Cut a valid file at many points: always CorruptFileError, never a crash or a record."""
    data = save({"base_model.model.m.lora_A.weight": torch.randn(2, 8),
                 "base_model.model.m.lora_B.weight": torch.randn(8, 2)})  # fmt: skip
    f = tmp_path / "adapter_model.safetensors"
    (tmp_path / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    for cut in range(0, len(data) - 1, 7):
        f.write_bytes(data[:cut])
        with pytest.raises(LoraZooError):
            read_adapter(tmp_path)
