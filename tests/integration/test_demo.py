"""``lora-zoo demo`` end to end on a reduced quickstart: build, load back, bench, beat chance.

The bench can fail: if the builder's group subsets, the zoo's ``in_group`` labels, the
weights or the views were wrong, every model's test AUROC would sit at the baseline's 0.5.
"""

from __future__ import annotations

import json

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
def test_demo_builds_benches_beats_chance_and_reuses(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["demo", "--out", str(out), "--no-progress", *(x for o in REDUCED for x in ("--set", o))]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "built" in text and "auroc" in text and "vs baseline" in text
    for m in ("baseline", "mlp", "glnet", "transformer"):
        assert m in text
    res = json.loads((out / "bench" / "results.json").read_text())
    assert res["columns"] == [
        f"in_group.{g}" for g in ("arithmetic", "copy", "facts", "reversal", "sort", "upper")
    ]

    again = run_demo(out, progress=False, repeats=1)  # no overrides: reuses the finished zoo
    assert not again.built and again.num_loras == 96
    assert again.auroc("baseline", "-") == pytest.approx(0.5)
    # invariant models on the weights see the group membership: well above chance
    assert again.auroc("mlp", "svals") >= 0.65, again.bench_table()
    assert again.auroc("glnet", "factors") >= 0.65, again.bench_table()

    assert main(["demo", "--out", str(out), "--no-progress", "--repeats", "1"]) == 0
    assert "reused" in capsys.readouterr().out
