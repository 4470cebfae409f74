"""runner.py with the real toy builder: state log, atomic results, NaN failures, retries,
shards + pack, status, refusals, and what the packed zoo stores."""

from __future__ import annotations

import json

import pytest
import yaml

from lora_zoo.build.runner import (
    WorkDir,
    build,
    chunks,
    pack,
    parse_shard,
    rebuild_from_zoo,
    shard_chunks,
    status,
    work_dir_for,
)
from lora_zoo.errors import BuildError
from lora_zoo.load.source import load_zoo
from lora_zoo.record import canonical_safetensors
from tests.fixtures.toy_builder import register, toy_recipe, zoo_snapshot


@pytest.fixture(autouse=True)
def _toy():
    register()


def _recipe(tmp_path, name="toy.yaml", **changes):
    p = tmp_path / name
    p.write_text(toy_recipe(**changes))
    return p


def _events(out):
    return [json.loads(x) for x in (out / ".build" / "state.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_zoo(tmp_path_factory):
    register()
    d = tmp_path_factory.mktemp("clean")
    p = d / "toy.yaml"
    p.write_text(toy_recipe(num_loras=7))
    res = build(p, d / "zoo", progress=False)
    assert res.counts == {"done": 7, "failed": 0, "pending": 0}
    return d / "zoo", zoo_snapshot(d / "zoo")


def test_build_layout_state_and_zoo_contents(clean_zoo):
    out, snap = clean_zoo
    wd = out / ".build"
    for f in ("recipe.yaml", "recipe.orig.yaml", "jobs.jsonl", "build.json", "state.jsonl"):
        assert (wd / f).is_file(), f
    assert sorted(p.name for p in (wd / "loras").iterdir()) == sorted(
        [f"{i:06d}.safetensors" for i in range(7)] + [f"{i:06d}.json" for i in range(7)]
    )
    assert not list(wd.rglob("*.tmp"))  # atomic writes leave no temp files
    evs = _events(out)
    assert [e["state"] for e in evs if e["i"] == 0] == ["running", "done"]
    assert all(e["attempts"] == 1 for e in evs)
    meta = json.loads((wd / "build.json").read_text())
    assert meta["k"] == 2 and meta["indices"] == list(range(7)) and meta["shard"] is None
    assert meta["builder"]["name"] == "toy_linear" and meta["builder"]["VERSION"] == "1"
    # the zoo
    zoo = load_zoo(out)
    assert sorted(zoo["train"].ids + zoo["test"].ids) == [f"toy-{i:03d}" for i in range(7)]
    info = zoo.info
    assert yaml.safe_load(info["recipe"])["num_loras"] == 7  # the text as given
    assert info["recipe_resolved"]["num_loras"] == 7
    assert [j["lora_id"] for j in info["jobs"]] == [f"toy-{i:03d}" for i in range(7)]
    assert info["build"]["num_done"] == 7 and info["build"]["failed"] == []
    prov = info["provenance"]
    assert set(prov["timing"]["wall_time_s"]) == {f"toy-{i:03d}" for i in range(7)}
    assert all(v > 0 for v in prov["timing"]["wall_time_s"].values())
    assert prov["environment"]["libraries"]["torch"]
    assert prov["builder"]["source_sha256"] == meta["builder"]["source_sha256"]
    # rows: builder metadata + resolved job + scores as labels
    row = zoo["train"].row("toy-000")
    job0 = info["jobs"][0]
    assert row["hp.lr"] == job0["hparams"]["lr"]
    assert row["seed.init"] == job0["seeds"]["init"]
    assert row["groups_excluded"] == ["a"] and len(row["train_example_ids"]) == 20
    assert row["batch"] == ["toy-000", "toy-001"]
    assert "eval_loss.a" in zoo["train"].label_columns
    # weights: the packed record equals what the builder wrote, byte for byte
    raw = (wd / "loras" / "000000.safetensors").read_bytes()
    assert zoo["train"].weights_bytes("toy-000") == raw
    rec = zoo["train"].record("toy-000")
    assert rec.modules["proj"].A.shape == (2, 8) and rec.modules["proj"].B.shape == (6, 2)
    # group split on groups_excluded: a group's LoRAs sit in one split
    for s in ("train", "test"):
        others = {g for i in range(len(zoo[s])) for g in zoo[s].row(i)["groups_excluded"]}
        assert others.isdisjoint(
            {
                g
                for t in ({"train", "test"} - {s})
                for i in range(len(zoo[t]))
                for g in zoo[t].row(i)["groups_excluded"]
            }
        )
    assert (out / "recipe.yaml").is_file() and (out / "jobs.jsonl").is_file()


def test_rerun_finished_build_trains_nothing(tmp_path, clean_zoo):
    _, snap = clean_zoo
    p = _recipe(tmp_path, num_loras=7)
    build(p, tmp_path / "z", progress=False)
    n = len(_events(tmp_path / "z"))
    res = build(p, tmp_path / "z", progress=False)
    assert res.counts["done"] == 7 and len(_events(tmp_path / "z")) == n
    assert zoo_snapshot(tmp_path / "z") == snap


def test_nan_loss_recorded_failed_with_step_not_packed(tmp_path):
    p = _recipe(tmp_path, num_loras=4, vary={"lr": {"kind": "cycle", "values": [0.05, 1.0e30]}})
    res = build(p, tmp_path / "z", progress=False)
    assert res.counts == {"done": 2, "failed": 2, "pending": 0}
    assert [f["lora_id"] for f in res.failed] == ["toy-001", "toy-003"]
    for f in res.failed:
        assert isinstance(f["failed_step"], int) and f["failed_step"] >= 1
        assert "loss is" in f["reason"] and ("nan" in f["reason"] or "inf" in f["reason"])
    zoo = load_zoo(tmp_path / "z")
    ids = [i for s in zoo.splits for i in zoo[s].ids]
    assert sorted(ids) == ["toy-000", "toy-002"]
    failed = zoo.info["build"]["failed"]
    assert [(f["lora_id"], f["failed_step"]) for f in failed] == [
        (f["lora_id"], f["failed_step"]) for f in res.failed
    ]
    st = status(tmp_path / "z")[0]
    assert st["counts"] == {"pending": 0, "running": 0, "done": 2, "failed": 2}
    assert st["failed"][0]["attempts"] == 1
    # a diverged job is final: not retried on re-run, even with retry_failed
    n = len(_events(tmp_path / "z"))
    build(p, tmp_path / "z", progress=False, retry_failed=True)
    assert len(_events(tmp_path / "z")) == n


def test_exception_retried_then_identical(tmp_path, clean_zoo):
    _, snap = clean_zoo
    marker = tmp_path / "marker"
    p = _recipe(tmp_path, num_loras=7, builder_args={"fail_first_call_marker": str(marker)})
    res = build(p, tmp_path / "z", progress=False)
    assert marker.exists() and res.counts["done"] == 7
    evs = _events(tmp_path / "z")
    first = [e for e in evs if e["i"] == 0]
    assert [e["state"] for e in first] == ["running", "failed", "running", "done"]
    assert "RuntimeError: transient failure" in first[1]["reason"]
    assert first[-1]["attempts"] == 2
    # rows and weights equal a build that never failed (builder_args differ: not the info)
    got = zoo_snapshot(tmp_path / "z")
    for s in ("train", "test"):
        assert got[s] == snap[s]


def test_exhausted_attempts_then_retry_failed(tmp_path):
    marker = tmp_path / "marker"
    p = _recipe(tmp_path, num_loras=3, builder_args={"fail_first_call_marker": str(marker)})
    res = build(p, tmp_path / "z", progress=False, max_attempts=1)
    # only the first chunk's call failed; the builder object is shared, so chunk 2 worked
    assert res.counts == {"done": 1, "failed": 2, "pending": 0}
    assert all("transient failure" in f["reason"] for f in res.failed)
    assert res.failed[0]["failed_step"] is None
    st = status(tmp_path / "z")[0]
    assert st["counts"]["failed"] == 2 and st["failed"][0]["attempts"] == 1
    # plain re-run: attempts used up, stays failed
    res = build(p, tmp_path / "z", progress=False, max_attempts=1)
    assert res.counts["failed"] == 2
    res = build(p, tmp_path / "z", progress=False, max_attempts=1, retry_failed=True)
    assert res.counts == {"done": 3, "failed": 0, "pending": 0}
    with pytest.raises(BuildError, match="max_attempts must be >= 1"):
        build(p, tmp_path / "y", progress=False, max_attempts=0)


def test_shards_then_pack_equal_single_build(tmp_path, clean_zoo):
    _, snap = clean_zoo
    p = _recipe(tmp_path, num_loras=7)
    out = tmp_path / "sharded"
    for i in range(3):
        res = build(p, out, shard=(i, 3), progress=False)
        assert res.zoo is None  # a shard never packs
    assert sorted(d.name for d in out.glob(".build*")) == [
        ".build-shard-0-of-3",
        ".build-shard-1-of-3",
        ".build-shard-2-of-3",
    ]
    # whole chunks of k=2: shard 0 holds chunks 0 and 3 = jobs 0, 1, 6
    m0 = json.loads((out / ".build-shard-0-of-3" / "build.json").read_text())
    assert m0["indices"] == [0, 1, 6] and m0["all_indices"] == list(range(7))
    st = status(out)
    assert [s["shard"] for s in st] == [[0, 3], [1, 3], [2, 3]]
    assert sum(s["counts"]["done"] for s in st) == 7
    # a missing shard is refused, unless partial is asked for
    with pytest.raises(BuildError, match="a shard is missing"):
        pack([out / ".build-shard-0-of-3", out / ".build-shard-1-of-3"], tmp_path / "bad")
    pack([out / ".build-shard-0-of-3"], tmp_path / "part", allow_partial=True, progress=False)
    assert len(load_zoo(tmp_path / "part")["train"]) + len(load_zoo(tmp_path / "part")["test"]) == 3
    pack([out], tmp_path / "merged", progress=False)
    got = zoo_snapshot(tmp_path / "merged")
    assert got == snap
    assert load_zoo(tmp_path / "merged").info["build"]["shards"] == [[0, 3], [1, 3], [2, 3]]
    # packing the same shard twice is harmless (identical weights)
    pack([out, out / ".build-shard-1-of-3"], tmp_path / "merged2", progress=False)
    assert zoo_snapshot(tmp_path / "merged2") == snap
    with pytest.raises(Exception, match="already"):
        pack([out], tmp_path / "merged", progress=False)  # no silent overwrite


def test_pack_refusals(tmp_path):
    a = _recipe(tmp_path, "a.yaml", num_loras=2)
    b = _recipe(tmp_path, "b.yaml", num_loras=2, seed=8)
    build(a, tmp_path / "a", progress=False, pack_zoo=False)
    build(b, tmp_path / "b", progress=False, pack_zoo=False)
    assert not (tmp_path / "a" / "lora_zoo.json").exists()
    with pytest.raises(BuildError, match="different recipes"):
        pack([tmp_path / "a", tmp_path / "b"], tmp_path / "x")
    with pytest.raises(BuildError, match="no build work dir"):
        pack([tmp_path], tmp_path / "x")
    # same recipe, different k
    build(a, tmp_path / "k1", progress=False, pack_zoo=False, k=1)
    with pytest.raises(BuildError, match="different k"):
        pack([tmp_path / "a", tmp_path / "k1"], tmp_path / "x")
    # a build with open jobs
    c = _recipe(tmp_path, "c.yaml", num_loras=4)
    build(c, tmp_path / "c", progress=False, pack_zoo=False)
    wd = work_dir_for(tmp_path / "c")
    (wd / "loras" / "000001.json").unlink()
    with pytest.raises(BuildError, match=r"1 job\(s\) not finished \(e.g. toy-001\)"):
        pack([wd], tmp_path / "x")
    assert status(wd)[0]["counts"] == {"pending": 1, "running": 0, "done": 3, "failed": 0}
    pack([wd], tmp_path / "x", allow_partial=True, progress=False)
    zoo = load_zoo(tmp_path / "x")
    assert sorted(i for s in zoo.splits for i in zoo[s].ids) == ["toy-000", "toy-002", "toy-003"]


def test_work_dir_identity_checks(tmp_path):
    p = _recipe(tmp_path, num_loras=2)
    build(p, tmp_path / "z", progress=False)
    q = _recipe(tmp_path, "other.yaml", num_loras=3)
    with pytest.raises(BuildError, match="recipe_sha256 differs") as ei:
        build(q, tmp_path / "z", progress=False)
    assert ei.value.file.endswith("build.json")
    with pytest.raises(BuildError, match="k differs"):
        build(p, tmp_path / "z", progress=False, k=1)
    with pytest.raises(BuildError, match="indices differs"):
        build(p, tmp_path / "z", progress=False, limit=1)
    # a builder VERSION bump is refused
    bj = tmp_path / "z" / ".build" / "build.json"
    meta = json.loads(bj.read_text())
    meta["builder"]["VERSION"] = "0"
    bj.write_text(json.dumps(meta))
    with pytest.raises(BuildError, match="builder VERSION 0, installed is 1"):
        build(p, tmp_path / "z", progress=False)


def test_corrupt_or_torn_results_are_retrained(tmp_path, clean_zoo):
    _, snap = clean_zoo
    p = _recipe(tmp_path, num_loras=7)
    out = tmp_path / "z"
    build(p, out, progress=False, pack_zoo=False)
    wd = WorkDir(out / ".build")
    loras = out / ".build" / "loras"
    # weights that do not match the sha in their json; a torn json; a missing safetensors
    raw = bytearray((loras / "000002.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (loras / "000002.safetensors").write_bytes(bytes(raw))
    (loras / "000004.json").write_text('{"index": 4, "wei')
    (loras / "000006.safetensors").unlink()
    with open(out / ".build" / "state.jsonl", "a") as f:
        f.write('{"i": 5, "state": "fai')  # torn last line: ignored
    assert wd.read_result(2) is None and wd.read_result(4) is None and wd.read_result(6) is None
    assert wd.replay()[5].state == "done"
    res = build(p, out, progress=False)
    assert res.counts["done"] == 7
    assert zoo_snapshot(out) == snap


def test_rebuild_from_zoo_reproduces_weights(tmp_path, clean_zoo):
    zoo_dir, snap = clean_zoo
    # toy-003 shares its batched pass with toy-002, toy-006 is alone in the last chunk (k=2)
    res = rebuild_from_zoo(
        zoo_dir, tmp_path / "re", only_ids=["toy-003", "toy-006"], progress=False
    )
    assert res.counts == {"done": 2, "failed": 0, "pending": 0}
    z = load_zoo(tmp_path / "re")
    orig = load_zoo(zoo_dir)
    for lid in ("toy-003", "toy-006"):
        so = next(s for s in orig.splits if lid in orig[s].ids)
        assert lid in z[so].ids  # the original split, not one recomputed over 2 LoRAs
        assert z[so].weights_bytes(lid) == orig[so].weights_bytes(lid)
        assert z[so].row(lid) == orig[so].row(lid)  # incl. its batch neighbours
    assert z[next(s for s in z.splits if "toy-003" in z[s].ids)].row("toy-003")["batch"] == [
        "toy-002",
        "toy-003",
    ]
    assert sum(len(z[s]) for s in z.splits) == 2
    assert orig.info["build"]["k"] == 2
    with pytest.raises(BuildError, match="VERSION 0, installed is 1"):
        from lora_zoo.build.runner import build_from_recipe_text

        build_from_recipe_text(
            yaml.safe_dump(orig.info["recipe_resolved"]),
            tmp_path / "v",
            builder_version="0",
            progress=False,
        )


def test_rebuild_keeps_a_k_override(tmp_path):
    p = _recipe(tmp_path, num_loras=4)
    build(p, tmp_path / "z", progress=False, k=3)
    orig = load_zoo(tmp_path / "z")
    assert orig.info["build"]["k"] == 3
    rebuild_from_zoo(tmp_path / "z", tmp_path / "re", only_ids=["toy-001"], progress=False)
    z = load_zoo(tmp_path / "re")
    s = next(s for s in z.splits if "toy-001" in z[s].ids)
    assert z[s].row("toy-001")["batch"] == ["toy-000", "toy-001", "toy-002"]
    assert json.loads((tmp_path / "re" / ".build" / "build.json").read_text())["k"] == 3


def test_builder_contract_violations(tmp_path, monkeypatch):
    from tests.fixtures.toy_builder import ToyLinearBuilder

    p = _recipe(tmp_path, num_loras=2)
    monkeypatch.setattr(ToyLinearBuilder, "train", lambda self, jobs: [])
    with pytest.raises(BuildError, match="returned 0 results for 2 jobs"):
        build(p, tmp_path / "a", progress=False)
    orig = ToyLinearBuilder._train_one
    monkeypatch.setattr(
        ToyLinearBuilder, "train", lambda self, jobs: [orig(self, j) for j in reversed(jobs)]
    )
    with pytest.raises(BuildError, match="in the place of toy-000"):
        build(p, tmp_path / "b", progress=False)


def test_helpers():
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "a/b", "3", "1/0"):
        with pytest.raises(BuildError, match="--shard must be I/N"):
            parse_shard(bad)
    from lora_zoo.build.api import JobSpec

    jobs = [JobSpec(index=i, lora_id=str(i), seeds={}, hparams={}) for i in range(7)]
    assert [[j.index for j in c] for c in chunks(jobs, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [[j.index for j in c] for c in shard_chunks(jobs, 2, (1, 2))] == [[2, 3], [6]]
    # canonical_safetensors: header keys sorted, data untouched, still loadable
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    t = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    raw = st_save(t, metadata={"z": "1", "a": "2"})
    can = canonical_safetensors(raw)
    n = int.from_bytes(can[:8], "little")
    header = json.loads(can[8 : 8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == ["a", "z"]
    assert n % 8 == 0
    back = st_load(can)
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    assert canonical_safetensors(can) == can


def test_result_files_without_done_line_are_recovered_not_retrained(tmp_path):
    """A kill between the result's rename and the ``done`` append: the files count."""
    p = _recipe(tmp_path, num_loras=4)
    out = tmp_path / "z"
    build(p, out, progress=False, pack_zoo=False)
    log_path = out / ".build" / "state.jsonl"
    kept = [e for e in _events(out) if not (e["state"] == "done" and e["i"] in (1, 2))]
    log_path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    assert status(out)[0]["counts"]["done"] == 4  # status trusts complete files
    res = build(p, out, progress=False)
    assert res.counts["done"] == 4
    new = _events(out)[len(kept) :]
    assert sorted(e["i"] for e in new) == [1, 2]
    assert all(e["state"] == "done" and e["recovered"] for e in new)  # nothing re-ran
