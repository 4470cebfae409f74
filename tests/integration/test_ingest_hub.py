"""``ingest`` from Hub repos, against the local Hub stand-in over real HTTP: real PEFT adapters
plus real ``torch.save`` pickles are uploaded with ``HfApi``; only safetensors / small JSON come
back, pickles are refused by name without a download, every LoRA records repo + commit sha."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lora_zoo.contrib.formats import read_adapter
from lora_zoo.contrib.ingest import ingest
from lora_zoo.contrib.ingest_hub import HubFetch, HubSource, is_hub_source, parse_hub_source, plan
from lora_zoo.errors import PathEscapeError, RemoteError
from lora_zoo.load.source import load_zoo
from tests.fixtures.adapters import llama_peft
from tests.fixtures.hub_server import HubHandler, hub  # noqa: F401  (fixture)

REPO = "tester/loras"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The repo's content on disk: two PEFT adapters, a .bin-only PEFT folder, a .pt, a pickle
    disguised as safetensors, an over-size file and a README."""
    root = tmp_path_factory.mktemp("repo")
    llama_peft(root, seed=0)  # adapter at the repo root
    llama_peft(root / "sub" / "peft_b", seed=1)
    legacy = root / "legacy"
    legacy.mkdir()
    shutil.copy(root / "adapter_config.json", legacy / "adapter_config.json")
    state = {"base_model.model.x.lora_A.weight": torch.ones(2, 3)}
    torch.save(state, legacy / "adapter_model.bin")
    torch.save(state, root / "weights.pt")
    torch.save(state, root / "disguised.safetensors")
    (root / "huge.safetensors").write_bytes(os.urandom(300_000))  # over the 0.2 MB limit
    (root / "README.md").write_text("# some LoRAs\n")
    return root


@pytest.fixture
def gets(monkeypatch):
    """Every (method, path) the stand-in served from /resolve/: what was really downloaded."""
    seen: list[tuple[str, str]] = []
    orig = HubHandler._resolve

    def spy(self, method, repo, rev, path):
        seen.append((method, path))
        return orig(self, method, repo, rev, path)

    monkeypatch.setattr(HubHandler, "_resolve", spy)
    return seen


def _api(hub):  # noqa: F811
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token="hf_dummy_token")


def _upload(hub, folder, repo=REPO, **kw):  # noqa: F811
    api = _api(hub)
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo, **kw).oid


def _same_factors(a, b) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for n in a.modules:
        assert torch.equal(a.modules[n].A, b.modules[n].A)
        assert torch.equal(a.modules[n].B, b.modules[n].B)
        assert a.modules[n].scale == pytest.approx(b.modules[n].scale)


def test_ingest_repo_accepts_safetensors_refuses_pickles_unfetched(
    hub,  # noqa: F811
    local,
    gets,
    tmp_path,
):
    sha = _upload(hub, local)
    rep = ingest([f"hf://{REPO}"], tmp_path / "zoo", max_file_mb=0.2, collection="hub")
    zoo = load_zoo(tmp_path / "zoo")
    ids = sorted(zoo["train"].ids)
    assert ids == [REPO, f"{REPO}/sub/peft_b"]
    # the zoo's factors are those of the adapters as read from the local folders
    view = zoo["train"]
    _same_factors(view.record(view.ids.index(REPO)), read_adapter(local))
    _same_factors(
        view.record(view.ids.index(f"{REPO}/sub/peft_b")), read_adapter(local / "sub" / "peft_b")
    )
    # provenance per LoRA
    for i, lid in enumerate(view.ids):
        row = view.row(i)
        assert row["hub_repo"] == REPO and row["hub_commit"] == sha
        assert row["hub_revision"] == "main"
        rel = "" if lid == REPO else "sub/peft_b"
        assert row["source_file"] == rel
        assert row["source_url"] == f"hf://{REPO}@{sha}" + (f"/{rel}" if rel else "")
    assert {a["hub_commit"] for a in rep["accepted"]} == {sha}
    # rejections, each named by its pinned hf:// URL
    rej = {r["file"].removeprefix(f"hf://{REPO}@{sha}/"): r for r in rep["rejected"]}
    assert set(rej) == {
        "legacy/adapter_model.bin",
        "weights.pt",
        "disguised.safetensors",
        "huge.safetensors",
    }
    assert rej["legacy/adapter_model.bin"]["error"] == "PickleRefusedError"
    assert "not downloaded" in rej["weights.pt"]["message"]
    assert rej["disguised.safetensors"]["error"] == "PickleRefusedError"  # caught by its bytes
    assert rej["huge.safetensors"]["error"] == "FileTooLargeError"
    assert "300,000 bytes on the Hub" in rej["huge.safetensors"]["message"]
    # what really travelled: no pickle by name, no over-size file, no README, no lone config
    fetched = {p for m, p in gets if m == "GET"}
    assert fetched == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/peft_b/adapter_config.json",
        "sub/peft_b/adapter_model.safetensors",
        "disguised.safetensors",
    }
    (h,) = rep["hub"]
    assert h["commit"] == sha and h["refused"] == 3
    assert set(h["skipped"]) == {
        "README.md",
        "sub/peft_b/README.md",  # written by PEFT's save_pretrained
        "legacy/adapter_config.json",  # its weights are a pickle: the config alone is useless
    }
    assert h["bytes_downloaded"] == sum((local / p).stat().st_size for p in fetched)
    saved = json.loads((tmp_path / "zoo" / "ingest_report.json").read_text())
    assert saved["counts"] == {"candidates": 3, "accepted": 2, "rejected": 4, "duplicates": 0}
    assert zoo.manifest["info"]["ingest"]["hub"][0]["commit"] == sha
    # temporary downloads are gone
    tmp_root = Path(os.environ["LORA_ZOO_CACHE"]) / "ingest"
    assert list(tmp_root.iterdir()) == []


