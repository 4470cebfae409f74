"""fsspec remotes: push to / load from moto's S3 server through s3fs (real HTTP)."""

from __future__ import annotations

import pytest
import torch

from lora_zoo.errors import IntegrityError
from lora_zoo.load.source import load_zoo
from lora_zoo.remote.push import push
from tests.fixtures.s3 import s3  # noqa: F401  (fixture)
from tests.fixtures.zoos import make_record, make_zoo


def _s3fs(url: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, skip_instance_cache=True)


def _check_same(remote, local) -> None:
    assert remote.splits == local.splits
    for s in local.splits:
        assert remote[s].ids == local[s].ids
        for i in (0, len(local[s]) - 1):
            assert remote[s].row(i) == local[s].row(i)
            a, b = remote[s].record(i), local[s].record(i)
            for m in a.modules:
                assert torch.equal(a.modules[m].A, b.modules[m].A)
                assert torch.equal(a.modules[m].B, b.modules[m].B)


def test_push_load_stream_verify(s3, tmp_path):  # noqa: F811
    url, bucket = s3
    root = make_zoo(tmp_path / "z", n=10, splits={"train": 0.8, "test": 0.2}, shard_max_rows=3)
    target = f"s3://{bucket}/tiny"
    res = push(root, target, progress=False)
    assert res.uploaded[-1] == "lora_zoo.json"  # the manifest goes last
    local = load_zoo(root)
    pulled = load_zoo(target)
    assert pulled.is_local  # pulled into the cache, hashes checked
    _check_same(pulled, local)
    streamed = load_zoo(target, streaming=True)
    assert not streamed.is_local
    _check_same(streamed, local)
    assert streamed.verify() == []
    # an unchanged re-push sends only the manifest + small files, no shard
    again = push(root, target, progress=False)
    assert not [u for u in again.uploaded if u.startswith("data/")]


def test_append_replaces_manifest_and_drops_stale(s3, tmp_path):  # noqa: F811
    url, bucket = s3
    root = make_zoo(tmp_path / "z", n=6, shard_max_rows=4)
    target = f"s3://{bucket}/grow"
    push(root, target, progress=False)
    from lora_zoo.zoo.writer import ZooWriter

    w = ZooWriter(root, shard_max_rows=4, mode="append")
    for i in range(50, 53):
        w.add(
            make_record(i, 2),
            lora_id=f"new-{i}",
            base_model="tiny-llama",
            metadata={
                "group": "beta",
                "lr": 1e-4,
                "steps": 3,
                "train_example_ids": [0],
                "seen_groups": ["beta"],
                "is_even": False,
                "note": "added later",
            },
            labels={"eval_loss": 0.1, "eval_loss_by_group": {"alpha": 0.0, "beta": 1.0}},
        )
    w.close()  # "note" widens the schema: old shards are rewritten under new names
    res = push(root, target, progress=False)
    assert res.deleted  # superseded shards removed after the new manifest landed
    zoo = load_zoo(target, streaming=True)
    assert len(zoo) == 9 and zoo.verify() == []
    fs = _s3fs(url)
    remote_shards = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{bucket}/grow/data"))
    assert remote_shards == sorted(p.name for p in (root / "data").glob("*.parquet"))


def test_corruption_in_bucket_is_named(s3, tmp_path):  # noqa: F811
    url, bucket = s3
    root = make_zoo(tmp_path / "z", n=6, shard_max_rows=3)
    target = f"s3://{bucket}/bad"
    push(root, target, progress=False)
    fs = _s3fs(url)
    key = f"{bucket}/bad/data/train-00001.parquet"
    data = bytearray(fs.cat_file(key))
    data[50] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(IntegrityError, match="data/train-00001.parquet"):
        load_zoo(target)
    problems = load_zoo(target, streaming=True).verify()
    assert any(p.startswith("data/train-00001.parquet") for p in problems)
    fs.pipe_file(key, bytes(data[:-10]))  # truncated: the streaming size check catches it
    with pytest.raises(IntegrityError, match="train-00001.parquet"):
        load_zoo(target, streaming=True)


def test_file_url_is_read_in_place(tmp_path):
    root = make_zoo(tmp_path / "z", n=4)
    zoo = load_zoo(f"file://{root}")
    assert zoo.is_local and zoo.root == str(root)
    assert zoo["train"].ids == load_zoo(root)["train"].ids


def test_push_decides_already_there_by_hash_not_size(s3, tmp_path):  # noqa: F811
    """v1 pushed; an interrupted push of v2 (same shard names, same sizes) left v2 bytes under
    v1's manifest; re-pushing v1 must notice by sha256 and re-upload, so the bucket serves v1."""
    url, bucket = s3
    fs = _s3fs(url)
    v1 = make_zoo(tmp_path / "v1", n=6, splits={"train": 1.0}, seed=1)
    v2 = make_zoo(tmp_path / "v2", n=6, splits={"train": 1.0}, seed=2)
    shard = "data/train-00000.parquet"
    assert (v1 / shard).stat().st_size == (v2 / shard).stat().st_size  # the trap: equal sizes
    assert (v1 / shard).read_bytes() != (v2 / shard).read_bytes()
    target = f"s3://{bucket}/z"
    push(v1, target, progress=False)
    fs.pipe(f"{bucket}/z/{shard}", (v2 / shard).read_bytes())  # the interrupted push of v2
    res = push(v1, target, progress=False)
    assert shard in res.uploaded
    assert fs.cat(f"{bucket}/z/{shard}") == (v1 / shard).read_bytes()
    assert load_zoo(target, streaming=True).verify() == []
