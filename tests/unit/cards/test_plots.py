"""Card plots: spectra checked against a dense SVD reference, histograms and PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_zoo.cards.plots import _hist, family_spectra, make_plots, module_family
from lora_zoo.load.source import load_zoo
from tests.fixtures.zoos import make_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return load_zoo(make_zoo(tmp_path_factory.mktemp("plots") / "zoo", n=10, ranks=(2, 4)))


def test_module_family():
    assert module_family("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert module_family("down_blocks.1.attentions.0.proj_in") == "attentions.proj_in"
    assert module_family("proj") == "proj"


def test_spectra_match_dense_svd(zoo):
    spectra = family_spectra(zoo, max_loras=10)
    assert set(spectra) == {"self_attn.q_proj", "self_attn.v_proj"}
    ref: dict[str, list[np.ndarray]] = {k: [] for k in spectra}
    for i in range(len(zoo["train"])):
        rec = zoo["train"].record(i)
        for name, mod in rec.modules.items():
            dense = mod.delta_w(torch.float64)  # the slow obvious way: (out, in) then SVD
            ref[module_family(name)].append(torch.linalg.svdvals(dense)[: mod.rank].numpy())
    for fam, arr in spectra.items():
        assert arr.shape == (20, 4)  # 10 LoRAs x 2 layers, padded to the max rank
        for row, want in zip(arr, ref[fam]):
            np.testing.assert_allclose(row[: len(want)], want, rtol=1e-4, atol=1e-6)
            assert np.isnan(row[len(want) :]).all()


def test_hist_bars_for_discrete_and_bins_for_continuous():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    _hist(ax, np.array([1e-4, 2e-4, 1e-4, 3e-4, 2e-4, 1e-4]), "lr", "C0")
    assert [p.get_height() for p in ax.patches] == [3, 2, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0001", "0.0002", "0.0003"]
    ax = Figure().subplots()
    vals = np.random.default_rng(0).lognormal(size=200) * 1e-3
    vals[0] = 1e-7  # spans > 2 decades -> log axis
    _hist(ax, vals, "lr", "C0")
    assert ax.get_xscale() == "log"
    assert sum(p.get_height() for p in ax.patches) == 200
    ax = Figure().subplots()
    _hist(ax, np.array([np.nan, np.inf]), "empty", "C0")
    assert not ax.patches


def test_make_plots_writes_readable_pngs(zoo, tmp_path):
    from PIL import Image

    made = make_plots(zoo, tmp_path)
    assert made == {"labels": "labels.png", "spectra": "spectra.png", "hparams": "hparams.png"}
    for f in made.values():
        with Image.open(tmp_path / f) as im:
            assert im.format == "PNG"
            w, h = im.size
            assert w >= 400 and h >= 300
            px = np.asarray(im.convert("L"))
            assert px.std() > 5  # not blank


def test_no_labels_no_label_plot(tmp_path):
    from lora_zoo.zoo.writer import ZooWriter
    from tests.fixtures.zoos import make_record

    w = ZooWriter(tmp_path / "z")
    for i in range(3):
        w.add(make_record(i, 2), lora_id=f"l{i}")
    w.close()
    made = make_plots(load_zoo(tmp_path / "z"), tmp_path / "p")
    assert "labels" not in made and "spectra" in made


def test_spectral_plot_groups_by_varied_hparams_and_card_lists_variants(tmp_path):
    """After ``analyze``, the card has a spectral.png grouped by the varied hp.* columns (one
    row of panels per hyperparameter) and a variants table counting DoRA / rsLoRA / init."""
    from PIL import Image

    from lora_zoo.cards import write_card
    from lora_zoo.load.spectra import analyze_zoo
    from lora_zoo.record import LoraModule, LoraRecord
    from lora_zoo.zoo.writer import ZooWriter
    from tests.fixtures.zoos import make_record

    with ZooWriter(tmp_path / "z") as w:
        for i in range(8):
            rec = make_record(i, 2 + 2 * (i % 2))
            variant = ("plain", "dora")[(i // 2) % 2]
            if variant == "dora":
                mods = {
                    n: LoraModule(m.A, m.B, m.alpha, m.scale, magnitude=torch.ones(m.out_features))
                    for n, m in rec.modules.items()
                }
                rec = LoraRecord(mods, {**rec.config, "use_dora": True})
            hp = {"variant": variant, "r": rec.config["r"], "init": "default"}
            w.add(rec, lora_id=f"l{i}", metadata={"hp": hp})
    analyze_zoo(tmp_path / "z", progress=False)
    card = write_card(tmp_path / "z")
    text = card.read_text()
    assert "| DoRA | no | default | 4 |" in text and "| LoRA | no | default | 4 |" in text
    assert "plots/spectral.png" in text and "spectral.top_sv.mean" not in _label_panels(text)
    img = Image.open(tmp_path / "z" / "plots" / "spectral.png")
    assert img.height > 1.5 * 400  # two rows of panels: by hp.r and by hp.variant


def _label_panels(text: str) -> str:
    return text.split("## Label statistics", 1)[0].split("## LoRA variants", 1)[-1]
