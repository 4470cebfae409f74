"""load_zoo / Zoo / ZooSplit against a slow obvious reference (pyarrow.read_table of each shard
listed in the manifest), on local disk and on an fsspec in-memory filesystem."""

from __future__ import annotations

import json
import random

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lora_zoo.errors import IntegrityError, SelectionError, ZooFormatError
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraRecord
from lora_zoo.zoo.reader import Zoo, ZooSplit
from tests.fixtures.zoos import make_zoo


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return make_zoo(
        tmp_path_factory.mktemp("r") / "zoo",
        n=23,
        ranks=(1, 2, 4),
        dtype=torch.bfloat16,
        splits={"train": 0.7, "test": 0.3},
        shard_max_rows=4,
    )


def reference_table(root, split) -> pa.Table:
    """Slow obvious reference: every listed shard read whole, concatenated in manifest order."""
    m = json.loads((root / "lora_zoo.json").read_text())
    return pa.concat_tables(
        [pq.read_table(root / sh["path"]) for sh in m["splits"][split]["shards"]]
    )


def test_zoo_api(zoo_dir):
    zoo = load_zoo(zoo_dir)
    assert isinstance(zoo, Zoo) and zoo.splits == ["train", "test"] and len(zoo) == 23
    assert zoo.info["n"] == 23 and zoo.named_splits == {}
    assert "train" in zoo and "valid" not in zoo
    s = zoo["train"]
    assert isinstance(s, ZooSplit) and len(s) == 16 and len(s.shard_paths) == 4
    assert s.label_columns == ["eval_loss", "eval_loss_by_group.alpha", "eval_loss_by_group.beta"]
    assert "train_example_ids" in s.metadata_columns and "lora_id" not in s.metadata_columns
    assert load_zoo(zoo_dir, split="test").ids == [f"lora-{i:05d}" for i in range(16, 23)]
    with pytest.raises(SelectionError, match="no split 'valid'"):
        zoo["valid"]
    with pytest.raises(SelectionError, match="nope"):
        s.table(["lora_id", "nope"])
    with pytest.raises(ZooFormatError, match="revision"):
        load_zoo(zoo_dir, revision="main")


@pytest.mark.parametrize("split", ["train", "test"])
def test_random_access_matches_reference(zoo_dir, split):
    s = load_zoo(zoo_dir)[split]
    ref = reference_table(zoo_dir, split).to_pylist()
    assert s.ids == [r["lora_id"] for r in ref]
    assert s.table().equals(reference_table(zoo_dir, split))
    order = list(range(len(s))) + [-1]
    random.Random(0).shuffle(order)
    for i in order:
        r = ref[i]
        assert s.weights_bytes(i) == r["weights"]
        assert s.row(i) == {k: v for k, v in r.items() if k != "weights"}
        rec = s.record(r["lora_id"])
        want = LoraRecord.from_safetensors_bytes(r["weights"])
        for name, m in want.modules.items():
            assert rec.modules[name].A.dtype == torch.bfloat16  # stored dtype, never upcast
            assert torch.equal(rec.modules[name].A, m.A) and torch.equal(rec.modules[name].B, m.B)
            assert rec.modules[name].scale == m.scale
        assert rec.lora_id == r["lora_id"] and rec.config == json.loads(r["adapter_config"])
    with pytest.raises(IndexError):
        s.row(len(s))
    with pytest.raises(SelectionError, match="lora-99999"):
        s.record("lora-99999")


def test_iter_batches_and_pandas(zoo_dir):
    s = load_zoo(zoo_dir)["train"]
    batches = list(s.iter_batches(["lora_id", "eval_loss"], batch_size=3))
    assert all(b.num_rows <= 3 for b in batches)
    assert pa.Table.from_batches(batches).equals(
        reference_table(zoo_dir, "train").select(["lora_id", "eval_loss"])
    )
    df = s.to_pandas()
    assert "weights" not in df.columns and list(df["lora_id"]) == s.ids
    assert "weights" in s.to_pandas(include_weights=True).columns
    recs = list(s)
    assert [r.lora_id for r in recs] == s.ids and recs[3].ranks == s.record(3).ranks


