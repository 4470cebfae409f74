"""The view cache (``lora_zoo.load.cache``): cached views are the computed views, byte for byte;
a stale, incomplete or tampered cache is never used; a killed build resumes; the cache is never
published; ``lora-zoo views`` builds it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lora_zoo.errors import CorruptFileError, IntegrityError, SelectionError
from lora_zoo.load import cache
from lora_zoo.load.datasets import LoraDataset, LoraIterableDataset
from lora_zoo.load.source import load_zoo
from lora_zoo.record import LoraModule, LoraRecord
from lora_zoo.remote.push import local_files
from lora_zoo.zoo.writer import ZooWriter

SHAPES = {"layers.0.q": (24, 16), "layers.0.v": (8, 16), "layers.1.q": (24, 16)}


def _record(i: int, rank: int, dtype: torch.dtype) -> LoraRecord:
    g = torch.Generator().manual_seed(100 + i)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank + i % 3}
    mods = {}
    for name, (n_out, n_in) in SHAPES.items():
        a = torch.randn(rank, n_in, generator=g).to(dtype)
        b = torch.randn(n_out, rank, generator=g).to(dtype)
        mods[name] = LoraModule(a, b, cfg["lora_alpha"], cfg["lora_alpha"] / rank)
    return LoraRecord(mods, cfg, f"lora-{i:03d}")


def _zoo(root: Path, ranks: list[int], dtype: torch.dtype = torch.bfloat16, shard_rows: int = 5):
    """Mixed ranks (several headers per part: several groups), two splits, several shards."""
    with ZooWriter(root, shard_max_rows=shard_rows, row_group_max_rows=3) as w:
        for i, r in enumerate(ranks):
            rec = _record(i, r, dtype)
            split = "test" if i % 4 == 3 else "train"
            w.add(rec, lora_id=rec.lora_id, labels={"score": 0.5 * i}, split=split)
    return load_zoo(root)


RANKS = [4, 2, 4, 4, 2, 3, 4, 4, 2, 4, 4, 3, 4, 2]


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def zoo(request, tmp_path):
    return _zoo(tmp_path / "zoo", RANKS, request.param)


def _assert_same_batch(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert got["lora_id"] == want["lora_id"] and got["module_info"] == want["module_info"]
    assert torch.equal(got["index"], want["index"])
    assert list(got["modules"]) == list(want["modules"])
    for name, mod in want["modules"].items():
        assert got["modules"][name].keys() == mod.keys()
        for k, t in mod.items():
            g = got["modules"][name][k]
            # exact: the cache stores what the datasets compute (same dtype, shape, bits)
            assert g.dtype == t.dtype and g.shape == t.shape and torch.equal(g, t), (name, k)
    for c, t in want["labels"].items():
        assert torch.equal(got["labels"][c], t)


def _assert_same_item(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got["lora_id"] == want["lora_id"]
    assert got["index"] == want["index"] and got["labels"] == want["labels"]
    assert list(got["modules"]) == list(want["modules"])
    for name, mod in want["modules"].items():
        assert got["modules"][name].keys() == mod.keys()
        for k, t in mod.items():
            g = got["modules"][name][k]
            same = torch.equal(g, t) and g.dtype == t.dtype if torch.is_tensor(t) else g == t
            assert same, (name, k)


@pytest.mark.parametrize("view", ["svals", "canonical"])
def test_cached_views_are_the_computed_bytes(zoo, view):
    cache.build_view_cache(zoo, view, progress=False, chunk=4)
    vc = cache.open_view_cache(zoo, view)
    assert vc is not None
    for split in zoo.splits:
        for bs in (64, 3, 4):  # one batch (several rank groups); batches across shards
            ds = LoraIterableDataset(zoo[split], view, batch_size=bs, labels=["score"])
            want = list(ds)
            for stream in (False, True):  # parts read whole, or batch by batch
                got = list(cache.iter_cached_batches(vc, split, bs, ["score"], stream=stream))
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    _assert_same_batch(g, w)
        cached = LoraDataset(zoo[split], view, labels=["score"], modules="layers.0.*")
        computed = LoraDataset(
            zoo[split], view, labels=["score"], modules="layers.0.*", cache=False
        )
        assert cached._vcache is not None and computed._vcache is None
        for i in range(len(computed)):
            _assert_same_item(cached[i], computed[i])


def test_cache_lives_beside_the_zoo_and_is_not_published(zoo):
    folder = cache.build_view_cache(zoo, "svals", progress=False)
    assert folder.parent == Path(zoo.root) / ".cache" / "views"
    assert folder.name.startswith("svals-v1-") and (folder / cache.MANIFEST).is_file()
    assert not [f for f in local_files(zoo.root) if ".cache" in f]
    assert zoo.verify() == []  # the zoo itself is untouched


def test_other_zoo_content_is_a_different_key(tmp_path):
    a = _zoo(tmp_path / "a", RANKS)
    cache.build_view_cache(a, "svals", progress=False)
    with ZooWriter(tmp_path / "a", mode="append") as w:  # new content: new shard, new hash
        rec = _record(99, 4, torch.bfloat16)
        w.add(rec, lora_id=rec.lora_id, labels={"score": 1.0})
    b = load_zoo(tmp_path / "a")
    assert cache.zoo_content_hash(b) != cache.zoo_content_hash(a)
    assert cache.open_view_cache(b, "svals") is None  # the old folder is not this content's
    assert LoraDataset(b["train"], "svals")._vcache is None
    with pytest.raises(SelectionError, match="no view cache"):
        LoraDataset(b["train"], "svals", cache="require")


def _edit_manifest(folder: Path, **changes) -> None:
    man = json.loads((folder / cache.MANIFEST).read_text())
    man.update(changes)
    (folder / cache.MANIFEST).write_text(json.dumps(man))


@pytest.mark.parametrize(
    "change,key",
    [
        ({"view_version": 0}, "view_version"),
        ({"torch": "0.0"}, "torch"),
        ({"zoo_hash": "0" * 64}, "zoo_hash"),
        ({"complete": False}, "complete"),
    ],
)
def test_stale_or_incomplete_cache_is_refused_and_computed_instead(zoo, change, key, caplog):
    folder = cache.build_view_cache(zoo, "svals", progress=False)
    _edit_manifest(folder, **change)
    with pytest.raises(IntegrityError) as e:
        cache.open_view_cache(zoo, "svals")
    assert e.value.key == key and e.value.file == str(folder / cache.MANIFEST)
    with caplog.at_level(logging.WARNING, logger="lora_zoo.load.cache"):
        ds = LoraDataset(zoo["train"], "svals")
    assert ds._vcache is None and "not used" in caplog.text and key in caplog.text
    with pytest.raises(IntegrityError):
        LoraDataset(zoo["train"], "svals", cache="require")


def test_tampered_part_is_refused(zoo):
    folder = cache.build_view_cache(zoo, "canonical", progress=False)
    part = folder / cache.part_name("train", 0)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1  # one bit inside the views column
    part.write_bytes(bytes(data))
    vc = cache.open_view_cache(zoo, "canonical")
    with pytest.raises(IntegrityError) as e:
        vc.table("train")
    assert e.value.file == str(part) and e.value.key == "sha256"
    assert LoraDataset(zoo["train"], "canonical")._vcache is not None  # opened lazily ...
    with pytest.raises(IntegrityError):
        LoraDataset(zoo["train"], "canonical")[0]  # ... and refused at the first read


def test_malformed_cells_are_named_errors(zoo):
    """A cell that is valid safetensors but not a view cell (a forged part whose hash was also
    forged) fails as a named error naming the cache, never as an index error or wrong data."""
    import pyarrow as pa
    from safetensors.torch import save

    bad = save({"layers.0.q::U": torch.zeros(3, 3)}, metadata={cache.META: "{}"})
    with pytest.raises(CorruptFileError, match="unexpected tensor"):
        cache.decode_cells(pa.array([bad], pa.binary()), "cache-part")
    meta = json.dumps({"layers.0.q": {"features": [24, 16], "rank": 4}})
    bad = save({"layers.0.q::U": torch.zeros(3, 4)}, metadata={cache.META: meta})
    with pytest.raises(CorruptFileError, match="shape"):
        cache.decode_cells(pa.array([bad], pa.binary()), "cache-part")
    with pytest.raises(CorruptFileError):
        cache.decode_cells(pa.array([b"\x00" * 4], pa.binary()), "cache-part")


def test_killed_build_resumes_at_the_missing_part(zoo, monkeypatch):
    calls = []
    real = cache._encode_rows

    def dying(split, view, a, b, where):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed inside the third shard
        calls.append((split.name, a))
        return real(split, view, a, b, where)

    monkeypatch.setattr(cache, "_encode_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.build_view_cache(zoo, "svals", progress=False)
    folder = cache.cache_folder(zoo, "svals")
    done = json.loads((folder / cache.MANIFEST).read_text())
    assert done["complete"] is False and len(done["parts"]) == 2
    with pytest.raises(IntegrityError, match="incomplete"):
        cache.open_view_cache(zoo, "svals")
    first = {n: (folder / n).stat().st_mtime_ns for n in done["parts"]}
    calls.clear()
    monkeypatch.setattr(cache, "_encode_rows", real)
    cache.build_view_cache(zoo, "svals", progress=False)
    man = json.loads((folder / cache.MANIFEST).read_text())
    n_shards = sum(len(sp["shards"]) for sp in zoo.manifest["splits"].values())
    assert man["complete"] is True and len(man["parts"]) == n_shards > 2
    assert {n: (folder / n).stat().st_mtime_ns for n in first} == first  # kept, not redone
    assert cache.open_view_cache(zoo, "svals") is not None


def test_datasets_settings_that_cannot_use_the_cache(zoo):
    cache.build_view_cache(zoo, "svals", progress=False)
    assert LoraDataset(zoo["train"], "svals")._vcache is not None
    assert LoraDataset(zoo["train"], "svals", dtype=torch.float32)._vcache is None
    assert LoraDataset(zoo["train"], "svals", fold_scale=False)._vcache is None
    assert LoraDataset(zoo["train"], "factors")._vcache is None
    with pytest.raises(SelectionError, match="dtype"):
        LoraDataset(zoo["train"], "svals", dtype=torch.float32, cache="require")


def test_cli_views_builds_and_reports(zoo, capsys):
    from lora_zoo.cli import main

    assert main(["views", zoo.root, "--cache", "canonical,svals"]) == 0
    out = capsys.readouterr().out
    assert "canonical: cached, verified" in out and "svals: cached, verified" in out
    assert main(["views", zoo.root, "--cache", "dense"]) == 1
    assert "not a cacheable view" in capsys.readouterr().err
    _edit_manifest(cache.cache_folder(zoo, "svals"), view_version=0)
    assert main(["views", zoo.root]) == 1
    assert "svals: not usable" in capsys.readouterr().out


@pytest.mark.parametrize("view", ["svals", "canonical"])
def test_bench_in_memory_path_reads_the_cache(zoo, view, monkeypatch):
    from lora_zoo.lol import bench

    want = bench.load_view(zoo["train"], view, ["score"], torch.device("cpu"))  # computed
    cache.build_view_cache(zoo, view, progress=False)
    got = bench.load_view(zoo["train"], view, ["score"], torch.device("cpu"))
    _assert_same_batch(got, want)
    # it came from the cache: with the zoo's weights unreadable it still loads
    monkeypatch.setattr(
        type(zoo["train"]), "read_rows", lambda *a, **k: pytest.fail("weights were read")
    )
    _assert_same_batch(bench.load_view(zoo["train"], view, ["score"], None), want)


def test_part_changed_after_a_verified_open_is_hashed_again(zoo):
    """The per-process hash memo is keyed on the file's identity: a part replaced (new inode)
    or rewritten (new mtime) after one verified open is hashed again and refused."""
    import os

    folder = cache.build_view_cache(zoo, "svals", progress=False)
    cache.open_view_cache(zoo, "svals").table("train")  # verified: remembered
    part = folder / cache.part_name("train", 0)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    forged = part.with_name("forged.tmp")
    forged.write_bytes(bytes(data))
    os.replace(forged, part)  # a new inode under the old name
    with pytest.raises(IntegrityError, match="modified"):
        cache.open_view_cache(zoo, "svals").table("train")
    data[len(data) // 2] ^= 1  # the good bytes again (verified, remembered) ...
    part.write_bytes(bytes(data))
    cache.open_view_cache(zoo, "svals").table("train")
    st = part.stat()
    data[len(data) // 2] ^= 1  # ... then rewritten in place, same size, a later mtime
    part.write_bytes(bytes(data))
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(IntegrityError, match="modified"):
        cache.open_view_cache(zoo, "svals").table("train")


def test_dataset_from_a_path_pickles_and_reopens_the_cache(zoo):
    import pickle

    cache.build_view_cache(zoo, "svals", progress=False)
    ds = LoraDataset(zoo.root, "svals", split="train", labels=["score"])
    assert ds._vcache is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert clone._vcache is None
    _assert_same_item(
        clone[3], LoraDataset(zoo.root, "svals", split="train", labels=["score"], cache=False)[3]
    )
    assert clone._vcache is not None  # reopened (and verified) at the first item


def test_dora_magnitudes_are_cached_beside_the_view(tmp_path):
    """A DoRA module's magnitude M goes beside whatever the view gives (as in the datasets);
    the cache stores it too, with the same bytes."""
    g = torch.Generator().manual_seed(7)
    with ZooWriter(tmp_path / "dora") as w:
        for i, r in enumerate([4, 2, 4]):
            rec = _record(i, r, torch.float32)
            mods = {
                n: LoraModule(
                    m.A, m.B, m.alpha, m.scale, magnitude=torch.rand(m.out_features, generator=g)
                )
                for n, m in rec.modules.items()
            }
            w.add(
                LoraRecord(mods, {**rec.config, "use_dora": True}, rec.lora_id), lora_id=rec.lora_id
            )
    zoo = load_zoo(tmp_path / "dora")
    cache.build_view_cache(zoo, "canonical", progress=False)
    want = next(iter(LoraIterableDataset(zoo["train"], "canonical", batch_size=8)))
    assert "M" in next(iter(want["modules"].values()))
    got = next(cache.iter_cached_batches(cache.open_view_cache(zoo, "canonical"), "train", 8))
    _assert_same_batch(got, want)


def test_writing_into_an_item_does_not_change_the_cache(zoo):
    cache.build_view_cache(zoo, "canonical", progress=False)
    ds = LoraDataset(zoo["train"], "canonical")
    name = next(iter(ds[0]["modules"]))
    before = ds[0]["modules"][name]["U"].clone()
    ds[0]["modules"][name]["U"].zero_()  # a caller's in-place op on what it was handed
    assert torch.equal(ds[0]["modules"][name]["U"], before)
