"""``diff_zoos`` / ``lora-zoo diff``: every kind of difference is found, named, and measured."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.contrib.diff import diff_zoos
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraModule, LoraRecord
from lora_zoo.zoo.writer import ZooWriter
from tests.fixtures.zoos import make_zoo

Edit = Callable[[str, LoraRecord, dict[str, Any], dict[str, Any]], Any]


def clone(
    src: Path,
    dst: Path,
    edit: Edit | None = None,
    *,
    drop: set[str] = frozenset(),
    split_of: dict[str, str] | None = None,
) -> Path:
    """Copy zoo ``src`` row by row through ZooWriter, letting ``edit`` change a row."""
    zoo = load_zoo(src)
    meta_cols, label_cols = zoo["train"].metadata_columns, zoo["train"].label_columns
    w = ZooWriter(dst, shard_max_rows=5)
    for s in zoo.splits:
        for i, lid in enumerate(zoo[s].ids):
            if lid in drop:
                continue
            row = zoo[s].row(i)
            rec = zoo[s].record(i)
            meta = {c: row[c] for c in meta_cols}
            labels = {c: row[c] for c in label_cols}
            if edit is not None:
                rec = edit(lid, rec, meta, labels) or rec
            w.add(
                rec,
                lora_id=lid,
                split=(split_of or {}).get(lid, s),
                metadata=meta,
                labels=labels,
                base_model=row["base_model"],
                collection=row["collection"],
            )
    w.set_info(**zoo.info)
    w.close()
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_zoo(
        tmp_path_factory.mktemp("diff") / "a", n=8, splits={"train": 0.75, "test": 0.25}
    )


def test_identical_copy_is_equal(base, tmp_path, capsys):
    b = clone(base, tmp_path / "b")
    rep = diff_zoos(base, b)
    assert rep.equal and rep.compared == 8 and rep.max_abs_weights == 0.0
    assert main(["diff", str(base), str(b)]) == 0
    assert "no differences" in capsys.readouterr().out


def test_weight_perturbation_named_per_module_and_measured(base, tmp_path, capsys):
    target = "model.layers.1.self_attn.v_proj"

    def edit(lid, rec, meta, labels):
        if lid == "lora-00003":
            m = rec.modules[target]
            a = m.A.clone()
            a[0, 5] += 3e-4
            mods = dict(rec.modules)
            mods[target] = LoraModule(a, m.B, m.alpha, m.scale, m.fan_in_fan_out)
            return LoraRecord(mods, rec.config, rec.lora_id)

    b = clone(base, tmp_path / "b", edit)
    rep = diff_zoos(base, b)
    assert [(d.lora_id, d.where) for d in rep.differences] == [("lora-00003", f"weights:{target}")]
    assert rep.differences[0].max_abs == pytest.approx(3e-4, rel=1e-3)
    assert rep.max_abs_weights == pytest.approx(3e-4, rel=1e-3)
    assert diff_zoos(base, b, atol=1e-3).equal
    assert main(["diff", str(base), str(b)]) == 1
    out = capsys.readouterr().out
    assert "lora-00003: weights:model.layers.1.self_attn.v_proj: A max" in out
    assert main(["diff", str(base), str(b), "--atol", "1e-3"]) == 0


def test_labels_use_tolerance_metadata_does_not(base, tmp_path):
    def edit(lid, rec, meta, labels):
        if lid == "lora-00001":
            labels["eval_loss"] += 1e-7
            meta["lr"] *= 1 + 1e-9

    b = clone(base, tmp_path / "b", edit)
    rep = diff_zoos(base, b, atol=1e-6)
    assert [(d.lora_id, d.where) for d in rep.differences] == [("lora-00001", "lr")]
    assert rep.max_abs_labels == pytest.approx(1e-7, rel=1e-3)
    rep0 = diff_zoos(base, b)
    assert {d.where for d in rep0.differences} == {"lr", "eval_loss"}


def test_missing_ids_subset_and_split_moves(base, tmp_path):
    b = clone(
        base, tmp_path / "b", drop={"lora-00000", "lora-00007"}, split_of={"lora-00006": "train"}
    )
    rep = diff_zoos(base, b)
    got = {(d.lora_id, d.where) for d in rep.differences}
    assert ("lora-00000", "ids") in got and ("lora-00007", "ids") in got
    assert ("lora-00006", "split") in got
    sub = diff_zoos(base, b, subset=True)
    assert [(d.lora_id, d.where) for d in sub.differences] == [("lora-00006", "split")]
    assert sub.compared == 6
    rev = diff_zoos(b, base, subset=True)  # B has ids A lacks: always a difference
    assert ("lora-00000", "ids") in {(d.lora_id, d.where) for d in rev.differences}


def test_dtype_and_column_differences(base, tmp_path):
    b = clone(base, tmp_path / "b", lambda lid, rec, m, lab: rec.to(torch.float16))
    rep = diff_zoos(base, b, atol=1e-2)
    assert rep.differences and all("dtype" in d.message for d in rep.differences)
    assert len({d.lora_id for d in rep.differences}) == 8

    def add_col(lid, rec, meta, labels):
        meta["extra"] = 1

    c = clone(base, tmp_path / "c", add_col)
    rep = diff_zoos(base, c)
    assert [(d.lora_id, d.where, d.message) for d in rep.differences] == [
        (None, "columns", "column 'extra' only in B")
    ]
    assert rep.to_dict()["equal"] is False
