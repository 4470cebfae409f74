"""``lora-zoo demo`` end to end on a reduced quickstart: build, load back, probe, and beat chance.

The probe can fail: if the builder's group subsets, the zoo's ``in_group`` labels, the
weights or the ``svals`` view were wrong, its cross-validated accuracy would sit at the
majority-class rate.
"""

from __future__ import annotations

import pytest

from lora_zoo.cli import main
from lora_zoo.lol.demo import quickstart_recipe_path, run_demo

# Smaller than the packaged recipe (160 LoRAs) but the same design; measured on 2 CPU cores.
REDUCED = ["num_loras=96", "train.k=16", "eval.max_examples=30"]


def test_packaged_recipe_is_found():
    path = quickstart_recipe_path()
    assert path.name == "quickstart.yaml" and path.is_file()
    assert path.read_text().startswith("# Quickstart zoo")


@pytest.mark.slow
def test_demo_builds_probes_beats_chance_and_reuses(tmp_path, capsys):
    out = tmp_path / "qs"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--no-progress",
                *(x for o in REDUCED for x in ("--set", o)),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "built" in text and "probe acc" in text
    for g in ("arithmetic", "copy", "facts", "reversal", "sort", "upper"):
        assert g in text

    res = run_demo(out, progress=False)  # no overrides: reuses the finished zoo
    assert not res.built and res.num_loras == 96
    assert len(res.results) == 6
    assert res.mean_accuracy >= res.mean_baseline + 0.15, res.table()
    assert sum(r.accuracy >= r.baseline + 0.1 for r in res.results) >= 4, res.table()

    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert "reused" in capsys.readouterr().out
