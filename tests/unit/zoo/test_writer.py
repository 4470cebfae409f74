"""ZooWriter: round trips with types, shard / row-group bounds, schema unification, append,
and the contract that the folder loads with plain ``datasets`` and plain PEFT."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from lora_zoo.errors import DuplicateIdError, SchemaConflictError, ZooFormatError
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.manifest import verify
from lora_zoo.zoo.writer import ZooWriter
from tests.fixtures.zoos import make_record, make_zoo


def _hlen(b: bytes) -> int:
    return int.from_bytes(b[:8], "little")


def _st_header(b: bytes) -> dict:
    return json.loads(b[8 : 8 + _hlen(b)])


def _shard_tables(root):
    m = json.loads((root / "lora_zoo.json").read_text())
    return {
        s: [pq.read_table(root / sh["path"]) for sh in sp["shards"]]
        for s, sp in m["splits"].items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_are_exact_safetensors_bytes_in_their_dtype(tmp_path, dtype):
    root = make_zoo(tmp_path / "z", n=6, dtype=dtype, shard_max_rows=4)
    split = load_zoo(root)["train"]
    for i in range(6):
        ref = make_record(i, (2, 4)[i % 2], dtype=dtype)
        got_b, ref_b = split.weights_bytes(i), ref.to_safetensors_bytes()
        # same header (as JSON: safetensors orders __metadata__ keys arbitrarily), same data
        assert _st_header(got_b) == _st_header(ref_b)
        assert got_b[8 + _hlen(got_b) :] == ref_b[8 + _hlen(ref_b) :]
        got = split.record(i)
        for name, m in ref.modules.items():
            assert got.modules[name].A.dtype == dtype
            assert torch.equal(got.modules[name].A, m.A) and torch.equal(got.modules[name].B, m.B)
    assert verify(root) == []


def test_metadata_and_labels_round_trip_with_types(tmp_path):
    root = make_zoo(tmp_path / "z", n=7)
    row = load_zoo(root)["train"].row("lora-00005")
    assert row["train_example_ids"] == [5, 6, 7]
    assert all(type(x) is int for x in row["train_example_ids"])
    assert row["seen_groups"] == ["beta", "gamma"] and row["is_even"] is False
    assert row["steps"] == 60 and type(row["steps"]) is int
    assert row["eval_loss_by_group.alpha"] == 5.0 and row["rank"] == 4
    assert row["num_modules"] == 4 and row["collection"] == "default"
    m = load_zoo(root).manifest
    roles = {c["name"]: c["role"] for c in m["columns"]}
    assert roles["eval_loss_by_group.beta"] == "label" and roles["group"] == "metadata"
    assert m["info"] == {"builder": "tests.fixtures.zoos.make_zoo", "seed": 0, "n": 7}


def test_datasets_load_dataset_gives_same_rows_without_lora_zoo(tmp_path):
    import datasets

    root = make_zoo(tmp_path / "z", n=10, splits={"train": 0.7, "test": 0.3}, shard_max_rows=3)
    ds = datasets.load_dataset(str(root))
    zoo = load_zoo(root)
    assert set(ds) == {"train", "test"}
    for s in ("train", "test"):
        ref = zoo[s].table().to_pylist()
        got = ds[s].to_list()
        assert got == ref
        assert isinstance(got[0]["weights"], bytes)
    assert ds["train"].features["train_example_ids"].feature.dtype == "int64"


@pytest.mark.slow
def test_weights_bytes_are_a_loadable_peft_adapter(tmp_path):
    from peft import PeftModel

    from tests.fixtures.models import tiny_llama

    root = make_zoo(tmp_path / "z", n=2)
    split = load_zoo(root)["train"]
    rec = split.record(1)
    adir = tmp_path / "adapter"
    adir.mkdir()
    (adir / "adapter_model.safetensors").write_bytes(split.weights_bytes(1))
    (adir / "adapter_config.json").write_text(split.row(1)["adapter_config"])
    base = tiny_llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(adir)).merge_and_unload()
    for name, m in rec.modules.items():
        delta = dict(merged.named_parameters())[f"{name}.weight"] - before[f"{name}.weight"]
        torch.testing.assert_close(delta, m.delta_w(), rtol=1e-4, atol=1e-6)


def test_shards_roll_by_rows_and_row_groups_by_bytes(tmp_path):
    recs = [make_record(i, 4) for i in range(9)]
    one = len(recs[0].to_safetensors_bytes())
    w = ZooWriter(tmp_path / "z", shard_max_rows=4, row_group_max_bytes=2 * one + 600)
    for r in recs:
        w.add(r, lora_id=r.lora_id)
    m = w.close()
    shards = m["splits"]["train"]["shards"]
    assert [s["num_rows"] for s in shards] == [4, 4, 1]
    for s in shards:
        md = pq.ParquetFile(tmp_path / "z" / s["path"]).metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        assert max(sizes) <= 2 and sum(sizes) == s["num_rows"]
        wcol = md.row_group(0).column(1)
        assert wcol.path_in_schema == "weights" and wcol.compression == "UNCOMPRESSED"
        assert not wcol.is_stats_set  # no blob copies in the footer


def test_shard_max_bytes(tmp_path):
    recs = [make_record(i, 4) for i in range(6)]
    one = len(recs[0].to_safetensors_bytes())
    w = ZooWriter(tmp_path / "z", shard_max_bytes=int(2.5 * one), row_group_max_rows=1)
    for r in recs:
        w.add(r, lora_id=r.lora_id)
    m = w.close()
    # each row counts its weights + a small overhead: 2 rows fit under 2.5x, 3 would not
    assert [s["num_rows"] for s in m["splits"]["train"]["shards"]] == [2, 2, 2]


def test_rows_are_partitioned_by_split_in_add_order(tmp_path):
    w = ZooWriter(tmp_path / "z", shard_max_rows=2)
    order = {"train": [], "test": [], "val_2": []}
    for i in range(9):
        s = ("train", "test", "val_2")[i % 3]
        order[s].append(f"id{i}")
        w.add(make_record(i, 2), lora_id=f"id{i}", split=s)
    w.close()
    zoo = load_zoo(tmp_path / "z")
    assert zoo.splits == ["train", "test", "val_2"]
    assert {s: zoo[s].ids for s in zoo.splits} == order
    assert sorted(os.listdir(tmp_path / "z" / "data"))[0] == "test-00000.parquet"


def test_schema_widening_across_shards_is_conformed(tmp_path):
    """int then float, a key that appears late, a null-typed key: every shard ends with the
    final schema, values are null-filled / widened, and datasets can load it."""
    import datasets

    w = ZooWriter(tmp_path / "z", shard_max_rows=2, row_group_max_rows=1)
    for i in range(6):
        meta = {"score": i if i < 3 else i + 0.5, "maybe": None if i < 4 else "x"}
        if i >= 2:
            meta["late"] = [i]
        w.add(make_record(i, 2), lora_id=f"l{i}", metadata=meta)
    m = w.close()
    tables = _shard_tables(tmp_path / "z")["train"]
    assert len({t.schema.to_string() for t in tables}) == 1
    types = {c["name"]: c["type"] for c in m["columns"]}
    assert types["score"] == "double" and types["late"] == "list<element: int64>"
    assert types["maybe"] == "string"
    rows = load_zoo(tmp_path / "z")["train"].table(["score", "late", "maybe"]).to_pylist()
    assert [r["score"] for r in rows] == [0.0, 1.0, 2.0, 3.5, 4.5, 5.5]
    assert [r["late"] for r in rows] == [None, None, [2], [3], [4], [5]]
    assert [r["maybe"] for r in rows] == [None] * 4 + ["x", "x"]
    assert verify(tmp_path / "z") == []
    assert datasets.load_dataset(str(tmp_path / "z"))["train"]["score"][0] == 0.0


def test_conflicting_types_duplicates_and_reserved_names_are_refused(tmp_path):
    w = ZooWriter(tmp_path / "z")
    w.add(make_record(0, 2), lora_id="a", metadata={"task": "arc"}, labels={"acc": 0.5})
    with pytest.raises(SchemaConflictError, match="'b'") as e:
        w.add(make_record(1, 2), lora_id="b", metadata={"task": 3})
    assert e.value.key == "task" and "string" in str(e.value)
    with pytest.raises(SchemaConflictError, match="label column"):
        w.add(make_record(1, 2), lora_id="b", metadata={"acc": 0.1})
    with pytest.raises(DuplicateIdError, match="'a'"):
        w.add(make_record(1, 2), lora_id="a")
    with pytest.raises(ZooFormatError, match="core column"):
        w.add(make_record(1, 2), lora_id="b", metadata={"rank": 3})
    with pytest.raises(ZooFormatError, match="split name"):
        w.add(make_record(1, 2), lora_id="b", split="train/x")
    # failed adds left no trace: "b" is still free and the schema unchanged
    w.add(make_record(1, 2), lora_id="b", metadata={"task": "boolq"})
    m = w.close()
    assert m["num_rows"] == 2
    assert {c["name"]: c["type"] for c in m["columns"]}["task"] == "string"


def test_invalid_record_is_refused(tmp_path):
    rec = make_record(0, 2)
    rec.config["r"] = 3  # factors have rank 2
    from lora_zoo.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError):
        ZooWriter(tmp_path / "z").add(rec, lora_id="x")


def test_create_refuses_existing_zoo_and_leftovers_overwrite_replaces(tmp_path):
    root = make_zoo(tmp_path / "z", n=3)
    with pytest.raises(ZooFormatError, match="already a zoo"):
        ZooWriter(root)
    (root / "lora_zoo.json").unlink()
    with pytest.raises(ZooFormatError, match="without a manifest"):
        ZooWriter(root)
    make_zoo(root, n=2, mode="overwrite")
    assert load_zoo(root)["train"].ids == ["lora-00000", "lora-00001"]
    assert verify(root) == []


def test_append_adds_shards_and_keeps_old_ones(tmp_path):
    root = make_zoo(tmp_path / "z", n=7, shard_max_rows=5)
    before = json.loads((root / "lora_zoo.json").read_text())
    w = ZooWriter(root, mode="append", shard_max_rows=5)
    with pytest.raises(DuplicateIdError, match="lora-00003"):
        w.add(make_record(3, 2), lora_id="lora-00003")
    for i in range(7, 10):
        rec = make_record(i, 2)
        w.add(rec, lora_id=rec.lora_id, metadata={"group": "omega", "steps": 1}, split="test")
    w.set_info(appended=True)
    m = w.close()
    assert m["splits"]["train"] == before["splits"]["train"]  # untouched shards, same hashes
    zoo = load_zoo(root)
    assert zoo["test"].ids == ["lora-00007", "lora-00008", "lora-00009"]
    assert zoo.info["appended"] is True and zoo.info["builder"].endswith("make_zoo")
    assert zoo["test"].row(0)["train_example_ids"] is None  # missing keys null-filled
    assert verify(root) == []


def test_append_with_schema_change_rewrites_old_shards_under_new_names(tmp_path):
    root = make_zoo(tmp_path / "z", n=4, shard_max_rows=5)
    w = ZooWriter(root, mode="append")
    w.add(make_record(9, 2), lora_id="new", metadata={"steps": 2.5, "extra": "yes"})
    m = w.close()
    paths = [s["path"] for s in m["splits"]["train"]["shards"]]
    # the new row went to shard 1; the old shard 0, widened, became shard 2 but keeps its place
    assert paths == ["data/train-00002.parquet", "data/train-00001.parquet"]
    assert sorted(os.listdir(root / "data")) == ["train-00001.parquet", "train-00002.parquet"]
    rows = load_zoo(root)["train"].table(["lora_id", "steps", "extra"]).to_pylist()
    assert [r["steps"] for r in rows] == [10.0, 20.0, 30.0, 40.0, 2.5]
    assert [r["extra"] for r in rows] == [None] * 4 + ["yes"]
    assert verify(root) == []


def test_context_manager_discards_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ZooWriter(tmp_path / "z", shard_max_rows=1) as w:
            for i in range(3):
                w.add(make_record(i, 2), lora_id=f"x{i}")
            raise RuntimeError("builder crashed")
    assert not (tmp_path / "z" / "lora_zoo.json").exists()
    assert not [p for p in os.listdir(tmp_path / "z" / "data") if p.endswith(".tmp")]
    assert verify(tmp_path / "z")[0].endswith("(the manifest is written last)")


def test_info_must_be_json(tmp_path):
    w = ZooWriter(tmp_path / "z")
    with pytest.raises(ZooFormatError) as e:
        w.set_info(bad={1, 2})
    assert e.value.key == "bad"


def test_empty_record_list_round_trip_of_metadata_numpy(tmp_path):
    import numpy as np

    w = ZooWriter(tmp_path / "z")
    w.add(
        make_record(0, 2),
        lora_id="n",
        metadata={"ids": np.arange(3), "t": torch.tensor(2.5), "empty": []},
    )
    w.add(make_record(1, 2), lora_id="m", metadata={"ids": [], "t": 1, "empty": [1.5]})
    w.close()
    rows = load_zoo(tmp_path / "z")["train"].table(["ids", "t", "empty"]).to_pylist()
    assert rows == [
        {"ids": [0, 1, 2], "t": 2.5, "empty": []},
        {"ids": [], "t": 1.0, "empty": [1.5]},
    ]
    assert isinstance(LoraRecord, type)


def test_overwrite_keeps_the_old_zoo_until_the_new_manifest_lands(tmp_path):
    """A replacing writer killed midway (here: shards written, never closed) leaves the old
    zoo complete: its manifest still points at its own, untouched shards."""
    root = make_zoo(tmp_path / "z", n=6, shard_max_rows=2)
    before = {p.name: p.read_bytes() for p in (root / "data").iterdir()}
    w = ZooWriter(root, mode="overwrite", shard_max_rows=2)
    for i in range(10, 16):
        rec = make_record(i, 2)
        w.add(rec, lora_id=rec.lora_id)  # full shards are renamed into data/ as they fill
    assert len(list((root / "data").glob("*.parquet"))) > len(before)  # new shards exist...
    del w  # ...and the process dies here
    problems = verify(root)  # every listed shard verifies; only the unlisted new ones are named
    assert problems and all("not listed in the manifest" in p for p in problems)
    assert not any(n in p for n in before for p in problems)
    zoo = load_zoo(root)
    assert zoo["train"].ids == [f"lora-{i:05d}" for i in range(6)]
    assert zoo["train"].record(5).lora_id == "lora-00005"
    assert all((root / "data" / n).read_bytes() == b for n, b in before.items())
    make_zoo(root, n=2, mode="overwrite")  # the next successful replace cleans them up
    assert verify(root) == []


def test_overwrite_keeps_named_splits_and_user_files(tmp_path):
    from lora_zoo.zoo.splits import make_named_split

    root = make_zoo(tmp_path / "z", n=6)
    make_named_split(load_zoo(root), "mine", "random", "train=0.5,test=0.5", seed=1)
    (root / "NOTES.md").write_text("my notes")
    split_file = (root / "splits" / "mine.json").read_bytes()
    make_zoo(root, n=6, mode="overwrite", seed=5)  # same ids, new weights
    zoo = load_zoo(root)
    assert "mine" in zoo.named_splits and verify(root) == []
    assert (root / "splits" / "mine.json").read_bytes() == split_file
    assert (root / "NOTES.md").read_text() == "my notes"
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(
        sh["path"].split("/")[1] for sp in zoo.manifest["splits"].values() for sh in sp["shards"]
    )  # the old shards are gone once the new manifest is in place
    make_zoo(root, n=3, mode="overwrite")  # LoRAs of the named split are gone now
    zoo = load_zoo(root)
    assert "mine" not in zoo.named_splits  # not served as if it still meant something...
    assert (root / "splits" / "mine.json").read_bytes() == split_file  # ...but never deleted
    assert verify(root) == []


class _Killed(BaseException):
    """Stands in for SIGKILL at one exact line (the kill test hits these windows by chance)."""


@pytest.mark.parametrize("where", ["before_manifest", "between_manifest_and_card"])
def test_kill_around_the_commit_point_keeps_card_and_manifest_in_step(tmp_path, monkeypatch, where):
    """README.md (configs) and croissant.json derive from the manifest, whose rename is the one
    commit point. Killed before it, the old zoo must agree with its old card; killed after it,
    the new card is staged and verify names it as an interrupted write; the next write fixes
    either. (CI once caught README.md listing an append's new shards beside the old manifest.)"""
    import lora_zoo.zoo.writer as writer_mod

    root = make_zoo(tmp_path / "z", n=5, shard_max_rows=2)
    old_ids = load_zoo(root)["train"].ids
    card_before = (root / "README.md").read_bytes()
    target = "write_manifest" if where == "before_manifest" else "commit_staged"

    def die(*a, **k):
        raise _Killed

    monkeypatch.setattr(writer_mod, target, die)
    w = ZooWriter(root, mode="append", shard_max_rows=2)
    for i in range(3):
        w.add(make_record(50 + i, 2), lora_id=f"new-{i}", metadata={"late": 0.5})
    with pytest.raises(_Killed):
        w.close()
    monkeypatch.undo()
    problems = verify(root)
    ids = load_zoo(root)["train"].ids
    if where == "before_manifest":
        assert ids == old_ids
        assert (root / "README.md").read_bytes() == card_before
        assert all("leftover temp file" in p or "not listed in the manifest" in p for p in problems)
        assert not any(p.startswith("README.md") for p in problems), problems
    else:
        assert ids == old_ids + ["new-0", "new-1", "new-2"]
        readme_problems = [p for p in problems if "README" in p]
        assert len(readme_problems) == 1 and "interrupted write" in readme_problems[0]
        assert "one write behind" in readme_problems[0]
    # the next write finishes the card whichever side of the commit the kill fell on
    w = ZooWriter(root, mode="append", shard_max_rows=2)
    w.add(make_record(99, 2), lora_id="after")
    w.close()
    # (an append leaves the killed write's unlisted shards for verify to name; overwrite or
    # `lora-zoo verify` tell the user, nothing here deletes a file it did not just write)
    assert all("not listed in the manifest" in p for p in verify(root)), verify(root)
    assert load_zoo(root)["train"].ids[-1] == "after"
    assert not list(root.glob(".*staged*"))


def test_a_readme_that_disagrees_on_its_own_is_not_excused_by_a_staged_card(tmp_path):
    """The staged-card message is only for a staged card that matches the manifest; a stale
    staged file beside a hostile README does not turn the mismatch into a leftover."""
    root = make_zoo(tmp_path / "z", n=4, shard_max_rows=2)
    good = (root / "README.md").read_text()
    (root / ".README.md.staged.tmp").write_text(good.replace("train-00000", "train-00009"))
    (root / "README.md").write_text(good.replace("train-00001", "train-00007"))
    problems = verify(root)
    assert any(p.startswith("README.md: configs data_files") for p in problems), problems