def test_revision_pinning_subpath_cli_and_bare_ids(
    hub,  # noqa: F811
    local,
    tmp_path,
    monkeypatch,
    capsys,
):
    from lora_zoo.cli import main

    first = tmp_path / "first"
    llama_peft(first / "one", seed=3)
    sha1 = _upload(hub, first)
    sha2 = _upload(hub, local / "sub", path_in_repo="sub")  # second commit adds sub/peft_b
    assert sha1 != sha2
    # pinned by @sha (a short prefix resolves to the full sha): the later commit is invisible
    rep = ingest([f"hf://{REPO}@{sha1[:10]}"], tmp_path / "z1")
    assert [a["lora_id"] for a in rep["accepted"]] == [f"{REPO}/one"]
    assert load_zoo(tmp_path / "z1")["train"].row(0)["hub_commit"] == sha1
    # --revision through the CLI, with a subpath and a bare id mixed with a local folder
    _api(hub).create_branch(REPO, branch="old", revision=sha1)
    out = tmp_path / "z2"
    args = ["ingest", f"hf://{REPO}/sub", REPO, str(local / "sub"), "--revision", "main"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"hub {REPO}@{sha2[:12]}" in text
    rep = json.loads((out / "ingest_report.json").read_text())
    got = {a["lora_id"]: a.get("hub_commit") for a in rep["accepted"]}
    # the local copy comes first, so the Hub's sub/peft_b is its duplicate
    assert got == {"peft_b": None, f"{REPO}/one": sha2}
    assert {d["file"] for d in rep["duplicates"]} == {f"hf://{REPO}@{sha2}/sub/peft_b"}
    assert main(["ingest", REPO, "--revision", "old", "--out", str(tmp_path / "z3")]) == 0
    capsys.readouterr()
    rows = load_zoo(tmp_path / "z3")["train"]
    assert rows.ids == [f"{REPO}/one"] and rows.row(0)["hub_revision"] == "old"
    assert rows.row(0)["hub_commit"] == sha1
    # a bare id that exists as a local path is local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tester" / "loras").mkdir(parents=True)
    assert not is_hub_source(REPO) and is_hub_source("tester/other")
    assert is_hub_source(f"hf://{REPO}")


def test_unreachable_sources_are_reported_not_fatal(hub, local, tmp_path):  # noqa: F811
    _upload(hub, local)
    srcs = [
        "hf://tester/no-such-repo",
        "tester/bare-missing",
        f"hf://{REPO}@no-such-branch",
        f"hf://{REPO}@main/no/such/folder",
        str(local / "sub" / "peft_b"),
        f"hf://{REPO}@main",
    ]
    rep = ingest(srcs, tmp_path / "zoo", max_file_mb=0.2, revision="dev")
    by_file = {r["file"]: r for r in rep["rejected"]}
    assert by_file["hf://tester/no-such-repo"]["key"] == "repo_id"
    assert "not found" in by_file["hf://tester/no-such-repo"]["message"]
    assert "no local path" in by_file["tester/bare-missing"]["message"]
    assert by_file[f"hf://{REPO}@no-such-branch"]["key"] == "revision"
    assert by_file[f"hf://{REPO}@main/no/such/folder"]["error"] == "RemoteError"
    assert "contradicts" in by_file[f"hf://{REPO}@main"]["message"]  # --revision dev vs @main
    assert [a["lora_id"] for a in rep["accepted"]] == ["peft_b"]
    assert [h.get("error") for h in rep["hub"]] == ["RemoteError"] * 5


def test_corrupted_download_is_rejected_by_sha256(hub, local, tmp_path):  # noqa: F811
    import hashlib

    _upload(hub, local)
    bad = hashlib.sha256((local / "sub" / "peft_b" / "adapter_model.safetensors").read_bytes())
    hub.corrupt_lfs(bad.hexdigest())
    rep = ingest([f"hf://{REPO}"], tmp_path / "zoo", max_file_mb=0.2)
    assert [a["lora_id"] for a in rep["accepted"]] == [REPO]
    (r,) = [r for r in rep["rejected"] if r["error"] == "IntegrityError"]
    assert r["file"].endswith("/sub/peft_b/adapter_model.safetensors")
    assert "sha256" in r["message"]


def test_offline_hub_is_reported_and_local_sources_still_go_through(local, tmp_path):
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE  # conftest: no hub fixture, no network
    rep = ingest([f"hf://{REPO}", "tester/elsewhere", str(local / "sub")], tmp_path / "zoo")
    assert [a["lora_id"] for a in rep["accepted"]] == ["peft_b"]
    msgs = {r["file"]: r["message"] for r in rep["rejected"]}
    assert set(msgs) == {f"hf://{REPO}", "tester/elsewhere"}
    assert all("offline" in m for m in msgs.values())


def test_plan_refuses_escaping_paths_and_parse_rules(tmp_path):
    fetch = HubFetch(HubSource("hf://a/b", "a/b"), "c" * 40, tmp_path)
    listing = [
        ("../evil.safetensors", 10, None),
        ("/abs.safetensors", 10, None),
        ("ok/x.safetensors", 10, None),
        ("ok/adapter_config.json", 10, None),
        ("lonely/adapter_config.json", 10, None),
        ("big.json", 2 << 20, None),
        ("cfg/config.json", 5000, None),
        ("cfg/adapter_config.json", 5000, None),
        ("cfg/adapter_model.safetensors", 10, None),
        ("m.ckpt", 10, None),
    ]
    todo = plan(listing, fetch, max_bytes=None)
    assert [p for p, _, _ in todo] == [
        "cfg/adapter_config.json",
        "cfg/adapter_model.safetensors",
        "cfg/config.json",
        "ok/adapter_config.json",
        "ok/x.safetensors",
    ]
    errs = {r["file"].rsplit("@" + "c" * 40 + "/", 1)[1]: r["error"] for r in fetch.rejected}
    assert errs == {
        "../evil.safetensors": "PathEscapeError",
        "/abs.safetensors": "PathEscapeError",
        "m.ckpt": "PickleRefusedError",
    }
    assert set(fetch.skipped) == {"lonely/adapter_config.json", "big.json"}
    # with a 1000-byte limit: an over-size adapter config is refused, other metadata skipped
    small = HubFetch(HubSource("hf://a/b", "a/b"), "c" * 40, tmp_path)
    assert [p for p, _, _ in plan(listing, small, max_bytes=1000)] == [
        "cfg/adapter_model.safetensors",
        "ok/adapter_config.json",
        "ok/x.safetensors",
    ]
    too_big = [r["file"] for r in small.rejected if r["error"] == "FileTooLargeError"]
    assert too_big == [f"hf://a/b@{'c' * 40}/cfg/adapter_config.json"]
    assert "cfg/config.json" in small.skipped
    s = parse_hub_source("hf://datasets/ns/repo@refs%2Fpr%2F2/a/b")
    assert (s.repo_type, s.repo_id, s.revision, s.subpath) == (
        "dataset",
        "ns/repo",
        "refs/pr/2",
        "a/b",
    )
    assert parse_hub_source("ns/repo", "v1").revision == "v1"
    with pytest.raises(PathEscapeError):
        parse_hub_source("hf://ns/repo/../../x")
    with pytest.raises(RemoteError, match="owner/name"):
        parse_hub_source("hf://justone")
