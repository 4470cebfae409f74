"""croissant.json: every zoo carries a Croissant 1.0 description that mlcroissant validates and
reads records through (weights bytes, typed metadata and labels, splits)."""

from __future__ import annotations

import json
import logging

import pytest

from lora_zoo.load.source import load_zoo
from tests.fixtures.zoos import make_zoo

mlc = pytest.importorskip("mlcroissant")


def test_every_zoo_has_a_croissant_that_validates_and_reads_back(tmp_path, caplog):
    root = make_zoo(tmp_path / "tiny", n=6, splits={"train": 0.5, "test": 0.5})
    doc = json.loads((root / "croissant.json").read_text())
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.0"
    zoo = load_zoo(root)
    names = [f["name"] for f in doc["recordSet"][0]["field"]]
    assert names == ["split"] + [c["name"] for c in zoo.manifest["columns"]]
    with caplog.at_level(logging.WARNING):
        ds = mlc.Dataset(jsonld=str(root / "croissant.json"))  # raises on validation errors
    assert "not standard" not in caplog.text  # our @context is the spec's
    recs = list(ds.records("loras"))
    by_id = {r["loras/lora_id"].decode(): r for r in recs}
    assert len(recs) == len(zoo)
    for s in zoo.splits:
        for i, lid in enumerate(zoo[s].ids):
            r = by_id[lid]
            assert r["loras/split"].decode() == s
            assert r["loras/weights"] == zoo[s].weights_bytes(i)  # the safetensors bytes
            assert r["loras/rank"] == zoo[s].row(i)["rank"]