def test_zoo_on_an_fsspec_filesystem(zoo_dir):
    """What the remotes engineer relies on: any fsspec fs + root works (here: memory://)."""
    mem = fsspec.filesystem("memory")
    for p in zoo_dir.rglob("*"):
        if p.is_file():
            mem.pipe(f"/zoo/{p.relative_to(zoo_dir).as_posix()}", p.read_bytes())
    zoo = Zoo(mem, "/zoo", source="memory://zoo")
    assert not zoo.is_local and zoo.verify() == []
    s = zoo["test"]
    assert s.table().equals(reference_table(zoo_dir, "test"))
    assert s.weights_bytes(2) == load_zoo(zoo_dir)["test"].weights_bytes(2)
    assert zoo.schema.equals(pq.read_schema(next((zoo_dir / "data").iterdir())))


def test_verify_flag_and_integrity(tmp_path):
    root = make_zoo(tmp_path / "z", n=6, shard_max_rows=3)
    assert load_zoo(root, verify=True).splits == ["train"]
    shard = root / "data" / "train-00001.parquet"
    blob = bytearray(shard.read_bytes())
    blob[200] ^= 0xFF  # a flipped bit inside the weights
    shard.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="train-00001.parquet: sha256"):
        load_zoo(root, verify=True)


def test_row_count_mismatch_is_an_integrity_error(tmp_path):
    root = make_zoo(tmp_path / "z", n=4, shard_max_rows=4)
    m = json.loads((root / "lora_zoo.json").read_text())
    m["splits"]["train"]["shards"][0]["num_rows"] = 5
    m["splits"]["train"]["num_rows"] = 5
    (root / "lora_zoo.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="num_rows"):
        _ = load_zoo(root)["train"].ids


def test_not_a_zoo(tmp_path):
    with pytest.raises(ZooFormatError, match="no lora_zoo.json"):
        load_zoo(tmp_path)
    (tmp_path / "lora_zoo.json").write_text("{not json")
    with pytest.raises(ZooFormatError, match="not valid JSON"):
        load_zoo(tmp_path)
    (tmp_path / "lora_zoo.json").write_text(
        json.dumps({"format_version": 99, "splits": {}, "columns": []})
    )
    with pytest.raises(ZooFormatError, match="format_version") as e:
        load_zoo(tmp_path)
    assert e.value.key == "format_version" and e.value.file.endswith("lora_zoo.json")


def test_streaming_flag_reads_lazily(zoo_dir):
    s = load_zoo(zoo_dir, streaming=True)["test"]
    assert s._files == {}  # nothing opened before the first read
    n = sum(b.num_rows for b in s.iter_batches(["lora_id"], batch_size=2))
    assert n == len(s) == 7


def test_row_group_ranges_and_read_rows_agree_with_the_table(tmp_path):
    """The public row-group API the streaming loaders use: ranges tile the split in order, and
    any [start, stop), across row groups and shards, reads what the whole table holds there."""
    root = make_zoo(tmp_path / "z", n=16, shard_max_rows=5)
    for f in (root / "data").glob("*.parquet"):  # several row groups per shard (sha not checked)
        pq.write_table(pq.read_table(f), f, row_group_size=2)
    sp = load_zoo(root)["train"]
    ranges = sp.row_group_ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sp)
    assert all(a < b for a, b in ranges) and all(
        b == c for (_, b), (c, _) in zip(ranges, ranges[1:])
    )
    assert len(ranges) > len(sp.shard_paths)  # several row groups per shard
    whole = sp.table(columns=["lora_id", "weights"])
    for a, b in [(0, len(sp)), (1, 4), (3, 12), (7, 7), (len(sp) - 1, len(sp))]:
        got = sp.read_rows(a, b, ["lora_id", "weights"])
        assert got.num_rows == b - a and got.equals(whole.slice(a, b - a))
    with pytest.raises(IndexError):
        sp.read_rows(3, len(sp) + 1)
