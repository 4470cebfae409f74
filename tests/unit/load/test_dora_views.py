"""DoRA zoos load through every view: the decoder reads B and A beside the magnitude (which
is not a factor), so every view sees exactly the low-rank part s B A, as FORMAT.md states."""

from __future__ import annotations

import pytest
import torch

from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset
from lora_zoo.load.views import available_views
from lora_zoo.record import LoraModule, LoraRecord
from lora_zoo.zoo.writer import ZooWriter
from tests.fixtures.zoos import make_record


def _dora(i: int) -> LoraRecord:
    rec = make_record(i, 3)
    g = torch.Generator().manual_seed(i)
    mods = {
        n: LoraModule(m.A, m.B, m.alpha, m.scale, magnitude=torch.rand(m.out_features, generator=g))
        for n, m in rec.modules.items()
    }
    return LoraRecord(mods, {**rec.config, "use_dora": True}, rec.lora_id)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dz")
    with ZooWriter(root) as w:
        for i in range(4):
            w.add(_dora(i), lora_id=f"d{i}")
    return root


@pytest.mark.parametrize("view", sorted(set(available_views()) - {"aligned"}))
def test_every_view_reads_a_dora_zoo(zoo, view):
    ds = LoraDataset(str(zoo / ""), view=view, labels=())
    item = ds[1]
    assert set(item["modules"]) == set(_dora(1).modules)
    stream = next(iter(LoraIterableDataset(str(zoo / ""), view=view, labels=(), batch_size=4)))
    assert set(stream["modules"]) == set(item["modules"])


def test_factors_view_is_the_low_rank_part(zoo):
    ds = LoraDataset(str(zoo / ""), view="factors", labels=())
    rec = _dora(2)
    for name, m in ds[2]["modules"].items():
        u, v = m["U"], m["V"]
        want = rec.modules[name].delta_w()
        # float32 rank-3 product either way: 10 eps32 x r x max|ΔW|
        tol = 10 * torch.finfo(torch.float32).eps * 3 * float(want.abs().max())
        torch.testing.assert_close(u @ v.T, want, atol=tol, rtol=0)


@pytest.mark.parametrize("view", ["factors", "svals", "canonical", "gl_augment"])
def test_magnitude_is_passed_beside_every_view(zoo, view):
    rec = _dora(3)
    item = LoraDataset(str(zoo / ""), view=view, labels=())[3]
    batch = next(iter(LoraIterableDataset(str(zoo / ""), view=view, labels=(), batch_size=4)))
    for name, m in rec.modules.items():
        assert torch.equal(item["modules"][name]["M"], m.magnitude)  # as stored, no scale fold
        assert torch.equal(batch["modules"][name]["M"][3], m.magnitude)


def test_mixed_dora_and_plain_batch_has_zero_magnitudes_for_plain(tmp_path):
    from lora_zoo.load.collate import collate_loras

    with ZooWriter(tmp_path / "mix") as w:
        w.add(_dora(0), lora_id="d0")
        w.add(make_record(1, 3), lora_id="p1")
    ds = LoraDataset(str(tmp_path / "mix"), view="svals", labels=())
    b = collate_loras([ds[0], ds[1]])
    for name, m in _dora(0).modules.items():
        mm = b["modules"][name]["M"]
        assert torch.equal(mm[0], m.magnitude) and torch.count_nonzero(mm[1]) == 0
    stream = next(
        iter(LoraIterableDataset(str(tmp_path / "mix"), view="svals", labels=(), batch_size=2))
    )
    for name in b["modules"]:
        torch.testing.assert_close(stream["modules"][name]["M"], b["modules"][name]["M"])


def test_a_magnitude_of_the_wrong_length_is_refused_by_the_loaders_too(tmp_path):
    from lora_zoo.errors import ShapeMismatchError

    rec = _dora(0)
    name = next(iter(rec.modules))
    rec.modules[name].magnitude = torch.ones(rec.modules[name].out_features + 1)
    with ZooWriter(tmp_path / "bad", validate=False) as w:
        w.add(rec, lora_id="b0")
    for make in (
        lambda: LoraDataset(str(tmp_path / "bad"), view="factors", labels=())[0],
        lambda: next(iter(LoraIterableDataset(str(tmp_path / "bad"), labels=(), batch_size=1))),
    ):
        with pytest.raises(ShapeMismatchError, match="magnitude") as e:
            make()
        assert e.value.key == name
