"""Named splits: seeded random / group-aware assignment, storage in the zoo, views, CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_zoo.cli import main
from lora_zoo.errors import DuplicateIdError, SelectionError, ZooFormatError
from lora_zoo.load.source import load_zoo
from lora_zoo.zoo.manifest import verify
from lora_zoo.zoo.splits import (
    SplitView,
    group_keys,
    group_split,
    make_named_split,
    parse_fractions,
    random_split,
    save_named_split,
)
from tests.fixtures.zoos import make_zoo


def test_parse_fractions():
    assert parse_fractions("train=0.8, test=0.2") == {"train": 0.8, "test": 0.2}
    for bad, msg in [
        ("train=0.8", "sum to"),
        ("train", "name=fraction"),
        ("train=x,test=1", "name=fraction"),
        ("a-b=1", "split name"),
        ("train=1.5,test=-0.5", r"not in \[0, 1\]"),
        ("", "no fractions"),
    ]:
        with pytest.raises(ZooFormatError, match=msg):
            parse_fractions(bad)


def test_random_split_exact_counts_seeded_and_order_free():
    ids = [f"l{i}" for i in range(103)]
    a = random_split(ids, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=5)
    assert {k: len(v) for k, v in a.items()} == {
        "train": 83,
        "val": 10,
        "test": 10,
    }  # 82.4, 10.3, 10.3
    assert sorted(sum(a.values(), [])) == sorted(ids)
    assert random_split(list(reversed(ids)), {"train": 0.8, "val": 0.1, "test": 0.1}, 5) == a
    assert random_split(ids, {"train": 0.8, "val": 0.1, "test": 0.1}, 6) != a
    with pytest.raises(DuplicateIdError):
        random_split(["a", "a"], {"train": 1.0})


def test_group_keys_for_lists():
    vals = [["a", "b"], ["b", "a"], ["c"], ["b", "c"], ["d"], [], None, "x"]
    k = group_keys(vals, "set")
    assert k[0] == k[1] and k[0] != k[3] and k[5] == frozenset() and k[6] == ("value", None)
    c = group_keys(vals, "components")
    assert c[0] == c[1] == c[2] == c[3]  # a-b, b-c chain into one component
    assert c[4] != c[0] and c[5] == frozenset()
    with pytest.raises(ZooFormatError):
        group_keys(vals, "bogus")


@settings(deadline=None, max_examples=60)
@given(
    groups=st.lists(st.integers(0, 9), min_size=1, max_size=60),
    seed=st.integers(0, 2**31),
    f=st.floats(0.1, 0.9),
)
def test_group_split_never_puts_a_group_in_two_splits(groups, seed, f):
    ids = [f"l{i}" for i in range(len(groups))]
    a = group_split(ids, groups, {"train": f, "test": 1 - f}, seed)
    where = {}
    for s, members in a.items():
        for lid in members:
            g = groups[int(lid[1:])]
            assert where.setdefault(g, s) == s
    assert sorted(sum(a.values(), [])) == sorted(ids)
    assert group_split(ids, groups, {"train": f, "test": 1 - f}, seed) == a  # deterministic


def test_group_split_sizes_follow_fractions_with_many_groups():
    ids = [f"l{i}" for i in range(400)]
    a = group_split(ids, [i % 80 for i in range(400)], {"train": 0.75, "test": 0.25}, 1)
    assert {k: len(v) for k, v in a.items()} == {"train": 300, "test": 100}


def test_list_groups_components_keep_elements_apart():
    vals = [["a", "b"], ["b"], ["c"], ["c", "d"], ["e"], ["f"], ["e", "g"], ["h"]]
    ids = [f"l{i}" for i in range(len(vals))]
    a = group_split(ids, vals, {"train": 0.5, "test": 0.5}, 0, lists="components")
    elems = {s: {e for lid in m for e in vals[int(lid[1:])]} for s, m in a.items()}
    assert not elems["train"] & elems["test"]


@pytest.fixture
def zoo_dir(tmp_path):
    return make_zoo(tmp_path / "z", n=16, splits={"train": 0.75, "test": 0.25}, shard_max_rows=5)


def test_named_group_split_stored_and_viewed(zoo_dir):
    assign = make_named_split(
        load_zoo(zoo_dir), "by_group", "group", "train=0.5,test=0.5", seed=3, key="group"
    )
    zoo = load_zoo(zoo_dir)
    ns = zoo.named_splits["by_group"]
    assert ns["path"] == "splits/by_group.json" and ns["kind"] == "group"
    assert ns["key"] == "group" and ns["seed"] == 3 and ns["num_rows"] == {"train": 8, "test": 8}
    assert json.loads((zoo_dir / "splits" / "by_group.json").read_text()) == assign
    views = zoo.named_split("by_group")
    assert set(views) == {"train", "test"}
    groups = {s: {v.row(i)["group"] for i in range(len(v))} for s, v in views.items()}
    assert not groups["train"] & groups["test"]
    # a view agrees with a slow reference built from the physical splits
    full = pa.concat_tables([zoo[s].table() for s in zoo.splits])
    for s, v in views.items():
        assert isinstance(v, SplitView) and sorted(v.ids) == sorted(assign[s])
        ref = full.filter(pa.compute.is_in(full["lora_id"], pa.array(v.ids)))
        assert v.table().equals(ref)
        got = pa.Table.from_batches(list(v.iter_batches(["lora_id", "weights"], batch_size=3)))
        assert got.equals(ref.select(["lora_id", "weights"]))
        assert all(b.num_rows == 3 for b in list(v.iter_batches(["lora_id"], 3))[:-1])
        for i in (0, len(v) - 1):
            assert v.weights_bytes(i) == ref["weights"][i].as_py()
            assert v.record(v.ids[i]).lora_id == v.ids[i]
        assert v.label_columns == zoo["train"].label_columns
    assert verify(zoo_dir) == []


def test_named_split_errors(zoo_dir):
    with pytest.raises(SelectionError, match="not in the zoo"):
        save_named_split(load_zoo(zoo_dir), "bad", {"train": ["lora-00000", "ghost"]})
    with pytest.raises(DuplicateIdError, match="two splits"):
        save_named_split(
            load_zoo(zoo_dir), "bad", {"train": ["lora-00000"], "test": ["lora-00000"]}
        )
    with pytest.raises(ZooFormatError, match="named-split name"):
        save_named_split(load_zoo(zoo_dir), "../evil", {"train": ["lora-00000"]})
    with pytest.raises(SelectionError, match="--key"):
        make_named_split(load_zoo(zoo_dir), "g", "group", "train=1", key="nope")
    with pytest.raises(SelectionError, match="no named split 'missing'"):
        load_zoo(zoo_dir).named_split("missing")


def test_named_split_survives_append_and_verify_catches_tampering(zoo_dir):
    from lora_zoo.zoo.writer import ZooWriter
    from tests.fixtures.zoos import make_record

    make_named_split(load_zoo(zoo_dir), "rnd", "random", {"train": 0.5, "test": 0.5}, seed=1)
    w = ZooWriter(zoo_dir, mode="append")
    w.add(make_record(99, 2), lora_id="extra")
    w.close()
    assert "rnd" in load_zoo(zoo_dir).named_splits and verify(zoo_dir) == []
    path = zoo_dir / "splits" / "rnd.json"
    data = json.loads(path.read_text())
    data["test"].append(data["train"][0])
    path.write_text(json.dumps(data))
    text = "\n".join(verify(zoo_dir))
    assert "splits/rnd.json: sha256" in text and "is in two splits" in text


def test_cli_split(zoo_dir, capsys):
    rc = main(
        [
            "split",
            str(zoo_dir),
            "--name",
            "r",
            "--kind",
            "random",
            "--fractions",
            "train=0.75,test=0.25",
            "--seed",
            "7",
        ]
    )
    assert rc == 0 and "train=12, test=4" in capsys.readouterr().out
    assert load_zoo(zoo_dir).named_splits["r"]["fractions"] == {"train": 0.75, "test": 0.25}
    assert (
        main(
            [
                "split",
                str(zoo_dir),
                "--name",
                "g",
                "--kind",
                "group",
                "--key",
                "seen_groups",
                "--fractions",
                "train=0.5,test=0.5",
            ]
        )
        == 0
    )
    assert main(["split", str(zoo_dir), "--name", "x", "--fractions", "train=0.3"]) == 1
    assert "sum to" in capsys.readouterr().err
