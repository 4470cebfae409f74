"""Push / pull against the local Hub stand-in (tests/fixtures/hub_server.py) over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_zoo.errors import IntegrityError, RemoteError
from lora_zoo.load.source import load_zoo
from lora_zoo.remote.push import push
from tests.fixtures.hub_server import hub  # noqa: F401  (fixture)
from tests.fixtures.zoos import make_record, make_zoo

REPO = "tester/tiny-zoo"


@pytest.fixture
def zoo_dir(tmp_path):
    return make_zoo(tmp_path / "zoo", n=12, splits={"train": 0.75, "test": 0.25})


def _records_equal(a, b) -> None:
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        assert torch.equal(a.modules[name].A, b.modules[name].A)
        assert torch.equal(a.modules[name].B, b.modules[name].B)


def _same_zoo(remote, local) -> None:
    assert remote.splits == local.splits
    assert remote.manifest["splits"] == local.manifest["splits"]
    for s in local.splits:
        assert remote[s].ids == local[s].ids
        for i in range(len(local[s])):
            assert remote[s].row(i) == local[s].row(i)
            _records_equal(remote[s].record(i), local[s].record(i))


def test_push_then_load_roundtrip_and_cache(hub, zoo_dir):  # noqa: F811
    res = push(zoo_dir, REPO, progress=False)
    n_shards = sum(len(sp["shards"]) for sp in load_zoo(zoo_dir).manifest["splits"].values())
    assert hub.stats["commit"] == 1
    assert hub.stats["lfs_put"] == n_shards  # parquet shards go through the LFS batch API
    assert "lora_zoo.json" in res.uploaded and "README.md" in res.uploaded
    zoo = load_zoo(REPO)
    assert zoo.revision == res.commit and zoo.source == REPO
    _same_zoo(zoo, load_zoo(zoo_dir))
    assert zoo.verify() == []
    # same revision again: served from the verified cache, no shard downloaded twice
    before = hub.stats["resolve_bytes"]
    again = load_zoo(REPO, split="train")
    assert hub.stats["resolve_bytes"] - before < 20_000  # only the manifest
    assert again.ids == load_zoo(zoo_dir)["train"].ids
    # re-pushing an unchanged zoo makes no commit
    res2 = push(zoo_dir, REPO, progress=False)
    assert hub.stats["commit"] == 1 and res2.uploaded == []


def test_streaming_reads_only_what_it_needs(hub, tmp_path):  # noqa: F811
    root = make_zoo(tmp_path / "big", n=40, ranks=(8,), shard_max_rows=10)
    push(root, REPO, progress=False)
    total = sum(
        sh["num_bytes"] for sp in load_zoo(root).manifest["splits"].values() for sh in sp["shards"]
    )
    before = hub.stats["resolve_bytes"]
    zoo = load_zoo(f"hf://datasets/{REPO}", streaming=True)
    assert zoo.streaming and not zoo.is_local
    rec = zoo["train"].record(25)
    _records_equal(rec, load_zoo(root)["train"].record(25))
    assert hub.stats["resolve_bytes"] - before < total / 2
    assert not (Path(os.environ["LORA_ZOO_CACHE"]) / "hub").exists()


def test_interrupted_push_resumes_without_reuploading(hub, tmp_path):  # noqa: F811
    root = make_zoo(tmp_path / "z", n=20, shard_max_rows=2)  # 10 shards
    hub.state.fail_uploads_after = 4
    with pytest.raises(RemoteError, match="re-run"):
        push(root, REPO, progress=False, batch_files=3)
    assert hub.stats["lfs_put"] == 4 and hub.stats["commit"] == 0
    hub.state.fail_uploads_after = None
    push(root, REPO, progress=False, batch_files=3)
    assert hub.stats["lfs_put"] == 10  # 6 more: the first 4 blobs were not sent again
    assert hub.stats["commit"] == 1
    assert len(load_zoo(REPO)) == 20


def test_append_is_one_atomic_commit(hub, zoo_dir):  # noqa: F811
    first = push(zoo_dir, REPO, progress=False)
    from lora_zoo.zoo.writer import ZooWriter

    w = ZooWriter(zoo_dir, shard_max_rows=5, mode="append")
    for i in range(100, 104):
        rec = make_record(i, 4)
        w.add(
            rec,
            lora_id=f"extra-{i}",
            base_model="tiny-llama",
            metadata={
                "group": "alpha",
                "lr": 1e-4,
                "steps": 5,
                "train_example_ids": [1],
                "seen_groups": ["alpha"],
                "is_even": True,
            },
            labels={"eval_loss": 0.5, "eval_loss_by_group": {"alpha": 1.0, "beta": 2.0}},
        )
    w.close()
    puts, commits = hub.stats["lfs_put"], hub.stats["commit"]
    second = push(zoo_dir, REPO, progress=False)
    assert hub.stats["commit"] == commits + 1
    new_shards = [u for u in second.uploaded if u.startswith("data/")]
    assert new_shards == ["data/train-00002.parquet"]
    assert hub.stats["lfs_put"] - puts == 1
    assert set(second.uploaded) == {*new_shards, "lora_zoo.json", "README.md", "croissant.json"}
    assert len(load_zoo(REPO)) == 16
    assert len(load_zoo(REPO, revision=first.commit)) == 12  # the old version stays readable
    with pytest.raises(RemoteError):
        load_zoo(REPO, revision="no-such-branch")


def test_corrupted_shard_is_named_on_pull_and_verify(hub, zoo_dir):  # noqa: F811
    push(zoo_dir, REPO, progress=False)
    sh = load_zoo(zoo_dir).manifest["splits"]["test"]["shards"][0]
    hub.corrupt_lfs(sh["sha256"])
    with pytest.raises(IntegrityError, match=sh["path"]):
        load_zoo(REPO)
    problems = load_zoo(REPO, streaming=True).verify()
    assert any(p.startswith(sh["path"]) and "sha256" in p for p in problems)
    from lora_zoo.cli import main
    from lora_zoo.remote.pull import verify_source

    assert verify_source(f"hf://datasets/{REPO}") == problems
    assert main(["verify", REPO]) == 1
    assert verify_source("tester/nothing-here")[0].startswith("tester/nothing-here")


def test_branch_and_pull_request(hub, zoo_dir, tmp_path):  # noqa: F811
    push(zoo_dir, REPO, progress=False)
    small = make_zoo(tmp_path / "small", n=4)
    push(small, REPO, revision="dev", progress=False)
    assert len(load_zoo(REPO, revision="dev")) == 4
    assert len(load_zoo(REPO)) == 12
    pr = push(small, REPO, create_pr=True, progress=False)
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1")
    assert len(load_zoo(REPO, revision="refs/pr/1")) == 4
    assert len(load_zoo(REPO)) == 12  # main untouched by the PR


def test_cli_push_pull_info(hub, zoo_dir, tmp_path, capsys):  # noqa: F811
    from lora_zoo.cli import main

    assert main(["push", str(zoo_dir), REPO, "--no-progress", "--private", "--card"]) == 0
    assert hub.state.repos[("dataset", REPO)].private
    card = (zoo_dir / "README.md").read_text()
    assert f'load_zoo("{REPO}")' in card and (zoo_dir / "plots" / "spectra.png").exists()
    assert main(["verify", REPO]) == 0
    dest = tmp_path / "pulled"
    assert main(["pull", REPO, str(dest), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    _same_zoo(load_zoo(dest), load_zoo(zoo_dir))
    assert main(["info", REPO, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_rows"] == 12
    assert main(["pull", "tester/missing-zoo", str(tmp_path / "x"), "--no-progress"]) == 1


def test_refuses_to_push_a_broken_zoo(hub, zoo_dir):  # noqa: F811
    shard = next((zoo_dir / "data").glob("train-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=shard.name):
        push(zoo_dir, REPO, progress=False)
    assert hub.stats["commit"] == 0


@pytest.mark.slow
def test_plain_datasets_load_dataset_from_the_stand_in(hub, zoo_dir, tmp_path):  # noqa: F811
    """``datasets.load_dataset(REPO)`` in a fresh process (no lora_zoo import) sees the rows."""
    push(zoo_dir, REPO, progress=False)
    script = textwrap.dedent(
        f"""
        import json, sys
        import datasets
        ds = datasets.load_dataset({REPO!r})
        out = {{s: {{"ids": list(ds[s]["lora_id"]), "loss": list(ds[s]["eval_loss"]),
                    "w0": len(ds[s][0]["weights"])}} for s in ds}}
        assert "lora_zoo" not in sys.modules
        print(json.dumps(out))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds"),
    }
    r = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    local = load_zoo(zoo_dir)
    for s in local.splits:
        assert got[s]["ids"] == local[s].ids
        assert got[s]["loss"] == local[s].table(["eval_loss"]).column(0).to_pylist()
        assert got[s]["w0"] == len(local[s].weights_bytes(0))


