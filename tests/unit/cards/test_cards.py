"""Dataset cards: a Hub-valid YAML header that keeps the writer's configs, and a body whose
numbers come from the zoo (label statistics checked against numpy)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from lora_zoo.cards import card_header, render_card, write_card
from lora_zoo.load.source import load_zoo
from lora_zoo.zoo.card_min import configs_header
from lora_zoo.zoo.manifest import verify
from tests.fixtures.zoos import make_zoo


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    root = make_zoo(
        tmp_path_factory.mktemp("card") / "zoo", n=12, splits={"train": 0.75, "test": 0.25}
    )
    write_card(root, plots=False)
    return root


def _header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_header_is_a_valid_hub_dataset_card(zoo_dir):
    from huggingface_hub import DatasetCard, DatasetCardData

    text = (zoo_dir / "README.md").read_text()
    card = DatasetCard(text)
    data = card.data
    assert isinstance(data, DatasetCardData)
    assert data.license == "other"
    assert {"lora", "weight-space-learning"} <= set(data.tags)
    assert data.task_categories == ["other"]
    assert data.size_categories == ["n<1K"]
    # the writer's configs survive unchanged, so datasets / the Hub read the manifest's shards
    zoo = load_zoo(zoo_dir)
    assert data.to_dict()["configs"] == configs_header(zoo.manifest)["configs"]
    feats = {f["name"]: f for f in data.to_dict()["dataset_info"]["features"]}
    assert list(feats) == [c["name"] for c in zoo.manifest["columns"]]
    assert feats["weights"]["dtype"] == "binary"
    assert feats["train_example_ids"]["list"] == "int64"
    # a round trip through the card classes keeps the header
    again = DatasetCardData(**_header(text))
    assert again.to_dict()["configs"] == data.to_dict()["configs"]
    assert verify(zoo_dir) == []  # README configs still agree with the manifest


def test_body_sections_and_schema_table(zoo_dir):
    text = (zoo_dir / "README.md").read_text()
    for section in (
        "## How to load",
        "## Recipe",
        "## Schema",
        "## Label statistics",
        "## Provenance",
        "## Splits",
        "## Citation",
    ):
        assert section in text
    zoo = load_zoo(zoo_dir)
    for c in zoo.manifest["columns"]:
        assert re.search(
            rf"^\| `{re.escape(c['name'])}` \| `{re.escape(c['type'])}` \| "
            rf"{c['role']} \|",
            text,
            re.M,
        ), c["name"]
    assert "2410.04207" in text
    assert "No recipe is stored" in text  # make_zoo is not a recipe build


def test_label_statistics_match_numpy(zoo_dir):
    text = (zoo_dir / "README.md").read_text()
    zoo = load_zoo(zoo_dir)
    vals = np.array(
        [v for s in zoo.splits for v in zoo[s].table(["eval_loss"]).column(0).to_pylist()]
    )
    row = re.search(
        r"^\| `eval_loss` \| (\d+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|", text, re.M
    )
    assert row is not None
    n, mean, std, lo, med, hi = row.groups()
    assert int(n) == 12
    for got, want in (
        (mean, vals.mean()),
        (std, vals.std()),
        (lo, vals.min()),
        (med, np.median(vals)),
        (hi, vals.max()),
    ):
        assert float(got) == pytest.approx(want, rel=1e-3)


def test_load_snippet_in_card_runs(zoo_dir):
    """The lora_zoo code block of the card runs as written (repo id -> local path)."""
    text = render_card(zoo_dir, repo_id=str(zoo_dir))
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "load_zoo" in b)
    ns: dict = {}
    exec(compile(code, "<card>", "exec"), ns)
    assert len(ns["batch"]["lora_id"]) == 8
    assert "eval_loss" in ns["batch"]["labels"]


def test_built_zoo_card_has_recipe_and_provenance(tmp_path):
    """A zoo packed by the runner gets the full card (pack calls write_card)."""
    from lora_zoo.build.runner import build_from_recipe_text
    from tests.fixtures.toy_builder import TOY_RECIPE, register

    register()
    recipe = TOY_RECIPE.replace("num_loras: 6", "num_loras: 4").replace(
        "steps: {kind: choice, values: [10, 20]}", "steps: 5"
    )
    build_from_recipe_text(recipe, tmp_path / "toy", progress=False)
    text = (tmp_path / "toy" / "README.md").read_text()
    assert "builder: toy_linear" in text  # the recipe text
    assert re.search(r"\| total CPU hours \| [0-9.e-]+ ", text)
    assert re.search(r"\| lora-zoo git commit \| `[0-9a-f]{40}`", text)
    assert "Group split on metadata column `groups_excluded`" in text
    assert (tmp_path / "toy" / "plots" / "spectra.png").exists()
    assert "![singular value spectra](plots/spectra.png)" in text
    assert _header(text)["pretty_name"] == "LoRA zoo: toy"
    assert verify(tmp_path / "toy") == []


def test_plain_datasets_reads_the_carded_folder(zoo_dir):
    import datasets

    ds = datasets.load_dataset(str(zoo_dir))
    zoo = load_zoo(zoo_dir)
    assert sorted(ds) == sorted(zoo.splits)
    assert list(ds["test"]["lora_id"]) == zoo["test"].ids


def test_custom_template_and_missing_template(zoo_dir, tmp_path):
    from lora_zoo.errors import ZooFormatError

    t = tmp_path / "mine.md.j2"
    t.write_text("---\n{{ header_yaml }}---\n# {{ title }}: {{ num_rows }} LoRAs\n")
    text = render_card(zoo_dir, template=t)
    assert text.endswith("# LoRA zoo: 12 LoRAs\n")
    assert card_header(load_zoo(zoo_dir))["configs"] == _header(text)["configs"]
    with pytest.raises(ZooFormatError, match="nope.j2"):
        render_card(zoo_dir, template=tmp_path / "nope.j2")


def test_card_shows_bench_results_when_they_exist(tmp_path):
    """After ``lora-zoo bench``, the card has a results table (model, view, symmetry, metrics,
    vs baseline) and a figure."""
    from lora_zoo.cards import write_card
    from lora_zoo.lol.bench import run_bench
    from tests.fixtures.zoos import make_zoo

    root = make_zoo(tmp_path / "z", n=24, splits={"train": 0.7, "test": 0.3})
    from lora_zoo.cards.lol_results import ci_text, run_label
    from lora_zoo.cards.render import md

    res = run_bench(root, "eval_loss", models=["baseline", "mlp"], views=["svals"], repeats=1,
                    progress=False, train_sizes=[0.5], bootstrap=100)  # fmt: skip
    assert (root / "bench" / "results.json").exists()
    text = write_card(root).read_text()
    assert "## What can be learned from it" in text and "`lora-zoo bench` on target" in text
    labels = [run_label(r) for r in res["runs"]]  # the baseline and the permuted-labels control
    assert labels == ["baseline (label mean/majority)", "mlp", "mlp (permuted labels)"]
    for r, lab in zip(res["runs"], labels):
        assert f"| {lab} | {r['view']} |" in text and md(ci_text(r["summary"], "r2")) in text
    assert (root / "plots" / "bench.png").exists() and "plots/bench.png" in text
    assert "How many LoRAs does this task need" in text and "plots/curves.png" in text
    assert (root / "plots" / "curves.png").exists()
