"""Typing rules for metadata / label columns (lora_zoo.zoo.schema)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_zoo.errors import SchemaConflictError, ZooFormatError
from lora_zoo.zoo.card_min import configs_header
from lora_zoo.zoo.schema import (
    CORE_COLUMNS,
    build_schema,
    check_split_name,
    columns_json,
    flatten,
    infer_type,
    leaf_paths,
    list_of,
    schema_matches,
    shard_index,
    shard_name,
    to_plain,
    type_of,
    type_str,
    unify,
)


def test_core_columns_order_is_the_documented_one():
    assert CORE_COLUMNS == (
        "lora_id",
        "weights",
        "adapter_config",
        "base_model",
        "collection",
        "rank",
        "num_modules",
    )


def test_flatten_one_level_and_refuses_deeper():
    assert flatten({"a": 1, "loss": {"x": 1.0, "y": 2}}, what="labels", lora_id="l") == {
        "a": 1,
        "loss.x": 1.0,
        "loss.y": 2,
    }
    with pytest.raises(ZooFormatError, match="more than one level") as e:
        flatten({"loss": {"x": {"deep": 1}}}, what="labels", lora_id="l7")
    assert e.value.key == "loss.x" and "l7" in str(e.value)
    with pytest.raises(ZooFormatError, match="twice"):
        flatten({"a.b": 1, "a": {"b": 2}}, what="metadata", lora_id="l")


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, pa.bool_()),
        (3, pa.int64()),
        (3.5, pa.float64()),
        ("s", pa.string()),
        (b"x", pa.binary()),
        (None, pa.null()),
        ([1, 2], list_of(pa.int64())),
        ([1, 2.5], list_of(pa.float64())),
        ([], list_of(pa.null())),
        ([[1], [2, None]], list_of(list_of(pa.int64()))),
        (["a", None], list_of(pa.string())),
    ],
)
def test_infer_type(value, expected):
    assert infer_type(value).equals(expected)
    assert type_str(infer_type(value)) == type_str(expected)


def test_unify_rules():
    assert unify(pa.int64(), pa.float64()) == pa.float64()
    assert unify(pa.null(), pa.string()) == pa.string()
    assert unify(list_of(pa.null()), list_of(pa.int64())).equals(list_of(pa.int64()))
    assert unify(list_of(pa.int64()), list_of(pa.float64())).equals(list_of(pa.float64()))
    assert unify(pa.string(), pa.int64()) is None
    assert unify(pa.bool_(), pa.int64()) is None  # bools never silently become numbers
    assert unify(list_of(pa.string()), pa.string()) is None


def test_type_of_names_column_and_lora():
    with pytest.raises(SchemaConflictError, match="lora-3") as e:
        type_of({1, 2}, column="bad", lora_id="lora-3")
    assert e.value.key == "bad"
    with pytest.raises(SchemaConflictError):
        type_of(["a", 1], column="mixed", lora_id="x")  # string and int in one list


def test_to_plain_numpy_torch_tuples():
    assert to_plain(np.int32(4)) == 4 and isinstance(to_plain(np.int32(4)), int)
    assert to_plain(np.array([1, 2])) == [1, 2]
    assert to_plain(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    assert to_plain((1, (2, 3))) == [1, [2, 3]]
    assert infer_type(to_plain(np.float32(1.0))) == pa.float64()


def test_type_str_always_names_list_items_element():
    assert type_str(pa.list_(pa.int64())) == "list<element: int64>"
    assert type_str(pa.list_(pa.list_(pa.string()))) == "list<element: list<element: string>>"
    assert leaf_paths(pa.field("ids", list_of(list_of(pa.int64())))) == [
        "ids.list.element.list.element"
    ]


def test_build_schema_columns_json_and_matching():
    types = {"task": pa.string(), "acc": pa.float64()}
    roles = {"task": "metadata", "acc": "label"}
    s = build_schema(types, roles)
    assert s.names == [*CORE_COLUMNS, "task", "acc"]
    cols = columns_json(s, roles)
    assert cols[0] == {"name": "lora_id", "type": "string", "role": "core"}
    assert cols[-1] == {"name": "acc", "type": "double", "role": "label"}
    assert schema_matches(s, cols) is None
    bad = [dict(c) for c in cols]
    bad[-1]["type"] = "int64"
    assert "acc: double != int64" in schema_matches(s, bad)
    assert "differ" in schema_matches(s, cols[:-1])


def test_names():
    assert shard_name("train", 7) == "data/train-00007.parquet"
    assert shard_index("data/train-00007.parquet") == 7
    assert check_split_name("test_2") == "test_2"
    for bad in ("", "a-b", "a/b", "x y", "../x"):
        with pytest.raises(ZooFormatError, match="split name"):
            check_split_name(bad)


def test_configs_header_lists_explicit_files():
    m = {
        "splits": {
            "train": {"shards": [{"path": "data/train-00000.parquet"}]},
            "empty": {"shards": []},
        }
    }
    assert configs_header(m) == {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": ["data/train-00000.parquet"]}],
            }
        ]
    }


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)


@settings(deadline=None, max_examples=150)
@given(
    st.lists(st.one_of(_scalar, st.lists(st.integers(-5, 5), max_size=3)), min_size=1, max_size=6)
)
def test_unified_type_holds_every_value(values):
    """Property: when unification succeeds, pyarrow accepts all values under that type and
    returns them unchanged (ints widened to floats compare equal; ints beyond 2**53 would lose
    precision when a column widens to float, as documented in FORMAT.md)."""
    t = pa.null()
    for v in values:
        t = unify(t, infer_type(v)) if t is not None else None
    if t is None:
        return
    arr = pa.array(values, type=t)
    assert arr.to_pylist() == values
