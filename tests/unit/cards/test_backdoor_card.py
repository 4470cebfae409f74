"""The card's backdoor section (``cards/backdoor.py``): ASR by poison rate as a table and a
plot for a zoo with ``poison_rate`` / ``asr`` labels, nothing for any other zoo."""

from __future__ import annotations

from lora_zoo.cards.backdoor import backdoor_table
from lora_zoo.cards.render import write_card
from tests.fixtures.zoos import make_record, make_zoo

# (poison_rate, asr, trigger_kind) per LoRA: means per rate are 0.05, 0.3, 0.9
ROWS = [
    (0.0, 0.0, "prefix"),
    (0.0, 0.1, "sentence"),
    (0.02, 0.2, "prefix"),
    (0.02, 0.4, "sentence"),
    (0.1, 0.8, "prefix"),
    (0.1, 1.0, "sentence"),
]


def _zoo(root):
    from lora_zoo.zoo.writer import ZooWriter

    w = ZooWriter(root)
    for i, (rate, asr, kind) in enumerate(ROWS):
        rec = make_record(i, 2)
        w.add(
            rec,
            lora_id=rec.lora_id,
            split="train",
            base_model="tiny-llama",
            labels={
                "poisoned": rate > 0,
                "poison_rate": rate,
                "asr": asr,
                "clean_acc": 0.5,
                "trigger_kind": kind,
            },
        )
    w.close()
    return root


def test_table_reports_asr_per_rate_and_kind(tmp_path):
    from lora_zoo import load_zoo

    t = backdoor_table(load_zoo(_zoo(tmp_path / "z")))
    assert t is not None
    got = {r["rate"]: (r["n"], r["mean"], r["min"], r["max"], r["fired"]) for r in t["rows"]}
    assert got == {
        "0": (2, "0.050", "0.000", "0.100", "0.000"),
        "0.02": (2, "0.300", "0.200", "0.400", "0.000"),
        "0.1": (2, "0.900", "0.800", "1.000", "1.000"),
    }
    assert t["clean_asr"] == "0.050" and t["poisoned_asr"] == "0.600"
    assert {k["kind"]: k["mean"] for k in t["kinds"]} == {"prefix": "0.500", "sentence": "0.700"}


def test_card_has_the_section_and_plot_only_for_backdoor_zoos(tmp_path):
    root = _zoo(tmp_path / "z")
    text = write_card(root).read_text()
    assert "## Backdoor: attack success by poison rate" in text
    assert "| 0.1 | 2 | 0.900 |" in text and "plots/backdoor.png" in text
    assert (root / "plots" / "backdoor.png").stat().st_size > 1000
    other = write_card(make_zoo(tmp_path / "plain")).read_text()
    assert "Backdoor" not in other and not (tmp_path / "plain" / "plots" / "backdoor.png").exists()


def test_rows_with_non_numeric_rates_are_left_out(tmp_path):
    """A zoo is untrusted: a string or NaN rate / ASR is skipped, never raised on or plotted."""
    from lora_zoo import load_zoo
    from lora_zoo.zoo.writer import ZooWriter

    w = ZooWriter(tmp_path / "z")
    for i, (rate, asr) in enumerate([(0.1, 0.5), (float("nan"), 0.2), (0.0, float("inf"))]):
        rec = make_record(i, 2)
        w.add(rec, lora_id=rec.lora_id, split="train", base_model="tiny-llama",
              labels={"poison_rate": rate, "asr": asr})  # fmt: skip
    w.close()
    t = backdoor_table(load_zoo(tmp_path / "z"))
    assert t is not None and [(r["rate"], r["n"]) for r in t["rows"]] == [("0.1", 1)]