def test_row_group_limit_and_source_parsing(hub, zoo_dir, monkeypatch):  # noqa: F811
    import lora_zoo.remote.push as hubmod
    from lora_zoo.remote.address import parse_source

    monkeypatch.setattr(hubmod, "MAX_ROW_GROUP_BYTES", 1000)
    with pytest.raises(RemoteError, match=r"data/\w+-00000\.parquet: row_group_max_bytes"):
        push(zoo_dir, REPO, progress=False)
    assert hub.stats["commit"] == 0
    monkeypatch.setattr(hubmod, "MAX_ROW_GROUP_BYTES", 256 << 20)
    monkeypatch.setattr(hubmod, "MAX_FILES_PER_DIR", 3)  # data/ holds 3 shards, the root 3 files
    with pytest.raises(RemoteError, match=r"zoo(/data)?: 3 files in one folder"):
        push(zoo_dir, REPO, progress=False)
    assert hub.stats["commit"] == 0
    s = parse_source("hf://datasets/ns/zoo@refs%2Fpr%2F3/sub/dir")
    assert (s.kind, s.repo_id, s.revision, s.subpath) == ("hub", "ns/zoo", "refs/pr/3", "sub/dir")
    s = parse_source("ns/zoo", "dev")
    assert (s.kind, s.repo_type, s.revision) == ("hub", "dataset", "dev")
    assert parse_source("s3://bucket/zoo").kind == "fsspec"
    with pytest.raises(RemoteError, match="contradicts"):
        parse_source("hf://datasets/ns/zoo@main", "dev")
    with pytest.raises(RemoteError, match="not a local folder"):
        load_zoo("not-a-zoo-anywhere")
