"""The manifest and ``verify``; the format pinned exactly by the golden zoo
(tests/fixtures/golden/zoo, written by make_golden.py); the info / verify CLI."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from lora_zoo.cli import main
from lora_zoo.errors import ZooFormatError
from lora_zoo.load.source import load_zoo
from lora_zoo.zoo.manifest import MANIFEST_KEYS, SHARD_KEYS, SPLIT_KEYS, read_manifest, verify
from tests.fixtures.golden.make_golden import GOLDEN, GOLDEN_V1, golden_rows, write_golden
from tests.fixtures.zoos import make_zoo

GOLDEN_SCHEMA = """lora_id: string not null
weights: binary not null
adapter_config: string not null
base_model: string not null
collection: string not null
rank: int32 not null
num_modules: int32 not null
task: string
seed: int64
lr: double
example_ids: list<element: int64>
  child 0, element: int64
ok: bool
hp.dropout: double
hp.epochs: int64
acc: double
loss.arc: double"""

GOLDEN_COLUMNS = [
    ("lora_id", "string", "core"),
    ("weights", "binary", "core"),
    ("adapter_config", "string", "core"),
    ("base_model", "string", "core"),
    ("collection", "string", "core"),
    ("rank", "int32", "core"),
    ("num_modules", "int32", "core"),
    ("task", "string", "metadata"),
    ("seed", "int64", "metadata"),
    ("lr", "double", "metadata"),
    ("example_ids", "list<element: int64>", "metadata"),
    ("ok", "bool", "metadata"),
    ("hp.dropout", "double", "metadata"),
    ("hp.epochs", "int64", "metadata"),
    ("acc", "double", "label"),
    ("loss.arc", "double", "label"),
]


def test_golden_manifest_keys_and_columns_exactly():
    m = json.loads((GOLDEN / "lora_zoo.json").read_text())
    assert (
        tuple(m)
        == MANIFEST_KEYS
        == (
            "format_version",
            "lora_zoo_version",
            "num_rows",
            "splits",
            "columns",
            "named_splits",
            "parquet",
            "info",
        )
    )
    assert (
        m["parquet"]["write_page_index"] is True and "use_content_defined_chunking" in m["parquet"]
    )
    assert m["format_version"] == 2 and m["num_rows"] == 2
    assert list(m["splits"]) == ["train", "test"]
    for sp in m["splits"].values():
        assert tuple(sp) == SPLIT_KEYS == ("num_rows", "num_bytes", "shards")
        for sh in sp["shards"]:
            assert tuple(sh) == SHARD_KEYS == ("path", "num_rows", "num_bytes", "sha256")
    assert m["splits"]["test"]["shards"][0]["path"] == "data/test-00000.parquet"
    assert [(c["name"], c["type"], c["role"]) for c in m["columns"]] == GOLDEN_COLUMNS
    assert m["info"] == {"builder": "golden", "note": "format v2 golden zoo"}
    assert verify(GOLDEN) == []


def test_golden_shard_schema_and_values_exactly():
    schema = pq.read_schema(GOLDEN / "data" / "train-00000.parquet")
    assert schema.to_string(show_schema_metadata=False) == GOLDEN_SCHEMA
    assert json.loads(schema.metadata[b"lora_zoo"]) == {
        "format_version": 2,
        "roles": {
            "acc": "label",
            "example_ids": "metadata",
            "hp.dropout": "metadata",
            "hp.epochs": "metadata",
            "loss.arc": "label",
            "lr": "metadata",
            "ok": "metadata",
            "seed": "metadata",
            "task": "metadata",
        },
    }
    zoo = load_zoo(GOLDEN)
    row = zoo["test"].row(0)
    assert row == {
        "lora_id": "golden-1",
        "adapter_config": json.dumps(golden_rows()[1]["record"].config, sort_keys=True),
        "base_model": "golden-base",
        "collection": "golden",
        "rank": 1,
        "num_modules": 1,
        "task": "boolq",
        "seed": 1,
        "lr": 0.002,
        "example_ids": [],
        "ok": False,
        "hp.dropout": 0.0,
        "hp.epochs": 2,
        "acc": 1.0,
        "loss.arc": 0.5,
    }
    rec = zoo["test"].record(0)
    want = golden_rows()[1]["record"]
    ((name, m),) = want.modules.items()
    assert str(rec.modules[name].A.dtype) == "torch.float16"
    assert (
        rec.modules[name].A.tolist() == m.A.tolist() and rec.modules[name].scale == 2.0
    )  # alpha 2 / r 1


def test_format_1_zoos_still_read_exactly(tmp_path):
    """v1 -> v2 only changed which metadata columns builders emit (hp.* / seed.* once): a v1
    zoo opens, verifies and decodes to the same rows and weights as the v2 golden zoo."""
    v1, v2 = load_zoo(GOLDEN_V1), load_zoo(GOLDEN)
    assert v1.manifest["format_version"] == 1 and verify(GOLDEN_V1) == []
    assert v1.manifest["columns"] == v2.manifest["columns"] and "parquet" not in v1.manifest
    for s in ("train", "test"):
        # same rows; v2 bytes have the canonical (sorted) safetensors header, same tensors
        assert (
            v1[s].table().drop_columns(["weights"]).equals(v2[s].table().drop_columns(["weights"]))
        )
        for i in range(len(v1[s])):
            a, b = v1[s].record(i), v2[s].record(i)
            assert a.modules.keys() == b.modules.keys() and a.config == b.config
            for name in a.modules:
                assert torch.equal(a.modules[name].A, b.modules[name].A)
                assert torch.equal(a.modules[name].B, b.modules[name].B)


def test_todays_writer_reproduces_the_golden_format(tmp_path):
    m = write_golden(tmp_path / "g")
    golden = json.loads((GOLDEN / "lora_zoo.json").read_text())
    assert m["columns"] == golden["columns"] and list(m) == list(golden)
    for s in ("train", "test"):
        new = pq.read_table(tmp_path / "g" / m["splits"][s]["shards"][0]["path"])
        old = pq.read_table(GOLDEN / golden["splits"][s]["shards"][0]["path"])
        assert new.schema.equals(old.schema, check_metadata=True)
        assert new.drop_columns(["weights"]).equals(old.drop_columns(["weights"]))
    readme = (tmp_path / "g" / "README.md").read_text()
    assert readme.startswith("---\ntags:\n- lora-zoo\n- lora\nconfigs:\n- config_name: default\n")


@pytest.fixture
def zoo(tmp_path):
    return make_zoo(tmp_path / "z", n=8, shard_max_rows=3)


def test_verify_names_each_problem(zoo):
    assert verify(zoo) == []
    (zoo / "data" / "train-00002.parquet").unlink()
    (zoo / "data" / "stray.parquet").write_bytes(b"x")
    (zoo / "data" / ".train-00009.parquet.123.tmp").write_bytes(b"half")
    blob = bytearray((zoo / "data" / "train-00000.parquet").read_bytes())
    blob[300] ^= 1
    (zoo / "data" / "train-00000.parquet").write_bytes(bytes(blob))
    problems = verify(zoo)
    text = "\n".join(problems)
    assert "data/train-00000.parquet: sha256" in text
    assert "data/train-00002.parquet: shard listed in the manifest is missing" in text
    assert "data/stray.parquet: unknown file" in text
    assert "data/.train-00009.parquet.123.tmp: leftover temp file" in text
    assert "train-00001" not in text  # the intact shard is not blamed


def test_verify_row_counts_schema_and_readme(zoo):
    m = json.loads((zoo / "lora_zoo.json").read_text())
    m["splits"]["train"]["shards"][1]["num_rows"] = 2
    m["columns"][-1]["type"] = "int64"
    (zoo / "lora_zoo.json").write_text(json.dumps(m))
    text = "\n".join(verify(zoo, hashes=False))
    assert "data/train-00001.parquet: 3 rows != manifest num_rows 2" in text
    assert "eval_loss_by_group.beta: double != int64" in text
    assert "splits.train.num_rows 8 != 7" in text
    (zoo / "README.md").write_text("# no header\n")
    assert "README.md: no YAML header" in "\n".join(verify(zoo))


def test_verify_duplicate_ids_across_shards(zoo):
    shutil.copy(zoo / "data" / "train-00000.parquet", zoo / "data" / "train-00001.parquet")
    m = json.loads((zoo / "lora_zoo.json").read_text())
    sh0, sh1 = m["splits"]["train"]["shards"][:2]
    sh1.update(sha256=sh0["sha256"], num_bytes=sh0["num_bytes"])
    (zoo / "lora_zoo.json").write_text(json.dumps(m))
    assert any("duplicate lora_id 'lora-00000'" in p for p in verify(zoo))


def test_manifest_validation_names_keys(tmp_path):
    (tmp_path / "lora_zoo.json").write_text(json.dumps({"format_version": 1, "columns": []}))
    with pytest.raises(ZooFormatError) as e:
        read_manifest(*_fs(tmp_path))
    assert e.value.key == "splits"
    bad = {
        "format_version": 1,
        "columns": [],
        "splits": {
            "train": {
                "shards": [
                    {"path": "../../etc/passwd", "num_rows": 1, "num_bytes": 1, "sha256": "0"}
                ]
            }
        },
    }
    (tmp_path / "lora_zoo.json").write_text(json.dumps(bad))
    with pytest.raises(ZooFormatError, match="unsafe path") as e:
        read_manifest(*_fs(tmp_path))
    assert e.value.key == "splits.train.shards.0.path"


def _fs(path):
    import fsspec

    return fsspec.filesystem("file"), str(path)


def test_cli_info_and_verify(zoo, capsys):
    assert main(["info", str(zoo)]) == 0
    out = capsys.readouterr().out
    assert "8 LoRAs" in out and "train_example_ids" in out and "list<element: int64>" in out
    assert "ranks: {'2': 4, '4': 4}" in out and "weight dtype: F32" in out
    assert "modules (4)" in out and "info keys: builder, n, seed" in out
    assert main(["info", str(zoo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["shards"] == 3
    assert main(["verify", str(zoo)]) == 0 and "OK" in capsys.readouterr().out
    (zoo / "data" / "train-00001.parquet").write_bytes(b"garbage")
    assert main(["verify", str(zoo)]) == 1
    out = capsys.readouterr().out
    assert "data/train-00001.parquet" in out and "problem" in out


@pytest.mark.parametrize(
    "header, key",
    [
        ("configs: just-a-string", "'configs'"),
        ("- a\n- b", "'configs'"),  # the whole header a list
        ("configs: [default]", "'configs'"),
        ("configs: [{config_name: default, data_files: 7}]", "'configs.data_files'"),
        ("configs: [{data_files: [{split: train, path: {a: 1}}]}]", "'configs.data_files.path'"),
    ],
)
def test_verify_names_a_hostile_readme_header_instead_of_crashing(zoo, header, key):
    """The card is text from strangers: any YAML shape gives a problem line naming the key."""
    (zoo / "README.md").write_text(f"---\n{header}\n---\n# card\n")
    problems = "\n".join(verify(zoo, hashes=False))
    assert f"README.md: YAML header key {key}" in problems
